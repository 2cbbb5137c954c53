//! Attention ops of the TIS head on the CPU.
//!
//! - `attention`: plain multi-head attention for the few click tokens (self-attention), and the
//!   label copy's attention of every voxel over the clicks: per head, two small GEMMs on
//!   packed_linear.rs's kernel around a softmax (`KeyValueHeads`).
//! - `click_cross_attention`: the clicks (few queries) attend over every voxel (N keys). The key
//!   projection is folded into the queries, `q·(LN(x)·Wkᵀ + bk)ᵀ = (q·Wk)·LN(x)ᵀ + q·bk`, and the
//!   value projection applied after the weighted sum, `Σ a·(LN(x)·Wvᵀ + bv) = (Σ a·LN(x))·Wvᵀ + bv`
//!   (the weights sum to one), so no N × d key or value matrix exists. The voxels are split into
//!   blocks; in each the scores are one GEMM of LN(x) with the folded queries, and the block
//!   yields a partial softmax (running max, sum and weighted sum of LN(x)) and
//!   the partials are merged, as in flash attention.
//! - `label_assignment`: per block of voxels, LN + Q projection, scores over the clicks, softmax,
//!   the label-embedding copy A·Vc, the α mix with the automatic segmentation's embedding Va
//!   (given: the head computes label_mlp(P) once a click), the output projection and the
//!   residual: x is read and written once.

use rayon::prelude::*;

use super::gemm::{MatRef, gemm};
use super::linear::TOKEN_BLOCK;
use super::norm::layer_norm_rows;
use super::packed_linear::{Epilogue, PANEL, PackedLinear};
use super::vector_math::{exp_in_place, vectorised};
use crate::backend::{LabelAssignment, LayerNorm, Linear, shapes};
use crate::error::Result;
use crate::tensor::Tensor;

/// The keys and values of a few tokens (the clicks) split by head into linear maps for
/// packed_linear.rs's kernel, so that attending from a block of query rows is two small GEMMs
/// per head around a softmax: scores_h = q_h·(K_h/√d_h)ᵀ, then U_h = softmax(scores_h)·V_h.
struct KeyValueHeads {
    /// Per head: `[padded keys, d_h]`, K_h/√d_h, zero rows past the real keys.
    keys: Vec<PackedLinear>,
    /// Per head: `[d_h, keys]`, V_hᵀ.
    values: Vec<PackedLinear>,
    keys_count: usize,
    /// The keys rounded up to whole kernel panels (the score rows' width per head).
    padded: usize,
    width: usize,
}

impl KeyValueHeads {
    fn new(keys: &[f32], values: &[f32], width: usize, heads: usize) -> Self {
        let dh = width / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let keys_count = keys.len() / width;
        let padded = keys_count.div_ceil(PANEL) * PANEL;
        let head = |h: usize| {
            let mut key_rows = vec![0f32; padded * dh];
            let mut value_columns = vec![0f32; dh * keys_count];
            for k in 0..keys_count {
                for e in 0..dh {
                    key_rows[k * dh + e] = scale * keys[k * width + h * dh + e];
                    value_columns[e * keys_count + k] = values[k * width + h * dh + e];
                }
            }
            (
                PackedLinear::from_weight(&key_rows, &vec![0.0; padded]),
                PackedLinear::from_weight(&value_columns, &vec![0.0; dh]),
            )
        };
        let (keys, values) = (0..heads).map(head).unzip();
        KeyValueHeads {
            keys,
            values,
            keys_count,
            padded,
            width,
        }
    }

    /// Multi-head attention of the rows of `queries` (heads concatenated) into `out`;
    /// `scores` and `scratch` are reused buffers.
    fn attend(
        &self,
        queries: &[f32],
        scores: &mut Vec<f32>,
        scratch: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let (width, padded, keys) = (self.width, self.padded, self.keys_count);
        let (rows, heads) = (queries.len() / width, self.keys.len());
        let dh = width / heads;
        let row_scores = heads * padded;
        scores.resize(rows * row_scores, 0.0);
        for (h, key_map) in self.keys.iter().enumerate() {
            let (q, s) = (&queries[h * dh..], &mut scores[h * padded..]);
            key_map.apply_strided(q, width, rows, Epilogue::Store, s, row_scores, scratch);
        }
        // Softmax over each (row, head)'s real keys; the exps over the whole buffer at once.
        vectorised(
            #[inline(always)]
            || {
                for group in scores.chunks_exact_mut(padded) {
                    let max = group[..keys]
                        .iter()
                        .copied()
                        .fold(f32::NEG_INFINITY, f32::max);
                    group[..keys].iter_mut().for_each(|s| *s -= max);
                }
            },
        );
        exp_in_place(scores);
        vectorised(
            #[inline(always)]
            || {
                for group in scores.chunks_exact_mut(padded) {
                    let inv_sum = 1.0 / group[..keys].iter().sum::<f32>();
                    group[..keys].iter_mut().for_each(|s| *s *= inv_sum);
                }
            },
        );
        for (h, value_map) in self.values.iter().enumerate() {
            let (a, o) = (&scores[h * padded..], &mut out[h * dh..]);
            value_map.apply_strided(a, row_scores, rows, Epilogue::Store, o, width, scratch);
        }
    }
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (nq, _, width) = shapes::attention(q, k, v, heads)?;
    let mut out = vec![0f32; nq * width];
    KeyValueHeads::new(k.data(), v.data(), width, heads).attend(
        q.data(),
        &mut Vec::new(),
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

    let score_map = PackedLinear::from_weight(&folded, &offset);
    let partial = x
        .data()
        .par_chunks(TOKEN_BLOCK * width)
        .map_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(normed, scores, scratch), block| {
                let rows = block.len() / width;
                normed.resize(block.len(), 0.0);
                layer_norm_rows(block, width, norm, normed);
                // scores[r, col] = LN(x_r)·folded[col] + offset[col]
                scores.resize(rows * columns, 0.0);
                score_map.apply(normed, Epilogue::Store, scores, scratch);
                let mut max = vec![f32::NEG_INFINITY; columns];
                for row in scores.chunks_exact(columns) {
                    max.iter_mut().zip(row).for_each(|(m, s)| *m = m.max(*s));
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
    auto_embedding: &Tensor,
    params: &LabelAssignment<'_, Tensor>,
) -> Result<()> {
    let (_, _, width) =
        shapes::label_assignment(x, click_keys, click_values, auto_embedding, params)?;
    let alpha = params.alpha;
    let clicks = KeyValueHeads::new(click_keys.data(), click_values.data(), width, params.heads);
    let (q, out) = (PackedLinear::new(params.q), PackedLinear::new(params.out));
    x.data_mut()
        .par_chunks_mut(TOKEN_BLOCK * width)
        .zip(auto_embedding.data().par_chunks(TOKEN_BLOCK * width))
        .for_each_init(
            || vec![Vec::new(); 5],
            |buffers, (block, auto)| {
                let [normed, queries, copied, scores, scratch] = &mut buffers[..] else {
                    unreachable!("five buffers")
                };
                for buf in [&mut *normed, &mut *queries, &mut *copied] {
                    buf.resize(block.len(), 0.0);
                }
                layer_norm_rows(block, width, params.norm_q, normed);
                q.apply(normed, Epilogue::Store, queries, scratch);
                clicks.attend(queries, scores, scratch, copied);
                // mixed = (1 − α)·U + α·Va, reusing `copied`
                copied
                    .iter_mut()
                    .zip(auto)
                    .for_each(|(u, va)| *u = (1.0 - alpha) * *u + alpha * va);
                out.apply(copied, Epilogue::Accumulate, block, scratch);
            },
        );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

    /// Multi-head attention by its definition, in f64.
    fn attention_by_definition(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Vec<f64> {
        let width = q.shape()[1];
        let dh = width / heads;
        let (q, k, v) = (q.data(), k.data(), v.data());
        let keys = k.len() / width;
        let mut out = vec![0f64; q.len()];
        for (r, o) in out.chunks_exact_mut(width).enumerate() {
            for h in 0..heads {
                let dims = h * dh..(h + 1) * dh;
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        dims.clone()
                            .map(|e| q[r * width + e] as f64 * k[j * width + e] as f64)
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                for e in dims {
                    o[e] = (0..keys)
                        .map(|j| weights[j] / sum * v[j * width + e] as f64)
                        .sum();
                }
            }
        }
        out
    }

    /// One key, a partial panel of keys and more keys than one panel holds.
    #[test]
    fn attention_matches_the_definition() {
        let mut rng = Rng::new(3);
        for (queries, keys, width, heads) in [(1, 1, 16, 2), (5, 10, 32, 4), (13, 21, 64, 8)] {
            let q = rng.tensor(&[queries, width], 2.0);
            let k = rng.tensor(&[keys, width], 2.0);
            let v = rng.tensor(&[keys, width], 1.0);
            let got = attention(&q, &k, &v, heads).unwrap();
            let want = attention_by_definition(&q, &k, &v, heads);
            for (i, (g, w)) in got.data().iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{queries} queries, {keys} keys, {heads} heads: value {i} is {g}, want {w}"
                );
            }
        }
    }
}
