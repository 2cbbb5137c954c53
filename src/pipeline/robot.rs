//! A simulated user for demos and evaluation: it clicks where the segmentation is most wrong.
//!
//! Each click goes to the largest connected (6-neighbour) region of wrongly labelled voxels, at
//! its centroid, or, when the centroid falls outside the region, at the region's voxel nearest
//! to it; the click names the reference class there.

use crate::geometry::{Click, Label};

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

/// The next click on the largest error region, or None when the segmentation is perfect.
pub fn next_click(labels: &[Label], reference: &[Label], grid: [usize; 3]) -> Option<Click> {
    let [_, gy, gx] = grid;
    let wrong: Vec<bool> = labels.iter().zip(reference).map(|(a, b)| a != b).collect();
    let mut seen = vec![false; wrong.len()];
    let mut largest: Vec<usize> = Vec::new();
    let mut stack = Vec::new();
    for start in 0..wrong.len() {
        if !wrong[start] || seen[start] {
            continue;
        }
        let mut region = Vec::new();
        seen[start] = true;
        stack.push(start);
        while let Some(v) = stack.pop() {
            region.push(v);
            let (z, y, x) = (v / (gy * gx), (v / gx) % gy, v % gx);
            let neighbours = [
                (z > 0).then(|| v - gy * gx),
                (z + 1 < grid[0]).then(|| v + gy * gx),
                (y > 0).then(|| v - gx),
                (y + 1 < gy).then(|| v + gx),
                (x > 0).then(|| v - 1),
                (x + 1 < gx).then(|| v + 1),
            ];
            for n in neighbours.into_iter().flatten() {
                if wrong[n] && !seen[n] {
                    seen[n] = true;
                    stack.push(n);
                }
            }
        }
        if region.len() > largest.len() {
            largest = region;
        }
    }
    let position = |v: usize| [v / (gy * gx), (v / gx) % gy, v % gx];
    let count = largest.len() as f64;
    let mut centroid = [0f64; 3];
    for &v in &largest {
        let p = position(v);
        (0..3).for_each(|a| centroid[a] += p[a] as f64 / count);
    }
    let distance = |v: usize| {
        let p = position(v);
        (0..3)
            .map(|a| (p[a] as f64 - centroid[a]).powi(2))
            .sum::<f64>()
    };
    let chosen = largest
        .iter()
        .copied()
        .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))?;
    let [z, y, x] = position(chosen);
    Some(Click::new(z, y, x, reference[chosen] as usize))
}
