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
//! Memory layout. The work items are output rows. For its row a thread first copies the
//! cin·kz·ky input rows the row reads into a window (its own buffer, reused from row to row),
//! zero-padded in x to whole 32-wide blocks and zero where the kernel leaves the volume, so the
//! kernel has no border cases; then it computes all channel blocks of the row from that window,
//! which stays in its L2. Copying per row rather than padding the whole input once avoids
//! allocating, and faulting in, a padded copy of every activation (on the MSD Pancreas tile,
//! 12.6 s against 14.8 to 17.0 s in runs of the padded-copy version on the same 2-core machine). The weights are packed once per call as
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
    let window_rows = cin * kernel[0] * kernel[1];
    let window_width = out_dims[2].div_ceil(x_block) * x_block + kernel[2] - 1;
    let packed = packed_weights(conv.weight.data(), cin, cout, kernel);
    let bias: Vec<f32> = match &conv.bias {
        Some(b) => b.data().to_vec(),
        None => vec![0.0; cout],
    };

    let out_vox: usize = out_dims.iter().product();
    let mut out = vec![0f32; cout * out_vox];
    let shared = SharedOutput(out.as_mut_ptr());
    let shared = &shared;
    (0..out_dims[0] * out_dims[1])
        .into_par_iter()
        .for_each_init(Vec::new, |window, row| {
            let (zo, yo) = (row / out_dims[1], row % out_dims[1]);
            window.resize(window_rows * window_width, 0.0);
            fill_window(
                inputs,
                dims,
                kernel,
                conv.padding,
                [zo, yo],
                window_width,
                window,
            );
            for block in 0..cout.div_ceil(CHANNEL_BLOCK) {
                let first = block * CHANNEL_BLOCK;
                let channels = CHANNEL_BLOCK.min(cout - first);
                let tile = Tile {
                    window,
                    window_width,
                    kernel,
                    weights: &packed[first * window_rows * kernel[2]..],
                    bias: &bias[first..first + channels],
                };
                // SAFETY: the CPU runs `isa` (asserted above); this row of these channels is
                // written by this task only (rows and blocks are disjoint), at offsets inside
                // `out` (co < cout, zo < out_dims[0], yo < out_dims[1]); the window's rows
                // hold whole x blocks.
                unsafe {
                    let dest = shared.0.add(
                        (first * out_dims[0] + zo) * out_dims[1] * out_dims[2] + yo * out_dims[2],
                    );
                    match isa {
                        Isa::Avx512 => tile.row_avx512(out_dims[2], dest, out_vox),
                        Isa::Avx2 => tile.row_avx2(out_dims[2], dest, out_vox),
                    }
                }
            }
        });
    out
}

/// The input rows output row (zo, yo) reads, `[ci][kz][ky]` rows of `window_width` values:
/// input row (zo + kz − pz, yo + ky − py) of channel ci (counted through `inputs` in order) at
/// x offset px, zero outside the input.
fn fill_window(
    inputs: &[&[f32]],
    dims: [usize; 3],
    kernel: [usize; 3],
    padding: [usize; 3],
    [zo, yo]: [usize; 2],
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
            for ky in 0..kernel[1] {
                let dest = rows.next().expect("one window row per (ci, kz, ky)");
                let zi = (zo + kz).checked_sub(padding[0]).filter(|&z| z < dims[0]);
                let yi = (yo + ky).checked_sub(padding[1]).filter(|&y| y < dims[1]);
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

/// PyTorch's `[cout, cin, kz, ky, kx]` weights as `[cout / 4][cin][kz][ky][kx][4]`, the four
/// channels of a block side by side; channels past `cout` are zero.
fn packed_weights(weight: &[f32], cin: usize, cout: usize, kernel: [usize; 3]) -> Vec<f32> {
    let taps = cin * kernel.iter().product::<usize>();
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

/// One block of up to 4 output channels over one output row's input window.
struct Tile<'a> {
    /// The `[ci][kz][ky]` input rows of the output row, zero-padded (`fill_window`).
    window: &'a [f32],
    window_width: usize,
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
            for window_row in self.window.chunks_exact(self.window_width) {
                // The row holds x0 + x_block + kx_n − 1 values.
                let row = &window_row[x0..x0 + x_block + kx_n - 1];
                for kx in 0..kx_n {
                    // SAFETY: kx + x_block ≤ row.len(); `w` walks the block's cin·kz·ky·kx
                    // groups of 4 weights, all inside `weights`.
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
