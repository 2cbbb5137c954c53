//! nnU-Net's sliding-window prediction (nnunet-inference.md §3.3), over a backend, returning
//! the logits and, aggregated the same way, the penultimate features of the whole grid.
//!
//! Grids smaller than the patch are zero-padded (below = diff / 2) and cropped back. Tiles
//! start at `round_half_even(i·(L − P)/(n − 1))` with n = ceil((L − P)/(P·step)) + 1. Each tile
//! is predicted plainly and under every combination of the mirror axes, the predictions
//! averaged, weighted by nnU-Net's Gaussian (σ = P/8, peak 10, quantised to f16 as nnU-Net does)
//! and accumulated in f32 on every backend (nnU-Net's GPU path sums in f16); the sums are
//! divided by the summed weights at the end.

use std::borrow::Cow;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::geometry::Region;
use crate::model::unet::{TileOutput, UNet};
use crate::tensor::{Tensor, round_to_f16};

/// nnU-Net's default overlap: tiles advance by half a patch.
pub const DEFAULT_STEP: f64 = 0.5;

/// Tile start positions along one axis of length `len` (≥ `patch`).
pub fn tile_starts(len: usize, patch: usize, step: f64) -> Vec<usize> {
    let span = (len - patch) as f64;
    let steps = (span / (patch as f64 * step)).ceil() as usize + 1;
    if steps == 1 {
        return vec![0];
    }
    let actual = span / (steps - 1) as f64;
    (0..steps)
        .map(|i| (actual * i as f64).round_ties_even() as usize)
        .collect()
}

/// nnU-Net's Gaussian importance map for a patch, as one channel (1 × patch).
pub fn gaussian_weights(patch: [usize; 3]) -> Tensor {
    let axis = |a: usize| -> Vec<f64> {
        let (centre, sigma) = ((patch[a] / 2) as f64, patch[a] as f64 / 8.0);
        (0..patch[a])
            .map(|i| (-((i as f64 - centre).powi(2)) / (2.0 * sigma * sigma)).exp())
            .collect()
    };
    let (gz, gy, gx) = (axis(0), axis(1), axis(2));
    let mut values = Vec::with_capacity(patch.iter().product());
    for z in &gz {
        for y in &gy {
            for x in &gx {
                values.push(round_to_f16(10.0 * z * y * x));
            }
        }
    }
    let min_positive = values
        .iter()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(f32::INFINITY, f32::min);
    values
        .iter_mut()
        .filter(|v| **v == 0.0)
        .for_each(|v| *v = min_positive);
    Tensor::new(vec![1, patch[0], patch[1], patch[2]], values).expect("patch-sized map")
}

/// Every combination of the mirror axes, by size, in `itertools.combinations` order.
pub fn mirror_combinations(axes: &[usize]) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for size in 1..=axes.len() {
        let mut pick: Vec<usize> = (0..size).collect();
        loop {
            out.push(pick.iter().map(|&i| axes[i]).collect());
            let Some(i) = (0..size).rev().find(|&i| pick[i] != i + axes.len() - size) else {
                break;
            };
            pick[i] += 1;
            for j in i + 1..size {
                pick[j] = pick[j - 1] + 1;
            }
        }
    }
    out
}

/// What the sliding window sums over the tiles: the logits alone (an automatic segmentation),
/// or the penultimate features too (a session, whose head reads them). Features are C_f
/// channels against K logits (32 against 3 for the MSD Pancreas plan), so summing them is most
/// of the window's work outside the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outputs {
    Logits,
    LogitsAndFeatures,
}

/// Logits (K × grid) and, where asked for, features (C_f × grid) of a whole volume.
pub struct Encoded<T> {
    pub logits: T,
    pub features: Option<T>,
}

/// One tile predicted plainly and under each mirror combination, averaged.
pub fn predict_tile_mirrored<B: Backend>(
    backend: &B,
    network: &UNet<B>,
    tile: &B::Tensor,
    mirror_axes: &[usize],
    outputs: Outputs,
) -> Result<Encoded<B::Tensor>> {
    let TileOutput {
        mut logits,
        features,
    } = network.forward(backend, tile)?;
    let mut features = (outputs == Outputs::LogitsAndFeatures).then_some(features);
    let combinations = mirror_combinations(mirror_axes);
    for axes in &combinations {
        let mirrored = network.forward(backend, &backend.flip(tile, axes)?)?;
        backend.add_assign(&mut logits, &backend.flip(&mirrored.logits, axes)?)?;
        if let Some(sum) = &mut features {
            backend.add_assign(sum, &backend.flip(&mirrored.features, axes)?)?;
        }
    }
    let factor = 1.0 / (combinations.len() + 1) as f32;
    backend.scale(&mut logits, factor)?;
    if let Some(sum) = &mut features {
        backend.scale(sum, factor)?;
    }
    Ok(Encoded { logits, features })
}

/// Zero-pads a C × Z × Y × X volume up to `patch` where it is smaller (borrowed where it is not);
/// returns the padded volume and where the original lies in it.
fn pad_to_patch(volume: &Tensor, patch: [usize; 3]) -> (Cow<'_, Tensor>, Region) {
    let s = volume.shape();
    let (channels, dims) = (s[0], [s[1], s[2], s[3]]);
    let padded = [0, 1, 2].map(|a| dims[a].max(patch[a]));
    let inner = Region {
        start: [0, 1, 2].map(|a| (padded[a] - dims[a]) / 2),
        size: dims,
    };
    if padded == dims {
        return (Cow::Borrowed(volume), inner);
    }
    let mut out = Tensor::zeros(&[channels, padded[0], padded[1], padded[2]]);
    let (src, dst) = (volume.data(), out.data_mut());
    let mut i = 0;
    for c in 0..channels {
        for z in 0..dims[0] {
            for y in 0..dims[1] {
                let row = ((c * padded[0] + z + inner.start[0]) * padded[1] + y + inner.start[1])
                    * padded[2]
                    + inner.start[2];
                dst[row..row + dims[2]].copy_from_slice(&src[i..i + dims[2]]);
                i += dims[2];
            }
        }
    }
    (Cow::Owned(out), inner)
}

/// Logits (K × grid) and, for `Outputs::LogitsAndFeatures`, features (C_f × grid) of a
/// preprocessed volume (C × grid). `progress(done, total)` is called after every tile.
#[allow(clippy::too_many_arguments)]
pub fn predict_sliding_window<B: Backend>(
    backend: &B,
    network: &UNet<B>,
    patch: [usize; 3],
    volume: &Tensor,
    mirror_axes: &[usize],
    step: f64,
    outputs: Outputs,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Encoded<B::Tensor>> {
    let plan = network.plan();
    if volume.shape().len() != 4 || volume.shape()[0] != plan.in_channels || volume.is_empty() {
        return Err(Error::Shape(format!(
            "the model takes {} channel(s) as C × Z × Y × X, got a volume of shape {:?}",
            plan.in_channels,
            volume.shape()
        )));
    }
    if !(step > 0.0 && step <= 1.0) {
        return Err(Error::Shape(format!("tile step {step} must lie in (0, 1]")));
    }
    let (padded, inner) = pad_to_patch(volume, patch);
    let dims = [1, 2, 3].map(|a| padded.shape()[a]);
    let starts = [0, 1, 2].map(|a| tile_starts(dims[a], patch[a], step));
    let mut tiles = Vec::new();
    for &z in &starts[0] {
        for &y in &starts[1] {
            for &x in &starts[2] {
                tiles.push(Region {
                    start: [z, y, x],
                    size: patch,
                });
            }
        }
    }

    let input = backend.upload(&padded)?;
    let gaussian = gaussian_weights(patch);
    let weights = backend.upload(&gaussian)?;
    // The summed weights are a sum like the others, of a tile of ones.
    let ones = backend.upload(&Tensor::new(
        gaussian.shape().to_vec(),
        vec![1.0; gaussian.len()],
    )?)?;
    let mut weight_sum = backend.accumulator(&[1, dims[0], dims[1], dims[2]])?;
    let mut logits_sum = backend.accumulator(&[plan.classes, dims[0], dims[1], dims[2]])?;
    let mut features_sum = match outputs {
        Outputs::Logits => None,
        Outputs::LogitsAndFeatures => {
            Some(backend.accumulator(&[plan.feature_channels(), dims[0], dims[1], dims[2]])?)
        }
    };
    for (done, tile) in tiles.iter().enumerate() {
        let crop = backend.crop(&input, tile)?;
        let out = predict_tile_mirrored(backend, network, &crop, mirror_axes, outputs)?;
        backend.accumulate_weighted(&mut logits_sum, &out.logits, &weights, tile)?;
        if let (Some(sum), Some(features)) = (&mut features_sum, &out.features) {
            backend.accumulate_weighted(sum, features, &weights, tile)?;
        }
        backend.accumulate_weighted(&mut weight_sum, &ones, &weights, tile)?;
        progress(done + 1, tiles.len());
    }
    let quotient = |sum| -> Result<B::Tensor> {
        let mean = backend.divide_by_weights(sum, &weight_sum)?;
        if inner.size == dims {
            Ok(mean)
        } else {
            backend.crop(&mean, &inner)
        }
    };
    Ok(Encoded {
        logits: quotient(logits_sum)?,
        features: features_sum.map(quotient).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    #[test]
    fn tile_starts_follow_nnunet() {
        assert_eq!(tile_starts(110, 64, 0.5), [0, 23, 46]); // the spec's example
        assert_eq!(tile_starts(64, 64, 0.5), [0]);
        assert_eq!(tile_starts(65, 64, 0.5), [0, 1]);
        // (L − P)/(n − 1) = 2.5 and 7.5: halves round to even, as numpy does
        assert_eq!(tile_starts(13, 8, 0.5), [0, 2, 5]);
        assert_eq!(tile_starts(31, 16, 0.5), [0, 8, 15]);
    }

    #[test]
    fn mirror_combinations_in_itertools_order() {
        let all = mirror_combinations(&[0, 1, 2]);
        assert_eq!(
            all,
            [
                vec![0],
                vec![1],
                vec![2],
                vec![0, 1],
                vec![0, 2],
                vec![1, 2],
                vec![0, 1, 2]
            ]
        );
        assert_eq!(mirror_combinations(&[1, 2]), [vec![1], vec![2], vec![1, 2]]);
        assert!(mirror_combinations(&[]).is_empty());
    }

    #[test]
    fn gaussian_peaks_at_ten_in_the_centre_and_has_no_zeros() {
        let g = gaussian_weights([8, 16, 12]);
        let centre = (4 * 16 + 8) * 12 + 6;
        assert_eq!(g.data()[centre], 10.0);
        assert!(g.data().iter().all(|&v| v > 0.0 && v <= 10.0));
        // f16 quantisation: every value is exactly representable in half precision
        assert!(g.data().iter().all(|&v| f16::from_f32(v).to_f32() == v));
    }
}
