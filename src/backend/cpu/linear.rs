//! Dense token ops on the CPU: Linear, the two-layer MLP and the pre-norm feed-forward
//! sub-layer. Tokens are cut into blocks of `TOKEN_BLOCK` rows, one block per task, so the
//! hidden activations of an MLP live only in a per-task buffer (never N × ffn_dim at once).

use rayon::prelude::*;

use super::gemm::matmul_weight_t;
use super::norm::layer_norm_rows;
use crate::backend::{FeedForward, Linear, Mlp, shapes};
use crate::error::Result;
use crate::tensor::Tensor;

/// Rows per task for token-wise work.
pub const TOKEN_BLOCK: usize = 128;

/// Exact GELU, `0.5·x·(1 + erf(x/√2))`.
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `out = x·Wᵀ + b` for a block of rows (`out` already sized rows × out).
pub fn linear_rows(x: &[f32], linear: &Linear<Tensor>, out: &mut [f32]) {
    let (outw, inp) = (linear.weight.shape()[0], linear.weight.shape()[1]);
    let rows = x.len() / inp;
    matmul_weight_t(x, linear.weight.data(), rows, inp, outw, false, out);
    add_bias_rows(out, linear.bias.data());
}

pub fn add_bias_rows(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

/// `out = Mlp(x)` for a block of rows, `hidden` a scratch buffer.
pub fn mlp_rows(x: &[f32], mlp: &Mlp<Tensor>, hidden: &mut Vec<f32>, out: &mut [f32]) {
    let (hidden_width, inp) = (mlp.up.weight.shape()[0], mlp.up.weight.shape()[1]);
    hidden.resize(x.len() / inp * hidden_width, 0.0);
    linear_rows(x, &mlp.up, hidden);
    hidden.iter_mut().for_each(|v| *v = gelu(*v));
    linear_rows(hidden, &mlp.down, out);
}

pub fn linear(x: &Tensor, linear: &Linear<Tensor>) -> Result<Tensor> {
    let (rows, width) = shapes::tokens(x, "linear")?;
    let out_width = shapes::linear(linear, width)?;
    let mut out = vec![0f32; rows * out_width];
    out.par_chunks_mut(TOKEN_BLOCK * out_width)
        .zip(x.data().par_chunks(TOKEN_BLOCK * width))
        .for_each(|(dest, src)| linear_rows(src, linear, dest));
    Tensor::new(vec![rows, out_width], out)
}

pub fn mlp(x: &Tensor, mlp: &Mlp<Tensor>) -> Result<Tensor> {
    let (rows, width) = shapes::tokens(x, "mlp")?;
    let (_, out_width) = shapes::mlp(mlp, width)?;
    let mut out = vec![0f32; rows * out_width];
    out.par_chunks_mut(TOKEN_BLOCK * out_width)
        .zip(x.data().par_chunks(TOKEN_BLOCK * width))
        .for_each_init(Vec::new, |hidden, (dest, src)| {
            mlp_rows(src, mlp, hidden, dest)
        });
    Tensor::new(vec![rows, out_width], out)
}

pub fn feed_forward(x: &mut Tensor, ffn: &FeedForward<Tensor>) -> Result<()> {
    let (_, width, _) = shapes::feed_forward(x, ffn)?;
    x.data_mut()
        .par_chunks_mut(TOKEN_BLOCK * width)
        .for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(normed, hidden, delta), block| {
                normed.resize(block.len(), 0.0);
                delta.resize(block.len(), 0.0);
                layer_norm_rows(block, width, &ffn.norm, normed);
                mlp_rows(normed, &ffn.mlp, hidden, delta);
                block
                    .iter_mut()
                    .zip(delta.iter())
                    .for_each(|(v, d)| *v += d);
            },
        );
    Ok(())
}
