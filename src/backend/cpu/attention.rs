//! Attention ops of the TIS head on the CPU.
//!
//! - `attention`: plain multi-head attention for the few click tokens (self-attention).
//! - `click_cross_attention`: the clicks (few queries) attend over every voxel (N keys). The key
//!   projection is folded into the queries, `q·(LN(x)·Wkᵀ + bk)ᵀ = (q·Wk)·LN(x)ᵀ + q·bk`, and the
//!   value projection applied after the weighted sum, `Σ a·(LN(x)·Wvᵀ + bv) = (Σ a·LN(x))·Wvᵀ + bv`
//!   (the weights sum to one), so no N × d key or value matrix exists. The voxels are split into
//!   blocks; each block yields a partial softmax (running max, sum and weighted sum of LN(x)) and
//!   the partials are merged, as in flash attention.
//! - `label_assignment`: per block of voxels, LN + Q projection, scores over the clicks, softmax,
//!   the label-embedding copy A·Vc, the automatic segmentation's embedding label_mlp(P) computed on
//!   the fly, the α mix, the output projection and the residual: x is read and written once.

use rayon::prelude::*;

use super::gemm::{MatRef, gemm};
use super::linear::TOKEN_BLOCK;
use super::norm::layer_norm_rows;
use super::packed_linear::{Epilogue, PackedLinear, PackedMlp};
use super::vector_math::{exp_in_place, vectorised};
use crate::backend::{LabelAssignment, LayerNorm, Linear, shapes};
use crate::error::Result;
use crate::tensor::Tensor;

/// Keys per group in `keys_by_head`: whole ymm vectors.
const KEY_LANES: usize = 8;

/// The keys regrouped for `attend_rows`: `[head][e][key]`, each scaled by 1/√d_h and the keys
/// zero-padded to a multiple of 8, so that a query's scores over all keys are a sum of d_h
/// whole-vector rows.
fn keys_by_head(keys: &[f32], width: usize, heads: usize) -> Vec<f32> {
    let scale = 1.0 / ((width / heads) as f32).sqrt();
    let padded = (keys.len() / width).div_ceil(KEY_LANES) * KEY_LANES;
    let mut grouped = vec![0f32; width * padded];
    for (k, key) in keys.chunks_exact(width).enumerate() {
        for (e, &v) in key.iter().enumerate() {
            grouped[e * padded + k] = scale * v;
        }
    }
    grouped
}

/// For each query row and head: softmax over the keys of the scaled dot products, then the
/// weighted sum of the value rows. `grouped_keys` comes from `keys_by_head`; `scores` is scratch.
fn attend_rows(
    queries: &[f32],
    grouped_keys: &[f32],
    values: &[f32],
    width: usize,
    heads: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let dh = width / heads;
    let n_keys = values.len() / width;
    let padded = grouped_keys.len() / width;
    vectorised(
        #[inline(always)]
        || {
            // scores[(r·heads + h)·padded + k] = q[r, h]·key[k, h] / √d_h (0 for padding keys)
            scores.clear();
            scores.resize(queries.len() / width * heads * padded, 0.0);
            for (q, row_scores) in queries
                .chunks_exact(width)
                .zip(scores.chunks_exact_mut(heads * padded))
            {
                for (e, (&qe, keys)) in q.iter().zip(grouped_keys.chunks_exact(padded)).enumerate()
                {
                    let h = e / dh;
                    row_scores[h * padded..(h + 1) * padded]
                        .iter_mut()
                        .zip(keys)
                        .for_each(|(s, k)| *s = qe.mul_add(*k, *s));
                }
            }
            // Softmax over each (row, head)'s real keys, the exps over the whole buffer at once.
            for group in scores.chunks_exact_mut(padded) {
                let max = group[..n_keys]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                group.iter_mut().for_each(|s| *s -= max);
            }
            exp_in_place(scores);
            for (o, row_scores) in out
                .chunks_exact_mut(width)
                .zip(scores.chunks_exact(heads * padded))
            {
                for (h, (oh, weights)) in o
                    .chunks_exact_mut(dh)
                    .zip(row_scores.chunks_exact(padded))
                    .enumerate()
                {
                    let weights = &weights[..n_keys];
                    let inv_sum = 1.0 / weights.iter().sum::<f32>();
                    oh.fill(0.0);
                    for (&a, v) in weights.iter().zip(values.chunks_exact(width)) {
                        let a = a * inv_sum;
                        oh.iter_mut()
                            .zip(&v[h * dh..])
                            .for_each(|(o, v)| *o = a.mul_add(*v, *o));
                    }
                }
            }
        },
    )
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (nq, _, width) = shapes::attention(q, k, v, heads)?;
    let mut out = vec![0f32; nq * width];
    attend_rows(
        q.data(),
        &keys_by_head(k.data(), width, heads),
        v.data(),
        width,
        heads,
        &mut Vec::new(),
        &mut out,
    );
    Tensor::new(vec![nq, width], out)
}

/// The softmax state of one block of voxels for every (click, head) column.
struct PartialSoftmax {
    /// Running maximum of the scores per column.
    max: Vec<f32>,
    /// Σ exp(score − max) per column.
    sum: Vec<f32>,
    /// Σ exp(score − max)·LN(x) per column (columns × width).
    weighted: Vec<f32>,
}

impl PartialSoftmax {
    fn merge(mut self, other: PartialSoftmax) -> PartialSoftmax {
        let width = self.weighted.len() / self.max.len();
        for c in 0..self.max.len() {
            let max = self.max[c].max(other.max[c]);
            let (a, b) = ((self.max[c] - max).exp(), (other.max[c] - max).exp());
            self.max[c] = max;
            self.sum[c] = self.sum[c] * a + other.sum[c] * b;
            let row = c * width..(c + 1) * width;
            self.weighted[row.clone()]
                .iter_mut()
                .zip(&other.weighted[row])
                .for_each(|(s, o)| *s = *s * a + o * b);
        }
        self
    }
}

pub fn click_cross_attention(
    x: &Tensor,
    q: &Tensor,
    norm: &LayerNorm<Tensor>,
    key: &Linear<Tensor>,
    value: &Linear<Tensor>,
    heads: usize,
) -> Result<Tensor> {
    let (_, clicks, width) = shapes::click_cross_attention(x, q, norm, key, value, heads)?;
    let dh = width / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let columns = clicks * heads;

    // Fold the key projection into the queries: folded[(c, h)] = scale · q[c, h]·Wk[h rows],
    // offset[(c, h)] = scale · q[c, h]·bk[h].
    let (wk, bk) = (key.weight.data(), key.bias.data());
    let mut folded = vec![0f32; columns * width];
    let mut offset = vec![0f32; columns];
    for c in 0..clicks {
        for h in 0..heads {
            let col = c * heads + h;
            let dest = &mut folded[col * width..(col + 1) * width];
            for e in h * dh..(h + 1) * dh {
                let qe = scale * q.data()[c * width + e];
                dest.iter_mut()
                    .zip(&wk[e * width..])
                    .for_each(|(d, w)| *d += qe * w);
                offset[col] += qe * bk[e];
            }
        }
    }

    let partial = x
        .data()
        .par_chunks(TOKEN_BLOCK * width)
        .map_init(
            || (Vec::new(), Vec::new()),
            |(normed, scores), block| {
                let rows = block.len() / width;
                normed.resize(block.len(), 0.0);
                layer_norm_rows(block, width, norm, normed);
                // scores[r, col] = LN(x_r)·folded[col] + offset[col]
                scores.resize(rows * columns, 0.0);
                gemm(
                    MatRef::new(normed, rows, width),
                    MatRef::new(&folded, columns, width).t(),
                    0.0,
                    scores,
                );
                let mut max = vec![f32::NEG_INFINITY; columns];
                for row in scores.chunks_exact_mut(columns) {
                    for (col, s) in row.iter_mut().enumerate() {
                        *s += offset[col];
                        max[col] = max[col].max(*s);
                    }
                }
                for row in scores.chunks_exact_mut(columns) {
                    row.iter_mut().zip(&max).for_each(|(s, m)| *s -= m);
                }
                exp_in_place(scores);
                let mut sum = vec![0f32; columns];
                for row in scores.chunks_exact(columns) {
                    sum.iter_mut().zip(row).for_each(|(t, s)| *t += s);
                }
                let mut weighted = vec![0f32; columns * width];
                gemm(
                    MatRef::new(scores, rows, columns).t(),
                    MatRef::new(normed, rows, width),
                    0.0,
                    &mut weighted,
                );
                PartialSoftmax { max, sum, weighted }
            },
        )
        .reduce_with(PartialSoftmax::merge)
        .expect("at least one block of tokens");

    // out[c, h rows] = (weighted[(c, h)] / sum) · Wv[h rows]ᵀ + bv[h rows]
    let (wv, bv) = (value.weight.data(), value.bias.data());
    let mut out = vec![0f32; clicks * width];
    for c in 0..clicks {
        for h in 0..heads {
            let col = c * heads + h;
            let mean = &partial.weighted[col * width..(col + 1) * width];
            for e in h * dh..(h + 1) * dh {
                let dot: f32 = mean.iter().zip(&wv[e * width..]).map(|(m, w)| m * w).sum();
                out[c * width + e] = dot / partial.sum[col] + bv[e];
            }
        }
    }
    Tensor::new(vec![clicks, width], out)
}

pub fn label_assignment(
    x: &mut Tensor,
    click_keys: &Tensor,
    click_values: &Tensor,
    probs: &Tensor,
    params: &LabelAssignment<'_, Tensor>,
) -> Result<()> {
    let (_, _, width, classes) =
        shapes::label_assignment(x, click_keys, click_values, probs, params)?;
    let alpha = params.alpha;
    let grouped_keys = keys_by_head(click_keys.data(), width, params.heads);
    let (q, out) = (PackedLinear::new(params.q), PackedLinear::new(params.out));
    let label_mlp = PackedMlp::new(params.label_mlp);
    x.data_mut()
        .par_chunks_mut(TOKEN_BLOCK * width)
        .zip(probs.data().par_chunks(TOKEN_BLOCK * classes))
        .for_each_init(
            || vec![Vec::new(); 6],
            |buffers, (block, block_probs)| {
                let [normed, queries, copied, auto, hidden, scratch] = &mut buffers[..] else {
                    unreachable!("six buffers")
                };
                for buf in [&mut *normed, &mut *queries, &mut *copied, &mut *auto] {
                    buf.resize(block.len(), 0.0);
                }
                layer_norm_rows(block, width, params.norm_q, normed);
                q.apply(normed, Epilogue::Store, queries, scratch);
                attend_rows(
                    queries,
                    &grouped_keys,
                    click_values.data(),
                    width,
                    params.heads,
                    hidden,
                    copied,
                );
                label_mlp.apply(block_probs, Epilogue::Store, auto, hidden, scratch);
                // mixed = (1 − α)·U + α·Va, reusing `copied`
                copied
                    .iter_mut()
                    .zip(auto.iter())
                    .for_each(|(u, va)| *u = (1.0 - alpha) * *u + alpha * va);
                out.apply(copied, Epilogue::Accumulate, block, scratch);
            },
        );
    Ok(())
}
