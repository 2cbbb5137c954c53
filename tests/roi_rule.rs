//! The contract's ROI rule on the cases that stress it, and clicks the engine must refuse.

mod common;

use tis::model::TisConfig;
use tis::pipeline::roi::roi_for_clicks;
use tis::{Click, Region};

fn config() -> TisConfig {
    TisConfig {
        roi_margin: [2, 4, 4],
        roi_min: [6, 16, 16],
        roi_max: [12, 32, 32],
        ..TisConfig::tis_b()
    }
}

fn roi(clicks: &[(usize, usize, usize)], grid: [usize; 3]) -> Region {
    let clicks: Vec<Click> = clicks
        .iter()
        .map(|&(z, y, x)| Click::new(z, y, x, 1))
        .collect();
    roi_for_clicks(&clicks, grid, &config())
}

#[test]
fn single_click_gets_roi_min_centred_on_it() {
    // span 1 + 2·margin = 5 / 9 / 9 → clamped up to roi_min 6 / 16 / 16, centred on the click.
    let r = roi(&[(20, 50, 60)], [40, 100, 100]);
    assert_eq!(
        r,
        Region {
            start: [17, 42, 52],
            size: [6, 16, 16]
        }
    );
}

#[test]
fn hull_plus_margin_sets_the_size_between_min_and_max() {
    // z span 7 + 4 = 11, y span 21 + 8 = 29, x span 3 + 8 = 11 → 16 (min); centre = floor((lo+hi)/2).
    let r = roi(&[(10, 30, 40), (16, 50, 42)], [40, 100, 100]);
    assert_eq!(r.size, [11, 29, 16]);
    assert_eq!(r.start, [13 - 5, 40 - 14, 41 - 8]);
}

#[test]
fn clicks_at_the_border_shift_the_roi_inside() {
    let r = roi(&[(0, 0, 99)], [40, 100, 100]);
    assert_eq!(
        r,
        Region {
            start: [0, 0, 84],
            size: [6, 16, 16]
        }
    );
}

#[test]
fn hull_wider_than_roi_max_centres_on_the_newest_click() {
    // y span 81 + 8 > 32: size roi_max, centred on the newest click (y 90), older click left out.
    let clicks = [Click::new(20, 10, 50, 1), Click::new(21, 90, 52, 0)];
    let r = roi_for_clicks(&clicks, [40, 200, 100], &config());
    assert_eq!(r.size[1], 32);
    assert_eq!(r.start[1], 90 - 16);
    assert!(r.contains(clicks[1].position()));
    assert!(!r.contains(clicks[0].position()));
    // the same clicks in the other order: the ROI follows the newest one
    let r = roi_for_clicks(&[clicks[1], clicks[0]], [40, 100, 100], &config());
    assert_eq!(r.start[1], 0);
    assert!(r.contains(clicks[0].position()));
}

#[test]
fn grid_smaller_than_roi_min_is_taken_whole() {
    let r = roi(&[(2, 5, 7)], [4, 10, 100]);
    assert_eq!(r.start[..2], [0, 0]);
    assert_eq!(r.size, [4, 10, 16]);
}

#[test]
fn the_newest_click_is_always_inside() {
    let grid = [13, 37, 29];
    let mut state = 12345u64;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize % n
    };
    for _ in 0..2000 {
        let clicks: Vec<Click> = (0..1 + next(5))
            .map(|_| Click::new(next(grid[0]), next(grid[1]), next(grid[2]), 1))
            .collect();
        let r = roi_for_clicks(&clicks, grid, &config());
        r.check_inside(grid).unwrap();
        assert!(
            r.contains(clicks.last().unwrap().position()),
            "{clicks:?} → {r:?}"
        );
    }
}

#[test]
fn clicks_outside_the_grid_or_of_unknown_class_are_refused() {
    let grid = [4, 5, 6];
    let err = Click::new(1, 5, 2, 1)
        .check(grid, 3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(z 1, y 5, x 2)") && err.contains("outside the grid of 4 × 5 × 6"),
        "{err}"
    );
    let err = Click::new(1, 1, 1, 3)
        .check(grid, 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("class 3") && err.contains("0..2"), "{err}");
    Click::new(3, 4, 5, 2).check(grid, 3).unwrap();
}
