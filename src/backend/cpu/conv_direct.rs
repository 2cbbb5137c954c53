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
//! Memory layout. The input is first copied into a zero-padded volume whose rows are wide
//! enough for whole 24-wide blocks, so the kernel has no border cases. The weights are packed
//! once per call as `[channel block][ci][kz][ky][kx][4]`, zero for channels past `cout`. The
//! work items are output rows; one thread computes all channel blocks of its row one after the
//! other, while the row's cin·kz·ky input rows stay in its L2.
//!
//! The summation order differs from the im2col path only in rounding (f32 throughout).

use std::arch::x86_64::{
    __m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps,
    _mm256_setzero_ps, _mm256_storeu_ps,
};

use rayon::prelude::*;

use super::conv::SharedOutput;
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

/// The instruction sets the kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Isa {
    /// AVX2 + FMA: 16 ymm registers.
    Avx2,
    /// AVX2 + FMA + AVX-512F/VL: 32 ymm registers.
    Avx512,
}

impl Isa {
    /// The best kernel this CPU runs, if any.
    pub fn detect() -> Option<Isa> {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.supported())
    }

    pub fn supported(self) -> bool {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        match self {
            Isa::Avx2 => avx2,
            Isa::Avx512 => {
                avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
            }
        }
    }

    fn x_block(self) -> usize {
        LANES
            * match self {
                Isa::Avx2 => X_VECTORS_AVX2,
                Isa::Avx512 => X_VECTORS_AVX512,
            }
    }
}

/// The stride-1 convolution of `x` (`cin × dims`) into `cout × out_dims`, bias added.
/// The caller checked the shapes.
pub fn conv3d_stride1(x: &Tensor, conv: &Conv3d<Tensor>, shape: &ConvShape, isa: Isa) -> Vec<f32> {
    let ConvShape {
        cin,
        dims,
        cout,
        out_dims,
        kernel,
    } = *shape;
    assert!(isa.supported(), "this CPU does not run the {isa:?} kernel");
    let x_block = isa.x_block();
    let padded_dims = [
        dims[0] + 2 * conv.padding[0],
        dims[1] + 2 * conv.padding[1],
        out_dims[2].div_ceil(x_block) * x_block + kernel[2] - 1,
    ];
    let padded = zero_padded(x.data(), cin, dims, conv.padding, padded_dims);
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
        .for_each(|row| {
            let (zo, yo) = (row / out_dims[1], row % out_dims[1]);
            for block in 0..cout.div_ceil(CHANNEL_BLOCK) {
                let first = block * CHANNEL_BLOCK;
                let channels = CHANNEL_BLOCK.min(cout - first);
                let tile = Tile {
                    input: &padded,
                    padded_dims,
                    cin,
                    kernel,
                    weights: &packed[first * cin * kernel.iter().product::<usize>()..],
                    bias: &bias[first..first + channels],
                };
                // SAFETY: the CPU runs `isa` (asserted above); this row of these channels is written by this task only (rows
                // and blocks are disjoint), at offsets inside `out` (co < cout,
                // zo < out_dims[0], yo < out_dims[1]); rows are padded to whole x blocks.
                unsafe {
                    let dest = shared.0.add(
                        (first * out_dims[0] + zo) * out_dims[1] * out_dims[2] + yo * out_dims[2],
                    );
                    match isa {
                        Isa::Avx512 => tile.row_avx512(zo, yo, out_dims[2], dest, out_vox),
                        Isa::Avx2 => tile.row_avx2(zo, yo, out_dims[2], dest, out_vox),
                    }
                }
            }
        });
    out
}

/// `input` (`cin × dims`) copied into a zero volume of `padded_dims` at offset `padding`.
fn zero_padded(
    input: &[f32],
    cin: usize,
    dims: [usize; 3],
    padding: [usize; 3],
    padded_dims: [usize; 3],
) -> Vec<f32> {
    let plane = padded_dims[1] * padded_dims[2];
    let mut padded = vec![0f32; cin * padded_dims[0] * plane];
    padded
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(index, dest)| {
            let (ci, zp) = (index / padded_dims[0], index % padded_dims[0]);
            let Some(z) = zp.checked_sub(padding[0]).filter(|&z| z < dims[0]) else {
                return;
            };
            for y in 0..dims[1] {
                let src = &input[((ci * dims[0] + z) * dims[1] + y) * dims[2]..][..dims[2]];
                let at = (y + padding[1]) * padded_dims[2] + padding[2];
                dest[at..at + dims[2]].copy_from_slice(src);
            }
        });
    padded
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

/// One block of up to 4 output channels over the padded input.
struct Tile<'a> {
    input: &'a [f32],
    padded_dims: [usize; 3],
    cin: usize,
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
    unsafe fn row_avx512(&self, zo: usize, yo: usize, width: usize, dest: *mut f32, stride: usize) {
        // SAFETY: as the caller vouches.
        unsafe { self.row::<X_VECTORS_AVX512>(zo, yo, width, dest, stride) }
    }

    /// `row` with 4 × 16 register tiles on AVX2's 16 ymm registers.
    ///
    /// # Safety
    /// As `row`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_avx2(&self, zo: usize, yo: usize, width: usize, dest: *mut f32, stride: usize) {
        // SAFETY: as the caller vouches.
        unsafe { self.row::<X_VECTORS_AVX2>(zo, yo, width, dest, stride) }
    }

    /// Output row (zo, yo) of the block's channels: `dest[c·channel_stride + x]` for
    /// c < bias.len(), x < width, in register tiles of 4 channels × XV·8 consecutive x. Inlined
    /// into the `target_feature` wrappers above, which choose the register budget.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA, the padded rows must hold whole XV·8-wide blocks, and
    /// `dest` must be valid for those writes.
    #[inline(always)]
    unsafe fn row<const XV: usize>(
        &self,
        zo: usize,
        yo: usize,
        width: usize,
        dest: *mut f32,
        channel_stride: usize,
    ) {
        let [kz_n, ky_n, kx_n] = self.kernel;
        let [_, py_n, px_n] = self.padded_dims;
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
            for ci in 0..self.cin {
                for kz in 0..kz_n {
                    for ky in 0..ky_n {
                        let line =
                            ((ci * self.padded_dims[0] + zo + kz) * py_n + yo + ky) * px_n + x0;
                        // The padded row holds x_block + kx_n − 1 values from `line`.
                        let row = &self.input[line..line + x_block + kx_n - 1];
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
