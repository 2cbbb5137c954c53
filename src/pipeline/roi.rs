//! The ROI rule of the contract: the crop R the refinement head sees, from the clicks.
//!
//! Per axis with grid extent S, clicks spanning lo..=hi and the newest click at n:
//! want = min(clamp(hi − lo + 1 + 2·margin, roi_min, roi_max), S); the centre is the middle of
//! the clicks when their span plus margins fits roi_max, else the newest click; R is `want`
//! voxels around the centre, shifted to lie inside the grid.

use crate::geometry::{Click, Region};
use crate::model::TisConfig;

/// R for `clicks` (at least one, all on the grid; the last is the newest).
pub fn roi_for_clicks(clicks: &[Click], grid: [usize; 3], config: &TisConfig) -> Region {
    let newest = clicks
        .last()
        .expect("the ROI rule needs a click")
        .position();
    let mut region = Region::full(grid);
    for a in 0..3 {
        let lo = clicks.iter().map(|c| c.position()[a]).min().unwrap_or(0);
        let hi = clicks.iter().map(|c| c.position()[a]).max().unwrap_or(0);
        let span = hi - lo + 1 + 2 * config.roi_margin[a];
        let want = span
            .clamp(config.roi_min[a], config.roi_max[a])
            .min(grid[a]);
        let centre = if span <= config.roi_max[a] {
            (lo + hi) / 2
        } else {
            newest[a]
        };
        region.start[a] = centre.saturating_sub(want / 2).min(grid[a] - want);
        region.size[a] = want;
    }
    region
}
