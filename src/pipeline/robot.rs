//! The simulated user of the paper's evaluation (§4.1), for `tis eval` and `tis demo`.
//!
//! Each click goes to the largest connected (6-neighbour) region of wrongly labelled voxels. When
//! the region's centroid lies inside it, the click is the centroid moved by a seeded random
//! offset of at most `jitter` voxels (drawn until it lands in the region; the centroid itself if
//! ten draws miss); otherwise it is the region's most interior voxel (farthest from its boundary).
//! The click names the reference class at its voxel (multi-class; background is a negative
//! click).

use std::collections::VecDeque;

use crate::geometry::{Click, Label};
use crate::random::Rng;

/// Dice of `class` between a segmentation and the reference; None when the class is absent
/// from both.
pub fn dice(labels: &[Label], reference: &[Label], class: Label) -> Option<f64> {
    let (mut both, mut a, mut b) = (0usize, 0usize, 0usize);
    for (&l, &r) in labels.iter().zip(reference) {
        let (in_l, in_r) = (l == class, r == class);
        a += in_l as usize;
        b += in_r as usize;
        both += (in_l && in_r) as usize;
    }
    (a + b > 0).then(|| 2.0 * both as f64 / (a + b) as f64)
}

/// The 6-neighbours of voxel `v` of a grid.
fn neighbours(v: usize, grid: [usize; 3]) -> impl Iterator<Item = usize> {
    let [nz, ny, nx] = grid;
    let (z, y, x) = (v / (ny * nx), (v / nx) % ny, v % nx);
    [
        (z > 0).then(|| v - ny * nx),
        (z + 1 < nz).then(|| v + ny * nx),
        (y > 0).then(|| v - nx),
        (y + 1 < ny).then(|| v + nx),
        (x > 0).then(|| v - 1),
        (x + 1 < nx).then(|| v + 1),
    ]
    .into_iter()
    .flatten()
}

/// The largest 6-connected region of true voxels (the first found on ties), as a membership
/// mask and its voxels.
fn largest_region(mask: &[bool], grid: [usize; 3]) -> Option<(Vec<bool>, Vec<usize>)> {
    let mut seen = vec![false; mask.len()];
    let mut largest: Vec<usize> = Vec::new();
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        let mut region = Vec::new();
        seen[start] = true;
        stack.push(start);
        while let Some(v) = stack.pop() {
            region.push(v);
            for n in neighbours(v, grid) {
                if mask[n] && !seen[n] {
                    seen[n] = true;
                    stack.push(n);
                }
            }
        }
        if region.len() > largest.len() {
            largest = region;
        }
    }
    if largest.is_empty() {
        return None;
    }
    let mut member = vec![false; mask.len()];
    largest.iter().for_each(|&v| member[v] = true);
    Some((member, largest))
}

/// The voxel of a region farthest (6-neighbour steps) from anything outside it; the first in C
/// order on ties.
fn most_interior(member: &[bool], voxels: &[usize], grid: [usize; 3]) -> usize {
    let mut depth = vec![usize::MAX; member.len()];
    let mut queue = VecDeque::new();
    for &v in voxels {
        let on_edge = neighbours(v, grid).count() < 6 || neighbours(v, grid).any(|n| !member[n]);
        if on_edge {
            depth[v] = 0;
            queue.push_back(v);
        }
    }
    while let Some(v) = queue.pop_front() {
        for n in neighbours(v, grid) {
            if member[n] && depth[n] == usize::MAX {
                depth[n] = depth[v] + 1;
                queue.push_back(n);
            }
        }
    }
    let mut sorted = voxels.to_vec();
    sorted.sort_unstable();
    sorted
        .into_iter()
        .max_by_key(|&v| (depth[v], std::cmp::Reverse(v)))
        .expect("a non-empty region")
}

/// The paper's simulated user.
pub struct Robot {
    rng: Rng,
    jitter: usize,
}

impl Robot {
    /// The paper's user: clicks disturbed by up to 10 voxels.
    pub const PAPER_JITTER: usize = 10;

    pub fn new(seed: u64, jitter: usize) -> Self {
        Robot {
            rng: Rng::new(seed),
            jitter,
        }
    }

    /// The next click on the largest error region, or None when the labels equal the reference.
    pub fn next_click(
        &mut self,
        labels: &[Label],
        reference: &[Label],
        grid: [usize; 3],
    ) -> Option<Click> {
        let wrong: Vec<bool> = labels.iter().zip(reference).map(|(a, b)| a != b).collect();
        let (member, voxels) = largest_region(&wrong, grid)?;
        let [_, ny, nx] = grid;
        let position = |v: usize| [v / (ny * nx), (v / nx) % ny, v % nx];
        let index = |p: [usize; 3]| (p[0] * ny + p[1]) * nx + p[2];
        let mut sum = [0u64; 3];
        for &v in &voxels {
            let p = position(v);
            (0..3).for_each(|a| sum[a] += p[a] as u64);
        }
        let n = voxels.len() as u64;
        // The centroid rounded to a voxel (halves up).
        let centre = [0, 1, 2].map(|a| (((2 * sum[a] + n) / (2 * n)) as usize).min(grid[a] - 1));
        let chosen = if member[index(centre)] {
            self.jittered(centre, grid, |p| member[index(p)])
                .map_or(index(centre), index)
        } else {
            most_interior(&member, &voxels, grid)
        };
        let [z, y, x] = position(chosen);
        Some(Click::new(z, y, x, reference[chosen] as usize))
    }

    /// The centre moved by at most `jitter` voxels (Euclidean): the first of up to ten draws
    /// that stays on the grid and `inside` the region; None when all miss or the jitter is 0.
    fn jittered(
        &mut self,
        centre: [usize; 3],
        grid: [usize; 3],
        inside: impl Fn([usize; 3]) -> bool,
    ) -> Option<[usize; 3]> {
        if self.jitter == 0 {
            return None;
        }
        let span = 2 * self.jitter as u64 + 1;
        (0..10).find_map(|_| {
            let offset = [0; 3].map(|_| self.rng.below(span) as i64 - self.jitter as i64);
            if offset.iter().map(|o| o * o).sum::<i64>() > (self.jitter * self.jitter) as i64 {
                return None;
            }
            let p = [0, 1, 2].map(|a| centre[a] as i64 + offset[a]);
            (0..3)
                .all(|a| p[a] >= 0 && (p[a] as usize) < grid[a])
                .then(|| p.map(|v| v as usize))
                .filter(|&p| inside(p))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid_labels(grid: [usize; 3], f: impl Fn(usize, usize, usize) -> Label) -> Vec<Label> {
        let mut out = Vec::new();
        for z in 0..grid[0] {
            for y in 0..grid[1] {
                for x in 0..grid[2] {
                    out.push(f(z, y, x));
                }
            }
        }
        out
    }

    #[test]
    fn clicks_the_centre_of_the_largest_error() {
        let grid = [10, 20, 20];
        let reference = grid_labels(grid, |z, y, x| {
            if (2..8).contains(&z) && (5..15).contains(&y) && (5..15).contains(&x) {
                2
            } else {
                0
            }
        });
        let labels = grid_labels(
            grid,
            |z, y, x| if z == 0 && y == 0 && x < 3 { 1 } else { 0 },
        );
        // Errors: the missed class-2 box (600 voxels) and a 3-voxel false positive.
        let click = Robot::new(1, 0)
            .next_click(&labels, &reference, grid)
            .unwrap();
        assert_eq!(click, Click::new(5, 10, 10, 2));
        let jittered = Robot::new(1, Robot::PAPER_JITTER)
            .next_click(&labels, &reference, grid)
            .unwrap();
        assert_eq!(jittered.class, 2);
        let d = [(jittered.z, 5), (jittered.y, 10), (jittered.x, 10)]
            .map(|(a, b)| (a as f64 - b as f64).powi(2))
            .iter()
            .sum::<f64>();
        assert!(d <= 100.0 && reference[(jittered.z * 20 + jittered.y) * 20 + jittered.x] == 2);
        assert!(
            Robot::new(1, 0)
                .next_click(&reference, &reference, grid)
                .is_none()
        );
    }

    #[test]
    fn jitter_keeps_drawing_until_it_lands_in_a_thin_region() {
        // A three-voxel-thick plate: most offsets of a 10-voxel ball leave it.
        let grid = [21, 21, 21];
        let reference = grid_labels(grid, |z, _, _| if (9..12).contains(&z) { 1 } else { 0 });
        let labels = vec![0; reference.len()];
        let centre = Click::new(10, 10, 10, 1);
        let clicks: Vec<Click> = (0..20)
            .map(|seed| {
                Robot::new(seed, Robot::PAPER_JITTER)
                    .next_click(&labels, &reference, grid)
                    .unwrap()
            })
            .collect();
        assert!(
            clicks
                .iter()
                .all(|c| (9..12).contains(&c.z) && c.class == 1)
        );
        let moved = clicks.iter().filter(|&&c| c != centre).count();
        assert!(
            moved >= 10,
            "only {moved} of 20 seeds moved the click off the centre"
        );
    }

    #[test]
    fn a_centroid_outside_the_region_gives_an_interior_voxel() {
        // A U-shaped error region: its centroid falls in the notch, outside the region.
        let grid = [5, 30, 30];
        let reference = grid_labels(grid, |z, y, x| {
            let u =
                (5..25).contains(&x) && (5..25).contains(&y) && !((12..18).contains(&x) && y >= 10);
            if (1..4).contains(&z) && u { 1 } else { 0 }
        });
        let labels = vec![0; reference.len()];
        let click = Robot::new(7, Robot::PAPER_JITTER)
            .next_click(&labels, &reference, grid)
            .unwrap();
        assert_eq!(click.class, 1);
        assert_eq!(
            click.z, 2,
            "the interior of a 3-voxel-thick region is its middle slice"
        );
        assert_eq!(reference[(click.z * 30 + click.y) * 30 + click.x], 1);
    }
}
