//! 3D convolution and nnU-Net's transposed convolution on the CPU.
//!
//! `conv3d` with stride 1 (all but the downsampling convolutions) runs the direct AVX2/FMA
//! kernel of `conv_direct.rs` where the CPU has it. Everything else is an implicit im2col: the
//! output voxels are cut into chunks of whole output rows; per chunk one thread gathers the
//! receptive fields into a column buffer (`Cin·kz·ky·kx` rows × chunk columns, zero where the
//! window leaves the volume) and multiplies the weights, already in PyTorch's
//! `[Cout, Cin·kz·ky·kx]` order, into the chunk's columns of the output. The buffer is
//! sized to stay in cache (≈ 2 Mi floats), so a 128³ tile never materialises its full im2col.
//! A 1×1×1 stride-1 convolution multiplies the input directly.
//!
//! `conv_transpose3d` has kernel = stride (no overlap): a GEMM `Wᵀ·x` over a chunk of whole
//! input rows gives every output voxel of those rows (Cout·taps × chunk columns, in a buffer
//! of the same cache-sized budget), which is then scattered to its place.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::conv_direct;
use super::gemm::{MatRef, gemm, gemm_raw};
#[cfg(target_arch = "x86_64")]
use super::isa::Isa;
use crate::backend::{Conv3d, ConvTranspose3d, shapes};
use crate::error::Result;
use crate::tensor::Tensor;

/// Target size of one chunk's column buffer, in floats.
const COLUMN_BUFFER_FLOATS: usize = 1 << 21;

/// A pointer to the output shared by parallel tasks that each write their own disjoint part.
pub(super) struct SharedOutput(pub(super) *mut f32);
// SAFETY: every user hands each task a disjoint range of the output (see `conv3d_im2col` and
// `conv_direct::conv3d_stride1`).
unsafe impl Sync for SharedOutput {}

pub fn conv3d(x: &Tensor, conv: &Conv3d<Tensor>) -> Result<Tensor> {
    let shape = shapes::conv3d(x, conv)?;
    let out = match direct(&[x.data()], conv, &shape) {
        Some(out) => out,
        None => conv3d_im2col(x, conv, &shape),
    };
    let [d, h, w] = shape.out_dims;
    Tensor::new(vec![shape.cout, d, h, w], out)
}

/// `conv3d` of `[a; b]`; the direct kernel reads both in place, im2col concatenates first.
pub fn conv3d_on_concat(a: &Tensor, b: &Tensor, conv: &Conv3d<Tensor>) -> Result<Tensor> {
    let shape = shapes::conv3d_on_concat(a, b, conv)?;
    let out = match direct(&[a.data(), b.data()], conv, &shape) {
        Some(out) => out,
        None => conv3d_im2col(&super::volume::concat_channels(a, b)?, conv, &shape),
    };
    let [d, h, w] = shape.out_dims;
    Tensor::new(vec![shape.cout, d, h, w], out)
}

/// The direct kernel's output for the channels of `inputs` one after the other, where it runs:
/// stride 1, a kernel larger than 1×1×1, an x86-64 CPU with AVX2 and FMA.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn direct(inputs: &[&[f32]], conv: &Conv3d<Tensor>, shape: &shapes::ConvShape) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if conv.stride == [1, 1, 1]
        && shape.kernel != [1, 1, 1]
        && let Some(isa) = Isa::detect()
    {
        return Some(conv_direct::conv3d_stride1(inputs, conv, shape, isa));
    }
    None
}

/// `conv3d` as im2col GEMMs, bias added: any stride, and the fallback where the direct kernel
/// cannot run.
fn conv3d_im2col(x: &Tensor, conv: &Conv3d<Tensor>, shape: &shapes::ConvShape) -> Vec<f32> {
    let shapes::ConvShape {
        cin,
        dims,
        cout,
        out_dims,
        kernel,
    } = *shape;
    let pointwise = kernel == [1, 1, 1] && conv.stride == [1, 1, 1] && conv.padding == [0, 0, 0];
    let out_vox: usize = out_dims.iter().product();
    let taps = cin * kernel.iter().product::<usize>();
    let mut out = vec![0f32; cout * out_vox];
    let weights = MatRef::new(conv.weight.data(), cout, taps);
    let row_len = out_dims[2];
    let rows = out_dims[0] * out_dims[1];
    let rows_per_chunk = (COLUMN_BUFFER_FLOATS / taps / row_len).clamp(1, rows);
    let shared = SharedOutput(out.as_mut_ptr());
    let shared = &shared;

    (0..rows.div_ceil(rows_per_chunk))
        .into_par_iter()
        .for_each_init(Vec::new, |columns, chunk| {
            let first_row = chunk * rows_per_chunk;
            let chunk_rows = rows_per_chunk.min(rows - first_row);
            let (v0, cols) = (first_row * row_len, chunk_rows * row_len);
            let input = if pointwise {
                MatRef::strided(&x.data()[v0..], cin, cols, out_vox, 1)
            } else {
                columns.resize(taps * cols, 0.0);
                gather_columns(
                    x.data(),
                    cin,
                    dims,
                    kernel,
                    conv,
                    out_dims,
                    first_row,
                    chunk_rows,
                    columns,
                );
                MatRef::new(columns, taps, cols)
            };
            // SAFETY: this chunk writes only columns v0..v0+cols of each of the cout rows of
            // `out` (row stride out_vox); chunks cover disjoint column ranges.
            unsafe { gemm_raw(weights, input, 0.0, shared.0.add(v0), out_vox) };
        });

    if let Some(bias) = &conv.bias {
        out.par_chunks_mut(out_vox)
            .zip(bias.data())
            .for_each(|(channel, &b)| channel.iter_mut().for_each(|v| *v += b));
    }
    out
}

/// Fills `columns` (taps × chunk columns) with the receptive fields of output rows
/// `first_row .. first_row + chunk_rows` (a row is one (z, y) line of x).
#[allow(clippy::too_many_arguments)]
fn gather_columns(
    input: &[f32],
    cin: usize,
    dims: [usize; 3],
    kernel: [usize; 3],
    conv: &Conv3d<Tensor>,
    out_dims: [usize; 3],
    first_row: usize,
    chunk_rows: usize,
    columns: &mut [f32],
) {
    let [sz, sy, sx] = conv.stride;
    let [pz, py, px] = conv.padding;
    let wo = out_dims[2];
    let cols = chunk_rows * wo;
    let mut tap = 0;
    for ci in 0..cin {
        let channel = &input[ci * dims[0] * dims[1] * dims[2]..];
        for kz in 0..kernel[0] {
            for ky in 0..kernel[1] {
                for kx in 0..kernel[2] {
                    let dest = &mut columns[tap * cols..(tap + 1) * cols];
                    for r in 0..chunk_rows {
                        let (zo, yo) =
                            ((first_row + r) / out_dims[1], (first_row + r) % out_dims[1]);
                        let line = &mut dest[r * wo..(r + 1) * wo];
                        let zi = (zo * sz + kz).checked_sub(pz).filter(|&z| z < dims[0]);
                        let yi = (yo * sy + ky).checked_sub(py).filter(|&y| y < dims[1]);
                        let (Some(zi), Some(yi)) = (zi, yi) else {
                            line.fill(0.0);
                            continue;
                        };
                        let src = &channel[(zi * dims[1] + yi) * dims[2]..][..dims[2]];
                        // Outputs xo in lo..hi read inside the row (xi = xo·sx + kx − px).
                        let lo = px.saturating_sub(kx).div_ceil(sx).min(wo);
                        let hi = (dims[2] + px).saturating_sub(kx).div_ceil(sx).clamp(lo, wo);
                        line[..lo].fill(0.0);
                        line[hi..].fill(0.0);
                        if lo == hi {
                            continue;
                        }
                        let first = lo * sx + kx - px;
                        if sx == 1 {
                            line[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            let taken = src[first..].iter().step_by(sx);
                            line[lo..hi]
                                .iter_mut()
                                .zip(taken)
                                .for_each(|(v, &s)| *v = s);
                        }
                    }
                    tap += 1;
                }
            }
        }
    }
}

pub fn conv_transpose3d(x: &Tensor, conv: &ConvTranspose3d<Tensor>) -> Result<Tensor> {
    let shapes::ConvShape {
        cin,
        dims,
        cout,
        out_dims,
        ..
    } = shapes::conv_transpose3d(x, conv)?;
    let s = conv.stride;
    let taps: usize = s.iter().product();
    let (in_vox, out_vox): (usize, usize) = (dims.iter().product(), out_dims.iter().product());
    // Wᵀ read in place: row (co, tap) = co·taps + tap, column ci, from W[ci, co, tap].
    let w_t = MatRef::strided(conv.weight.data(), cout * taps, cin, 1, cout * taps);
    let bias = |co: usize| conv.bias.as_ref().map_or(0.0, |b| b.data()[co]);
    let (rows, row_len) = (dims[0] * dims[1], dims[2]);
    let rows_per_chunk = (COLUMN_BUFFER_FLOATS / (cout * taps) / row_len).clamp(1, rows);
    let mut out = vec![0f32; cout * out_vox];
    let shared = SharedOutput(out.as_mut_ptr());
    let shared = &shared;

    (0..rows.div_ceil(rows_per_chunk))
        .into_par_iter()
        .for_each_init(Vec::new, |values, chunk| {
            let first_row = chunk * rows_per_chunk;
            let chunk_rows = rows_per_chunk.min(rows - first_row);
            let (v0, cols) = (first_row * row_len, chunk_rows * row_len);
            values.resize(cout * taps * cols, 0.0);
            let input = MatRef::strided(&x.data()[v0..], cin, cols, in_vox, 1);
            gemm(w_t, input, 0.0, values);
            for (co_tap, from) in values.chunks_exact(cols).enumerate() {
                let (co, tap) = (co_tap / taps, co_tap % taps);
                let (az, ay, ax) = (tap / (s[1] * s[2]), (tap / s[2]) % s[1], tap % s[2]);
                // Input row (zi, yi) lands on output row (zi·s0 + az, yi·s1 + ay), every
                // s2-th x from ax.
                for (r, line) in from.chunks_exact(row_len).enumerate() {
                    let (zi, yi) = ((first_row + r) / dims[1], (first_row + r) % dims[1]);
                    let o = ((zi * s[0] + az) * out_dims[1] + yi * s[1] + ay) * out_dims[2] + ax;
                    for (xi, &v) in line.iter().enumerate() {
                        // SAFETY: co < cout and o + xi·s2 < out_vox; the output voxels of
                        // this chunk's input rows belong to no other chunk.
                        unsafe { *shared.0.add(co * out_vox + o + xi * s[2]) = v + bias(co) };
                    }
                }
            }
        });
    Tensor::new(vec![cout, out_dims[0], out_dims[1], out_dims[2]], out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

    /// The definition, one output value at a time.
    fn conv3d_by_definition(x: &Tensor, conv: &Conv3d<Tensor>) -> Vec<f32> {
        let (s, w) = (x.shape(), conv.weight.shape());
        let (cin, dims, cout, k) = (s[0], [s[1], s[2], s[3]], w[0], [w[2], w[3], w[4]]);
        let out_dims: [usize; 3] =
            std::array::from_fn(|a| (dims[a] + 2 * conv.padding[a] - k[a]) / conv.stride[a] + 1);
        let mut out = Vec::new();
        for co in 0..cout {
            for (zo, yo, xo) in (0..out_dims[0]).flat_map(|z| {
                (0..out_dims[1]).flat_map(move |y| (0..out_dims[2]).map(move |x| (z, y, x)))
            }) {
                let mut acc = conv.bias.as_ref().map_or(0.0, |b| b.data()[co]) as f64;
                for ci in 0..cin {
                    for (kz, ky, kx) in (0..k[0]).flat_map(|z| {
                        (0..k[1]).flat_map(move |y| (0..k[2]).map(move |x| (z, y, x)))
                    }) {
                        let at = |o: usize, kk: usize, a: usize| {
                            (o * conv.stride[a] + kk)
                                .checked_sub(conv.padding[a])
                                .filter(|&i| i < dims[a])
                        };
                        if let (Some(zi), Some(yi), Some(xi)) =
                            (at(zo, kz, 0), at(yo, ky, 1), at(xo, kx, 2))
                        {
                            let v = x.data()[((ci * dims[0] + zi) * dims[1] + yi) * dims[2] + xi];
                            let wv = w_at(&conv.weight, [co, ci, kz, ky, kx]);
                            acc += v as f64 * wv as f64;
                        }
                    }
                }
                out.push(acc as f32);
            }
        }
        out
    }

    fn w_at(w: &Tensor, [co, ci, kz, ky, kx]: [usize; 5]) -> f32 {
        let s = w.shape();
        w.data()[(((co * s[1] + ci) * s[2] + kz) * s[3] + ky) * s[4] + kx]
    }

    #[test]
    fn conv3d_on_concat_is_conv3d_of_the_concatenation() {
        let mut rng = Rng::new(9);
        for (kernel, stride, padding) in [
            ([3, 3, 3], [1, 1, 1], [1, 1, 1]),
            ([1, 3, 3], [1, 2, 2], [0, 1, 1]),
        ] {
            let (a, b) = (
                rng.tensor(&[2, 4, 5, 37], 1.0),
                rng.tensor(&[3, 4, 5, 37], 1.0),
            );
            let conv = Conv3d {
                weight: rng.tensor(&[4, 5, kernel[0], kernel[1], kernel[2]], 0.5),
                bias: Some(rng.tensor(&[4], 0.5)),
                stride,
                padding,
            };
            let joined = super::super::volume::concat_channels(&a, &b).unwrap();
            let want = conv3d(&joined, &conv).unwrap();
            let got = conv3d_on_concat(&a, &b, &conv).unwrap();
            assert_eq!(got.shape(), want.shape());
            assert_eq!(
                got.data(),
                want.data(),
                "{kernel:?} {stride:?}: same kernel, same sums"
            );
        }
        let short = rng.tensor(&[2, 4, 5, 36], 1.0);
        let conv = Conv3d {
            weight: rng.tensor(&[4, 4, 3, 3, 3], 0.5),
            bias: None,
            stride: [1, 1, 1],
            padding: [1, 1, 1],
        };
        let err = conv3d_on_concat(&short, &rng.tensor(&[2, 4, 5, 37], 1.0), &conv);
        assert!(err.unwrap_err().to_string().contains("cannot concatenate"));
    }

    #[test]
    fn conv_transpose3d_matches_the_definition() {
        let mut rng = Rng::new(8);
        // The last case has more input rows than one chunk holds (2 Mi floats / 64 / 8).
        for (dims, stride, cin, cout) in [
            ([3, 4, 5], [2, 2, 2], 3, 2),
            ([2, 3, 7], [1, 2, 2], 4, 3),
            ([70, 64, 8], [2, 2, 2], 2, 8),
        ] {
            let x = rng.tensor(&[cin, dims[0], dims[1], dims[2]], 1.0);
            let conv = ConvTranspose3d {
                weight: rng.tensor(&[cin, cout, stride[0], stride[1], stride[2]], 0.5),
                bias: Some(rng.tensor(&[cout], 0.5)),
                stride,
            };
            let got = conv_transpose3d(&x, &conv).unwrap();
            let out_dims: [usize; 3] = std::array::from_fn(|a| dims[a] * stride[a]);
            assert_eq!(got.shape(), [cout, out_dims[0], out_dims[1], out_dims[2]]);
            for (i, &g) in got.data().iter().enumerate() {
                let co = i / out_dims.iter().product::<usize>();
                let (z, y, xo) = (
                    i / (out_dims[1] * out_dims[2]) % out_dims[0],
                    i / out_dims[2] % out_dims[1],
                    i % out_dims[2],
                );
                let at = |ci: usize| {
                    ((ci * dims[0] + z / stride[0]) * dims[1] + y / stride[1]) * dims[2]
                        + xo / stride[2]
                };
                let (az, ay, ax) = (z % stride[0], y % stride[1], xo % stride[2]);
                let want = conv.bias.as_ref().unwrap().data()[co]
                    + (0..cin)
                        .map(|ci| x.data()[at(ci)] * w_at(&conv.weight, [ci, co, az, ay, ax]))
                        .sum::<f32>();
                assert!(
                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{dims:?} {stride:?}: output {i} is {g}, expected {want}"
                );
            }
        }
    }

    #[test]
    fn conv3d_matches_the_definition_at_every_border() {
        let mut rng = Rng::new(7);
        // (input extent, kernel, stride, padding): nnU-Net's cases and odd ones (stride 3,
        // padding wider than the kernel's half, windows that leave a row entirely).
        let cases = [
            ([5, 7, 9], [3, 3, 3], [1, 1, 1], [1, 1, 1]),
            ([5, 7, 9], [1, 3, 3], [1, 2, 2], [0, 1, 1]),
            ([6, 8, 10], [3, 3, 3], [2, 2, 2], [1, 1, 1]),
            ([4, 5, 11], [1, 1, 5], [1, 1, 3], [0, 0, 2]),
            ([3, 4, 3], [3, 3, 3], [1, 1, 1], [2, 2, 3]),
            ([4, 6, 6], [1, 1, 1], [2, 2, 2], [0, 0, 0]),
            ([4, 6, 6], [1, 1, 1], [1, 1, 1], [0, 0, 0]),
            ([3, 5, 53], [3, 3, 3], [1, 1, 1], [1, 1, 1]),
            ([2, 3, 48], [1, 3, 3], [1, 1, 1], [0, 1, 1]),
            ([3, 3, 30], [1, 1, 1], [1, 1, 1], [1, 1, 1]),
            ([2, 11, 20], [3, 3, 3], [1, 1, 1], [1, 1, 1]),
        ];
        for (dims, kernel, stride, padding) in cases {
            let (cin, cout) = (3, 6);
            let x = rng.tensor(&[cin, dims[0], dims[1], dims[2]], 1.0);
            let conv = Conv3d {
                weight: rng.tensor(&[cout, cin, kernel[0], kernel[1], kernel[2]], 0.5),
                bias: Some(rng.tensor(&[cout], 0.5)),
                stride,
                padding,
            };
            let want = conv3d_by_definition(&x, &conv);
            // What `conv3d` chooses, the im2col path every case can take, and each direct
            // kernel this CPU runs.
            let shape = shapes::conv3d(&x, &conv).unwrap();
            let mut paths = vec![
                ("conv3d", conv3d(&x, &conv).unwrap().data().to_vec()),
                ("im2col", conv3d_im2col(&x, &conv, &shape)),
            ];
            #[cfg(target_arch = "x86_64")]
            for isa in [Isa::Avx2, Isa::Avx512] {
                if stride == [1, 1, 1] && isa.supported() {
                    let out = conv_direct::conv3d_stride1(&[x.data()], &conv, &shape, isa);
                    paths.push((if isa == Isa::Avx2 { "avx2" } else { "avx512" }, out));
                }
            }
            for (path, got) in paths {
                assert_eq!(
                    got.len(),
                    want.len(),
                    "{path} {dims:?} {kernel:?} {stride:?}"
                );
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{path} {dims:?} {kernel:?} {stride:?} {padding:?}: output {i} is {g}, \
                         expected {w}"
                    );
                }
            }
        }
    }
}
