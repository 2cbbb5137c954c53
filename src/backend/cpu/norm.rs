//! Normalisations on the CPU: InstanceNorm + LeakyReLU over volumes (one task per channel) and
//! LayerNorm over token rows. Statistics are accumulated in f64, variance biased, as PyTorch.

use rayon::prelude::*;

use super::linear::TOKEN_BLOCK;
use super::vector_math::vectorised;

use crate::backend::{InstanceNorm, LayerNorm, shapes};
use crate::error::Result;
use crate::tensor::Tensor;

/// LayerNorm's epsilon in the contract.
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// Partial sums per lane, so that the f64 accumulation vectorises (a single running sum is a
/// chain of dependent adds, several times slower over a volume's channel).
const SUM_LANES: usize = 8;

/// Σ f(v) over `values` in f64, in `SUM_LANES` interleaved partial sums.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; SUM_LANES];
    let chunks = values.chunks_exact(SUM_LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v as f64);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Mean and biased variance of `values`, in f64 (two passes). Inlined, so that it vectorises
/// for the instruction set of its caller (`layer_norm_rows` runs under `vectorised`).
#[inline(always)]
fn moments(values: &[f32]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = lane_sum(values, |v| v) / n;
    let var = lane_sum(values, |v| (v - mean) * (v - mean)) / n;
    (mean, var)
}

pub fn instance_norm_leaky_relu(x: &mut Tensor, norm: &InstanceNorm<Tensor>) -> Result<()> {
    let (_, voxels) = shapes::instance_norm(x, norm)?;
    let (gamma, beta) = (norm.weight.data(), norm.bias.data());
    x.data_mut()
        .par_chunks_mut(voxels)
        .enumerate()
        .for_each(|(c, channel)| {
            // The slope moved into the closure by value: read through a reference inside the
            // loop, the compiler could not rule out that the stores change it, and the loop
            // would not vectorise.
            let slope = norm.negative_slope;
            vectorised(
                #[inline(always)]
                move || {
                    let (mean, var) = moments(channel);
                    let inv_std = 1.0 / (var + norm.eps as f64).sqrt();
                    let scale = (inv_std * gamma[c] as f64) as f32;
                    let shift = (beta[c] as f64 - mean * inv_std * gamma[c] as f64) as f32;
                    for v in channel.iter_mut() {
                        let y = *v * scale + shift;
                        *v = if y < 0.0 { y * slope } else { y };
                    }
                },
            )
        });
    Ok(())
}

/// LayerNorm of every row of `x` (rows × width) into `out`.
pub fn layer_norm_rows(x: &[f32], width: usize, norm: &LayerNorm<Tensor>, out: &mut [f32]) {
    let (gamma, beta) = (norm.weight.data(), norm.bias.data());
    vectorised(
        #[inline(always)]
        || {
            for (row, dest) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
                let (mean, var) = moments(row);
                let inv_std = 1.0 / (var + LAYER_NORM_EPS).sqrt();
                for (i, d) in dest.iter_mut().enumerate() {
                    *d = ((row[i] as f64 - mean) * inv_std) as f32 * gamma[i] + beta[i];
                }
            }
        },
    )
}

/// LayerNorm of every row of a token matrix, one block of rows per task.
pub fn layer_norm(x: &Tensor, norm: &LayerNorm<Tensor>) -> Result<Tensor> {
    let (_, width) = shapes::tokens(x, "layer_norm")?;
    shapes::layer_norm(norm, width)?;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(TOKEN_BLOCK * width)
        .zip(x.data().par_chunks(TOKEN_BLOCK * width))
        .for_each(|(dest, src)| layer_norm_rows(src, width, norm, dest));
    Tensor::new(x.shape().to_vec(), out)
}
