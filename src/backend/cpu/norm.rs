//! Normalisations on the CPU: InstanceNorm + LeakyReLU over volumes (one task per channel) and
//! LayerNorm over token rows. Statistics are accumulated in f64, variance biased, as PyTorch.

use rayon::prelude::*;

use crate::backend::{InstanceNorm, LayerNorm};
use crate::error::{Error, Result};
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
    let channels = x.shape().first().copied().unwrap_or(0);
    if x.shape().len() != 4 || norm.weight.len() != channels || norm.bias.len() != channels {
        return Err(Error::Shape(format!(
            "instance norm of {} channels applied to a volume of shape {:?}",
            norm.weight.len(),
            x.shape()
        )));
    }
    let voxels = x.len() / channels;
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

/// Checks that `norm` fits rows of `width`.
pub fn check_layer_norm(norm: &LayerNorm<Tensor>, width: usize) -> Result<()> {
    if norm.weight.len() != width || norm.bias.len() != width {
        return Err(Error::Shape(format!(
            "layer norm of width {} applied to rows of width {width}",
            norm.weight.len()
        )));
    }
    Ok(())
}
