//! 3D convolution and nnU-Net's transposed convolution on the CPU, as GEMMs.
//!
//! `conv3d` is an implicit im2col: the output voxels are cut into chunks of whole output rows;
//! per chunk one thread gathers the receptive fields into a column buffer (`Cin·kz·ky·kx` rows ×
//! chunk columns, zero where the window leaves the volume) and multiplies the weights, already in
//! PyTorch's `[Cout, Cin·kz·ky·kx]` order, into the chunk's columns of the output. The buffer is
//! sized to stay in cache (≈ 2 Mi floats), so a 128³ tile never materialises its full im2col.
//! A 1×1×1 stride-1 convolution multiplies the input directly.
//!
//! `conv_transpose3d` has kernel = stride (no overlap): one GEMM `Wᵀ·x` gives every output
//! voxel's value, which is then scattered to its place, one output channel per task.

use rayon::prelude::*;

use super::gemm::{MatRef, gemm, gemm_raw};
use crate::backend::{Conv3d, ConvTranspose3d, shapes};
use crate::error::Result;
use crate::tensor::Tensor;

/// Target size of one chunk's column buffer, in floats.
const COLUMN_BUFFER_FLOATS: usize = 1 << 21;

/// A pointer to the output shared by the chunk tasks; each task writes only its own columns.
struct SharedOutput(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output (see `conv3d`).
unsafe impl Sync for SharedOutput {}

pub fn conv3d(x: &Tensor, conv: &Conv3d<Tensor>) -> Result<Tensor> {
    let shapes::ConvShape {
        cin,
        dims,
        cout,
        out_dims,
        kernel,
    } = shapes::conv3d(x, conv)?;
    let out_vox: usize = out_dims.iter().product();
    let taps = cin * kernel.iter().product::<usize>();
    let mut out = vec![0f32; cout * out_vox];
    let weights = MatRef::new(conv.weight.data(), cout, taps);

    let pointwise = kernel == [1, 1, 1] && conv.stride == [1, 1, 1] && conv.padding == [0, 0, 0];
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
    Tensor::new(vec![cout, out_dims[0], out_dims[1], out_dims[2]], out)
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
                        for (xo, v) in line.iter_mut().enumerate() {
                            *v = (xo * sx + kx)
                                .checked_sub(px)
                                .and_then(|xi| src.get(xi))
                                .copied()
                                .unwrap_or(0.0);
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
    let in_vox: usize = dims.iter().product();
    // values[(co, tap), i] = Σ_ci W[ci, co, tap] · x[ci, i]: Wᵀ read in place (row stride 1),
    // one output channel's taps per task.
    let mut values = vec![0f32; cout * taps * in_vox];
    values
        .par_chunks_mut(taps * in_vox)
        .enumerate()
        .for_each(|(co, dest)| {
            let w_t = MatRef::strided(&conv.weight.data()[co * taps..], taps, cin, 1, cout * taps);
            gemm(w_t, MatRef::new(x.data(), cin, in_vox), 0.0, dest);
        });

    let out_vox: usize = out_dims.iter().product();
    let mut out = vec![0f32; cout * out_vox];
    out.par_chunks_mut(out_vox)
        .enumerate()
        .for_each(|(co, channel)| {
            let bias = conv.bias.as_ref().map_or(0.0, |b| b.data()[co]);
            for tap in 0..taps {
                let (az, ay, ax) = (tap / (s[1] * s[2]), (tap / s[2]) % s[1], tap % s[2]);
                let src = &values[(co * taps + tap) * in_vox..][..in_vox];
                for (i, &v) in src.iter().enumerate() {
                    let (zi, yi, xi) = (
                        i / (dims[1] * dims[2]),
                        (i / dims[2]) % dims[1],
                        i % dims[2],
                    );
                    let o = ((zi * s[0] + az) * out_dims[1] + yi * s[1] + ay) * out_dims[2]
                        + xi * s[2]
                        + ax;
                    channel[o] = v + bias;
                }
            }
        });
    Tensor::new(vec![cout, out_dims[0], out_dims[1], out_dims[2]], out)
}
