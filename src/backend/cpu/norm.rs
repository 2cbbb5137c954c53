//! Normalisations on the CPU: InstanceNorm + LeakyReLU over volumes (one task per channel) and
//! LayerNorm over token rows. Statistics are accumulated in f64, variance biased, as PyTorch.

use rayon::prelude::*;

use super::linear::TOKEN_BLOCK;

use crate::backend::{InstanceNorm, LayerNorm, shapes};
use crate::error::Result;
use crate::tensor::Tensor;

/// LayerNorm's epsilon in the contract.
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// Mean and biased variance of `values`, in f64.
fn moments(values: &[f32]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var)
}

pub fn instance_norm_leaky_relu(x: &mut Tensor, norm: &InstanceNorm<Tensor>) -> Result<()> {
    let (_, voxels) = shapes::instance_norm(x, norm)?;
    let (gamma, beta) = (norm.weight.data(), norm.bias.data());
    x.data_mut()
        .par_chunks_mut(voxels)
        .enumerate()
        .for_each(|(c, channel)| {
            let (mean, var) = moments(channel);
            let inv_std = 1.0 / (var + norm.eps as f64).sqrt();
            let scale = (inv_std * gamma[c] as f64) as f32;
            let shift = (beta[c] as f64 - mean * inv_std * gamma[c] as f64) as f32;
            for v in channel.iter_mut() {
                let y = *v * scale + shift;
                *v = if y < 0.0 { y * norm.negative_slope } else { y };
            }
        });
    Ok(())
}

/// LayerNorm of every row of `x` (rows × width) into `out`.
pub fn layer_norm_rows(x: &[f32], width: usize, norm: &LayerNorm<Tensor>, out: &mut [f32]) {
    let (gamma, beta) = (norm.weight.data(), norm.bias.data());
    for (row, dest) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let (mean, var) = moments(row);
        let inv_std = 1.0 / (var + LAYER_NORM_EPS).sqrt();
        for (i, d) in dest.iter_mut().enumerate() {
            *d = ((row[i] as f64 - mean) * inv_std) as f32 * gamma[i] + beta[i];
        }
    }
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
