//! Stride-1 3D convolution as a direct AVX2/FMA kernel: the full-resolution layers of an
//! nnU-Net tile, which carry most of its arithmetic, without im2col's copies.
//!
//! Why this shape. An im2col GEMM copies every input value once per tap into the column buffer
//! and once more into the GEMM's packed panel, and with the 16 to 32 output channels of the
//! first stages each copied value feeds only 16 to 32 multiply-adds. Here every output row
//! (one (z, y) line of x) is computed in register tiles of 4 output channels × 32 consecutive
//! x (4 ymm vectors): 16 accumulators stay in registers over all cin·kz·ky·kx taps, and per
//! tap 4 unaligned loads of the input row and 4 broadcast weights feed 16 FMAs, so the loop
//! runs on the FMA units rather than on loads and stores. That needs AVX-512VL's 32 ymm
//! registers; with AVX2's 16 the tile is 4 × 16 x (8 accumulators), as a 4 × 24 tile spills.
//!
//! Memory layout. The work items are runs of up to 4 consecutive output rows (one z, several y).
//! For its run a thread first copies the input rows the run reads into a window (its own buffer,
//! reused from run to run): for each input channel and kz, the ky rows of every output row of
//! the run, which overlap, so 4 output rows of a 3³ kernel copy 6 rows per (ci, kz) instead of
//! 12. The window is zero-padded in x to whole 32-wide blocks and zero where the kernel leaves
//! the volume, so the kernel has no border cases; a run is only as long as keeps the window
//! within 512 KiB, so that it stays in L2 while every channel block of every row of the run is
//! computed from it. Copying per run rather than padding the whole input once avoids
//! allocating, and faulting in, a padded copy of every activation (on the MSD Pancreas tile,
//! 12.6 s against 14.8 to 17.0 s in runs of the padded-copy version on the same 2-core
//! machine). The weights are packed once per call as
//! `[channel block][ci][kz][ky][kx][4]`, zero for channels past `cout`.
//!
//! The summation order differs from the im2col path only in rounding (f32 throughout).

use std::arch::x86_64::{
    __m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps,
    _mm256_setzero_ps, _mm256_storeu_ps,
};

use rayon::prelude::*;

use super::conv::SharedOutput;
use super::isa::Isa;
use crate::backend::Conv3d;
use crate::backend::shapes::ConvShape;
use crate::tensor::Tensor;

/// Output channels per register tile.
const CHANNEL_BLOCK: usize = 4;
/// At most this many consecutive output rows share one input window…
const MAX_ROWS_PER_WINDOW: usize = 4;
/// …while the window stays within this many bytes (half of a 1 MiB L2).
const WINDOW_BYTES: usize = 512 * 1024;
/// f32 lanes of one ymm register.
const LANES: usize = 8;
/// ymm vectors of consecutive x per register tile: 4 where AVX-512VL gives 32 registers
/// (16 accumulators + 4 inputs + 1 weight), 2 with AVX2's 16 (a 4 × 3 tile would spill).
const X_VECTORS_AVX512: usize = 4;
const X_VECTORS_AVX2: usize = 2;

/// x values per register tile.
fn x_block(isa: Isa) -> usize {
    LANES
        * match isa {
            Isa::Avx2 => X_VECTORS_AVX2,
            Isa::Avx512 => X_VECTORS_AVX512,
        }
}

/// The stride-1 convolution into `cout × out_dims`, bias added, of the `cin` input channels
/// held by `inputs` one after the other (one volume, or the two halves of a concatenation),
/// each `channels × dims`. The caller checked the shapes.
pub fn conv3d_stride1(
    inputs: &[&[f32]],
    conv: &Conv3d<Tensor>,
    shape: &ConvShape,
    isa: Isa,
) -> Vec<f32> {
    let ConvShape {
        cin,
        dims,
        cout,
        out_dims,
        kernel,
    } = *shape;
    assert!(isa.supported(), "this CPU does not run the {isa:?} kernel");
    let values: usize = inputs.iter().map(|input| input.len()).sum();
    assert_eq!(
        values,
        cin * dims.iter().product::<usize>(),
        "inputs hold cin channels"
    );
    let x_block = x_block(isa);
    let window_width = out_dims[2].div_ceil(x_block) * x_block + kernel[2] - 1;
    let rows_per_window = rows_per_window(cin * kernel[0], kernel[1], window_width);
    // Input rows per (ci, kz) in a window: the output rows' ky ranges overlap.
    let group_rows = rows_per_window + kernel[1] - 1;
    // Weights per output channel: one per (ci, kz, ky, kx).
    let taps = cin * kernel.iter().product::<usize>();
    let packed = packed_weights(conv.weight.data(), taps, cout);
    let bias: Vec<f32> = match &conv.bias {
        Some(b) => b.data().to_vec(),
        None => vec![0.0; cout],
    };

    let out_vox: usize = out_dims.iter().product();
    let mut out = vec![0f32; cout * out_vox];
    let shared = SharedOutput(out.as_mut_ptr());
    let shared = &shared;
    let windows_per_plane = out_dims[1].div_ceil(rows_per_window);
    (0..out_dims[0] * windows_per_plane)
        .into_par_iter()
        .for_each_init(Vec::new, |window, item| {
            let (zo, y0) = (
                item / windows_per_plane,
                item % windows_per_plane * rows_per_window,
            );
            window.resize(cin * kernel[0] * group_rows * window_width, 0.0);
            fill_window(
                inputs,
                dims,
                kernel,
                conv.padding,
                [zo, y0],
                group_rows,
                window_width,
                window,
            );
            for (row, yo) in (y0..out_dims[1].min(y0 + rows_per_window)).enumerate() {
                for (block, weights) in packed.chunks_exact(taps * CHANNEL_BLOCK).enumerate() {
                    let first = block * CHANNEL_BLOCK;
                    let channels = CHANNEL_BLOCK.min(cout - first);
                    let tile = Tile {
                        window,
                        window_width,
                        group_rows,
                        row,
                        kernel,
                        weights,
                        bias: &bias[first..first + channels],
                    };
                    // SAFETY: the CPU runs `isa` (asserted above); this row of these channels is
                    // written by this task only (rows and blocks are disjoint), at offsets inside
                    // `out` (co < cout, zo < out_dims[0], yo < out_dims[1]); the window's rows
                    // hold whole x blocks.
                    unsafe {
                        let dest = shared.0.add(
                            (first * out_dims[0] + zo) * out_dims[1] * out_dims[2]
                                + yo * out_dims[2],
                        );
                        match isa {
                            Isa::Avx512 => tile.row_avx512(out_dims[2], dest, out_vox),
                            Isa::Avx2 => tile.row_avx2(out_dims[2], dest, out_vox),
                        }
                    }
                }
            }
        });
    out
}

/// Output rows that share one input window: up to `MAX_ROWS_PER_WINDOW`, as many as keep the
/// window within `WINDOW_BYTES` (so it stays in L2), at least one. `planes` = cin·kz.
fn rows_per_window(planes: usize, ky: usize, window_width: usize) -> usize {
    let row_bytes = planes * window_width * std::mem::size_of::<f32>();
    (WINDOW_BYTES / row_bytes.max(1))
        .saturating_sub(ky - 1)
        .clamp(1, MAX_ROWS_PER_WINDOW)
}

/// The input rows that output rows (zo, y0), (zo, y0 + 1), … read: for each input channel ci
/// (counted through `inputs` in order) and kz, `group_rows` consecutive rows starting at input
/// row (zo + kz − pz, y0 − py), each of `window_width` values from x offset −px; zero outside
/// the input.
#[allow(clippy::too_many_arguments)]
fn fill_window(
    inputs: &[&[f32]],
    dims: [usize; 3],
    kernel: [usize; 3],
    padding: [usize; 3],
    [zo, y0]: [usize; 2],
    group_rows: usize,
    window_width: usize,
    window: &mut [f32],
) {
    let mut rows = window.chunks_exact_mut(window_width);
    let channel_len: usize = dims.iter().product();
    for channel in inputs
        .iter()
        .flat_map(|input| input.chunks_exact(channel_len))
    {
        for kz in 0..kernel[0] {
            for j in 0..group_rows {
                let dest = rows.next().expect("group_rows window rows per (ci, kz)");
                let zi = (zo + kz).checked_sub(padding[0]).filter(|&z| z < dims[0]);
                let yi = (y0 + j).checked_sub(padding[1]).filter(|&y| y < dims[1]);
                let (Some(zi), Some(yi)) = (zi, yi) else {
                    dest.fill(0.0);
                    continue;
                };
                let src = &channel[(zi * dims[1] + yi) * dims[2]..][..dims[2]];
                let (head, rest) = dest.split_at_mut(padding[2]);
                head.fill(0.0);
                rest[..dims[2]].copy_from_slice(src);
                rest[dims[2]..].fill(0.0);
            }
        }
    }
}

/// PyTorch's `[cout, cin, kz, ky, kx]` weights (`taps` = cin·kz·ky·kx per channel) as
/// `[cout / 4][cin][kz][ky][kx][4]`, the four channels of a block side by side; channels past
/// `cout` are zero.
fn packed_weights(weight: &[f32], taps: usize, cout: usize) -> Vec<f32> {
    let blocks = cout.div_ceil(CHANNEL_BLOCK);
    let mut packed = vec![0f32; blocks * taps * CHANNEL_BLOCK];
    for co in 0..cout {
        let (block, lane) = (co / CHANNEL_BLOCK, co % CHANNEL_BLOCK);
        for tap in 0..taps {
            packed[(block * taps + tap) * CHANNEL_BLOCK + lane] = weight[co * taps + tap];
        }
    }
    packed
}

/// One block of up to 4 output channels over one output row of a shared input window.
struct Tile<'a> {
    /// `[ci][kz][group_rows]` input rows, zero-padded (`fill_window`).
    window: &'a [f32],
    window_width: usize,
    group_rows: usize,
    /// Which of the window's output rows: it reads rows `row..row + ky` of each (ci, kz).
    row: usize,
    kernel: [usize; 3],
    /// This block's packed weights, `[cin][kz][ky][kx][4]`.
    weights: &'a [f32],
    /// One bias per channel of the block (1 to 4).
    bias: &'a [f32],
}

impl Tile<'_> {
    /// `row` with 4 × 32 register tiles on 32 ymm registers.
    ///
    /// # Safety
    /// As `row`, and the CPU must have AVX-512F and AVX-512VL.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn row_avx512(&self, width: usize, dest: *mut f32, stride: usize) {
        // SAFETY: as the caller vouches.
        unsafe { self.row::<X_VECTORS_AVX512>(width, dest, stride) }
    }

    /// `row` with 4 × 16 register tiles on AVX2's 16 ymm registers.
    ///
    /// # Safety
    /// As `row`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_avx2(&self, width: usize, dest: *mut f32, stride: usize) {
        // SAFETY: as the caller vouches.
        unsafe { self.row::<X_VECTORS_AVX2>(width, dest, stride) }
    }

    /// The window's output row for the block's channels: `dest[c·channel_stride + x]` for
    /// c < bias.len(), x < width, in register tiles of 4 channels × XV·8 consecutive x. Inlined
    /// into the `target_feature` wrappers above, which choose the register budget.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA, the window rows must hold whole XV·8-wide blocks, and
    /// `dest` must be valid for those writes.
    #[inline(always)]
    unsafe fn row<const XV: usize>(&self, width: usize, dest: *mut f32, channel_stride: usize) {
        let kx_n = self.kernel[2];
        let channels = self.bias.len();
        let x_block = LANES * XV;
        let mut spill = [[[0f32; LANES]; XV]; CHANNEL_BLOCK];
        for x0 in (0..width).step_by(x_block) {
            // SAFETY: the caller vouches for AVX2.
            let mut acc = unsafe { [[_mm256_setzero_ps(); XV]; CHANNEL_BLOCK] };
            for (c, tile) in acc.iter_mut().enumerate().take(channels) {
                // SAFETY: as above.
                *tile = unsafe { [_mm256_set1_ps(self.bias[c]); XV] };
            }
            let mut w = self.weights.as_ptr();
            let (width_w, ky_n) = (self.window_width, self.kernel[1]);
            for group in self.window.chunks_exact(self.group_rows * width_w) {
                // This output row reads rows row..row + ky of each (ci, kz) group.
                let rows = &group[self.row * width_w..(self.row + ky_n) * width_w];
                for window_row in rows.chunks_exact(width_w) {
                    // The row holds x0 + x_block + kx_n − 1 values.
                    let row = &window_row[x0..x0 + x_block + kx_n - 1];
                    for kx in 0..kx_n {
                        // SAFETY: kx + x_block ≤ row.len(); `w` walks the block's
                        // cin·kz·ky·kx groups of 4 weights, all inside `weights`.
                        unsafe {
                            let p = row.as_ptr().add(kx);
                            let s: [__m256; XV] =
                                std::array::from_fn(|v| _mm256_loadu_ps(p.add(v * LANES)));
                            for (c, tile) in acc.iter_mut().enumerate() {
                                let wc = _mm256_broadcast_ss(&*w.add(c));
                                for v in 0..XV {
                                    tile[v] = _mm256_fmadd_ps(wc, s[v], tile[v]);
                                }
                            }
                            w = w.add(CHANNEL_BLOCK);
                        }
                    }
                }
            }
            let valid = x_block.min(width - x0);
            for (c, tile) in acc.iter().enumerate().take(channels) {
                // SAFETY: `spill[c]` holds x_block contiguous floats; the caller vouches for
                // `dest`.
                unsafe {
                    for (lanes, vector) in spill[c].iter_mut().zip(tile) {
                        _mm256_storeu_ps(lanes.as_mut_ptr(), *vector);
                    }
                    let to = dest.add(c * channel_stride + x0);
                    std::ptr::copy_nonoverlapping(spill[c].as_ptr().cast::<f32>(), to, valid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small layers share a window among 4 output rows; wide ones fall back to one row.
    #[test]
    fn windows_stay_within_their_budget() {
        assert_eq!(rows_per_window(16 * 3, 3, 128), MAX_ROWS_PER_WINDOW);
        assert_eq!(rows_per_window(64 * 3, 3, 256), 1);
        for (planes, ky, width) in [(48, 3, 128), (96, 3, 200), (192, 3, 256), (3, 1, 40)] {
            let rows = rows_per_window(planes, ky, width);
            let bytes = planes * (rows + ky - 1) * width * 4;
            assert!(
                rows == 1 || bytes <= WINDOW_BYTES,
                "{planes} planes: {rows} rows, {bytes} B"
            );
        }
    }
}
