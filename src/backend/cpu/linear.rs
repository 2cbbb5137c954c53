//! Dense token ops on the CPU: Linear, the two-layer MLP and the pre-norm feed-forward
//! sub-layer, on packed_linear.rs's kernels (weights packed once per call). Tokens are cut into
//! blocks of `TOKEN_BLOCK` rows, one block per task, so the hidden activations of an MLP live
//! only in a per-task buffer (never N × ffn_dim at once).

use rayon::prelude::*;

use super::norm::layer_norm_rows;
use super::packed_linear::{Epilogue, PackedLinear, PackedMlp};
use crate::backend::{FeedForward, Linear, Mlp, shapes};
use crate::error::Result;
use crate::tensor::Tensor;

/// Rows per task for token-wise work: a multiple of both kernels' register tiles (12 and 6
/// rows), and small enough that a block's hidden FFN activations (192 × 512 f32) stay in L2.
pub const TOKEN_BLOCK: usize = 192;

pub fn linear(x: &Tensor, linear: &Linear<Tensor>) -> Result<Tensor> {
    let (rows, width) = shapes::tokens(x, "linear")?;
    let out_width = shapes::linear(linear, width)?;
    let packed = PackedLinear::new(linear);
    let mut out = vec![0f32; rows * out_width];
    out.par_chunks_mut(TOKEN_BLOCK * out_width)
        .zip(x.data().par_chunks(TOKEN_BLOCK * width))
        .for_each_init(Vec::new, |scratch, (dest, src)| {
            packed.apply(src, Epilogue::Store, dest, scratch)
        });
    Tensor::new(vec![rows, out_width], out)
}

pub fn mlp(x: &Tensor, mlp: &Mlp<Tensor>) -> Result<Tensor> {
    let (rows, width) = shapes::tokens(x, "mlp")?;
    let (_, out_width) = shapes::mlp(mlp, width)?;
    let packed = PackedMlp::new(mlp);
    let mut out = vec![0f32; rows * out_width];
    out.par_chunks_mut(TOKEN_BLOCK * out_width)
        .zip(x.data().par_chunks(TOKEN_BLOCK * width))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(hidden, scratch), (dest, src)| {
                packed.apply(src, Epilogue::Store, dest, hidden, scratch)
            },
        );
    Tensor::new(vec![rows, out_width], out)
}

pub fn feed_forward(x: &mut Tensor, ffn: &FeedForward<Tensor>) -> Result<()> {
    let (_, width, _) = shapes::feed_forward(x, ffn)?;
    let packed = PackedMlp::new(&ffn.mlp);
    x.data_mut()
        .par_chunks_mut(TOKEN_BLOCK * width)
        .for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(normed, hidden, scratch), block| {
                normed.resize(block.len(), 0.0);
                layer_norm_rows(block, width, &ffn.norm, normed);
                packed.apply(normed, Epilogue::Accumulate, block, hidden, scratch);
            },
        );
    Ok(())
}
