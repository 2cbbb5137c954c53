//! `x·Wᵀ + b` over blocks of token rows, with the weights packed once per op: the head's FFN,
//! projections and label MLP, which are nearly all of a click's arithmetic.
//!
//! Why not `matrixmultiply` for these. It packs both operands on every call, and the head calls
//! it once per block of token rows with the same weights: a 512 × 128 weight re-packed for every
//! 128 rows cost as much copying as the rows themselves (a sixth of a click in the profile). Here
//! the weights are packed once per op call into panels of 16 output columns, `[panel][in][16]`,
//! and the token rows are read in place.
//!
//! Register tile. Each kernel call computes MR rows × 16 columns (2 ymm per row) over the whole
//! input width: per input value k, two loads of the panel's row k and MR broadcasts of x[r, k]
//! feed 2·MR FMAs into accumulators that stay in registers. MR is 12 with AVX-512VL's 32 ymm
//! registers (24 accumulators + 2 weights + 1 broadcast) and 6 with AVX2's 16. The MR rows of x
//! (≤ 24 KB for 512 inputs) stay in L1 while the panels stream from L2.
//!
//! Epilogues are fused: the bias is the accumulators' initial value, GELU runs over the rows
//! just written while they are in cache, and `Accumulate` adds the result into the output (the
//! residual of the FFN and of label assignment) instead of writing a delta and adding it later.
//!
//! CPUs without AVX2 (and other architectures) take `matrixmultiply` with the same epilogues.
//! The summation order differs only in rounding (f32 throughout).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_storeu_ps,
};

#[cfg(target_arch = "x86_64")]
use super::isa::Isa;

use super::gemm::matmul_weight_t;
use super::vector_math::gelu_in_place;
use crate::backend::{Linear, Mlp};
use crate::tensor::Tensor;

/// Output columns per panel (two ymm vectors).
const PANEL: usize = 16;
/// f32 lanes of one ymm register.
#[cfg(target_arch = "x86_64")]
const LANES: usize = 8;
/// Rows per register tile.
#[cfg(target_arch = "x86_64")]
const ROWS_AVX512: usize = 12;
#[cfg(target_arch = "x86_64")]
const ROWS_AVX2: usize = 6;

/// What happens to `x·Wᵀ + b` on its way to the output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    /// `out = x·Wᵀ + b`
    Store,
    /// `out = GELU(x·Wᵀ + b)` (exact form)
    Gelu,
    /// `out += x·Wᵀ + b`
    Accumulate,
}

/// A `Linear` ready to be applied to many blocks of rows.
pub struct PackedLinear<'a> {
    /// `[out, in]`, as PyTorch stores it (the portable path reads it).
    weight: &'a [f32],
    bias: &'a [f32],
    inp: usize,
    out: usize,
    #[cfg(target_arch = "x86_64")]
    kernel: Option<Kernel>,
}

/// The weights packed for the register-tile kernel of one instruction set.
#[cfg(target_arch = "x86_64")]
struct Kernel {
    isa: Isa,
    /// `[out / 16][in][16]`, zero past `out`.
    panels: Vec<f32>,
    /// The bias, zero past `out`.
    bias: Vec<f32>,
}

impl<'a> PackedLinear<'a> {
    /// Packed for the best kernel this CPU runs.
    pub fn new(linear: &'a Linear<Tensor>) -> Self {
        #[cfg(target_arch = "x86_64")]
        return Self::for_isa(linear, Isa::detect());
        #[cfg(not(target_arch = "x86_64"))]
        Self::portable(linear)
    }

    /// The `matrixmultiply` path, without packing.
    pub fn portable(linear: &'a Linear<Tensor>) -> Self {
        let [out, inp] = [0, 1].map(|a| linear.weight.shape()[a]);
        PackedLinear {
            weight: linear.weight.data(),
            bias: linear.bias.data(),
            inp,
            out,
            #[cfg(target_arch = "x86_64")]
            kernel: None,
        }
    }

    /// Packed for `isa`'s kernel (the portable path for `None`).
    ///
    /// # Panics
    /// When this CPU does not run `isa`.
    #[cfg(target_arch = "x86_64")]
    pub fn for_isa(linear: &'a Linear<Tensor>, isa: Option<Isa>) -> Self {
        let mut packed = Self::portable(linear);
        if let Some(isa) = isa {
            assert!(isa.supported(), "this CPU does not run the {isa:?} kernel");
            let (inp, out) = (packed.inp, packed.out);
            let padded = out.div_ceil(PANEL) * PANEL;
            let mut panels = vec![0f32; padded * inp];
            for (j, row) in packed.weight.chunks_exact(inp).enumerate() {
                let (panel, lane) = (j / PANEL, j % PANEL);
                for (k, &w) in row.iter().enumerate() {
                    panels[(panel * inp + k) * PANEL + lane] = w;
                }
            }
            let mut bias = packed.bias.to_vec();
            bias.resize(padded, 0.0);
            packed.kernel = Some(Kernel { isa, panels, bias });
        }
        packed
    }

    /// `out ← epilogue(x·Wᵀ + b)` for the rows of `x` (`rows × in`; `out` is `rows × out`).
    /// `scratch` holds a zero-padded copy of a last partial register tile.
    pub fn apply(&self, x: &[f32], epilogue: Epilogue, out: &mut [f32], scratch: &mut Vec<f32>) {
        let rows = x.len() / self.inp;
        assert_eq!(
            rows * self.inp,
            x.len(),
            "x holds whole rows of {}",
            self.inp
        );
        assert_eq!(
            out.len(),
            rows * self.out,
            "out holds {rows} rows of {}",
            self.out
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = &self.kernel {
            // SAFETY: `for_isa` checked that this CPU runs `kernel.isa`.
            unsafe {
                match kernel.isa {
                    Isa::Avx512 => self.tiles_avx512(kernel, x, epilogue, out, scratch),
                    Isa::Avx2 => self.tiles_avx2(kernel, x, epilogue, out, scratch),
                }
            }
            return;
        }
        let _ = scratch;
        let accumulate = epilogue == Epilogue::Accumulate;
        matmul_weight_t(x, self.weight, rows, self.inp, self.out, accumulate, out);
        for row in out.chunks_exact_mut(self.out) {
            row.iter_mut().zip(self.bias).for_each(|(v, b)| *v += b);
        }
        if epilogue == Epilogue::Gelu {
            gelu_in_place(out);
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F and AVX-512VL.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn tiles_avx512(
        &self,
        kernel: &Kernel,
        x: &[f32],
        epilogue: Epilogue,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        // SAFETY: as the caller vouches.
        unsafe { self.tiles::<ROWS_AVX512>(kernel, x, epilogue, out, scratch) }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tiles_avx2(
        &self,
        kernel: &Kernel,
        x: &[f32],
        epilogue: Epilogue,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        // SAFETY: as the caller vouches.
        unsafe { self.tiles::<ROWS_AVX2>(kernel, x, epilogue, out, scratch) }
    }

    /// Every MR-row group of x against every panel, then the group's epilogue. Inlined into
    /// the `target_feature` wrappers above, which choose MR.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x` and `out` hold the same number of whole rows.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tiles<const MR: usize>(
        &self,
        kernel: &Kernel,
        x: &[f32],
        epilogue: Epilogue,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let (inp, width) = (self.inp, self.out);
        for (group, dest) in x.chunks(MR * inp).zip(out.chunks_mut(MR * width)) {
            let rows = group.len() / inp;
            let group = if rows == MR {
                group
            } else {
                scratch.clear();
                scratch.extend_from_slice(group);
                scratch.resize(MR * inp, 0.0);
                scratch.as_slice()
            };
            for (panel, weights) in kernel.panels.chunks_exact(inp * PANEL).enumerate() {
                let first = panel * PANEL;
                let tile = Tile {
                    inp,
                    weights,
                    bias: &kernel.bias[first..first + PANEL],
                    rows,
                    cols: PANEL.min(width - first),
                    accumulate: epilogue == Epilogue::Accumulate,
                };
                // SAFETY: the caller vouches for AVX2; `group` holds MR rows of `inp`; `dest`
                // holds `rows` rows of `width` ≥ first + cols values.
                unsafe { tile.compute::<MR>(group, dest[first..].as_mut_ptr(), width) }
            }
            if epilogue == Epilogue::Gelu {
                gelu_in_place(dest);
            }
        }
    }
}

/// One register tile: MR rows of x against one 16-column panel, written to the output.
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    inp: usize,
    /// The panel, `inp` rows of 16 weights.
    weights: &'a [f32],
    /// The panel's 16 biases (zero past the output width).
    bias: &'a [f32],
    /// Rows of the tile that exist in the output (≤ MR).
    rows: usize,
    /// Columns of the panel that exist in the output (≤ 16).
    cols: usize,
    /// Add to the output instead of storing.
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// `dest[r·stride + j] (+)= bias[j] + Σ_k x[r, k]·weights[k][j]` for r < rows, j < cols.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x` holds MR rows of `inp`; `dest` is valid for
    /// reads and writes at `r·stride + j` for r < rows, j < cols.
    #[inline(always)]
    unsafe fn compute<const MR: usize>(&self, x: &[f32], dest: *mut f32, stride: usize) {
        let inp = self.inp;
        debug_assert!(x.len() >= MR * inp && self.weights.len() >= inp * PANEL);
        // SAFETY: the loads stay inside `x`, `weights` and `bias` (lengths above); the stores
        // inside what the caller vouches for.
        unsafe {
            let b = [0, LANES].map(|j| _mm256_loadu_ps(self.bias.as_ptr().add(j)));
            let mut acc = [b; MR];
            let (xp, mut w) = (x.as_ptr(), self.weights.as_ptr());
            for k in 0..inp {
                let w0 = _mm256_loadu_ps(w);
                let w1 = _mm256_loadu_ps(w.add(LANES));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm256_broadcast_ss(&*xp.add(r * inp + k));
                    acc[0] = _mm256_fmadd_ps(a, w0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a, w1, acc[1]);
                }
                w = w.add(PANEL);
            }
            for (r, acc) in acc.iter().enumerate().take(self.rows) {
                let row = dest.add(r * stride);
                if self.cols == PANEL {
                    for (v, &vector) in acc.iter().enumerate() {
                        let to = row.add(v * LANES);
                        let value = if self.accumulate {
                            _mm256_add_ps(_mm256_loadu_ps(to), vector)
                        } else {
                            vector
                        };
                        _mm256_storeu_ps(to, value);
                    }
                } else {
                    let mut spill = [0f32; PANEL];
                    _mm256_storeu_ps(spill.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(spill.as_mut_ptr().add(LANES), acc[1]);
                    for (j, &value) in spill.iter().enumerate().take(self.cols) {
                        *row.add(j) = if self.accumulate {
                            *row.add(j) + value
                        } else {
                            value
                        };
                    }
                }
            }
        }
    }
}

/// A `Mlp` (Linear, GELU, Linear) with both layers packed.
pub struct PackedMlp<'a> {
    pub up: PackedLinear<'a>,
    pub down: PackedLinear<'a>,
}

impl<'a> PackedMlp<'a> {
    pub fn new(mlp: &'a Mlp<Tensor>) -> Self {
        PackedMlp {
            up: PackedLinear::new(&mlp.up),
            down: PackedLinear::new(&mlp.down),
        }
    }

    /// `out ← Mlp(x)` (`Store`) or `out += Mlp(x)` (`Accumulate`) for a block of rows;
    /// `hidden` and `scratch` are reused buffers.
    pub fn apply(
        &self,
        x: &[f32],
        epilogue: Epilogue,
        out: &mut [f32],
        hidden: &mut Vec<f32>,
        scratch: &mut Vec<f32>,
    ) {
        hidden.resize(x.len() / self.up.inp * self.up.out, 0.0);
        self.up.apply(x, Epilogue::Gelu, hidden, scratch);
        self.down.apply(hidden, epilogue, out, scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

    /// Every path against the definition, at widths that leave partial panels and row counts
    /// that leave partial register tiles, with each epilogue.
    #[test]
    fn every_path_matches_the_definition() {
        let mut rng = Rng::new(7);
        for (rows, inp, out) in [(1, 3, 128), (13, 128, 3), (29, 37, 45), (144, 128, 512)] {
            let linear = Linear {
                weight: rng.tensor(&[out, inp], 1.0),
                bias: rng.tensor(&[out], 1.0),
            };
            let x = rng.tensor(&[rows, inp], 1.0);
            let start = rng.tensor(&[rows, out], 1.0);
            let mut paths = vec![("portable", PackedLinear::portable(&linear))];
            #[cfg(target_arch = "x86_64")]
            for (name, isa) in [("avx2", Isa::Avx2), ("avx512", Isa::Avx512)] {
                if isa.supported() {
                    paths.push((name, PackedLinear::for_isa(&linear, Some(isa))));
                }
            }
            for epilogue in [Epilogue::Store, Epilogue::Gelu, Epilogue::Accumulate] {
                for (name, packed) in &paths {
                    let mut got = start.data().to_vec();
                    packed.apply(x.data(), epilogue, &mut got, &mut Vec::new());
                    for r in 0..rows {
                        for j in 0..out {
                            let (w, xr) = (linear.weight.data(), &x.data()[r * inp..]);
                            let dot: f64 = (0..inp)
                                .map(|k| xr[k] as f64 * w[j * inp + k] as f64)
                                .sum::<f64>()
                                + linear.bias.data()[j] as f64;
                            let want = match epilogue {
                                Epilogue::Store => dot,
                                Epilogue::Gelu => {
                                    0.5 * dot
                                        * (1.0 + libm::erf(dot * std::f64::consts::FRAC_1_SQRT_2))
                                }
                                Epilogue::Accumulate => start.data()[r * out + j] as f64 + dot,
                            };
                            let g = got[r * out + j] as f64;
                            assert!(
                                (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{name} {epilogue:?} {rows}×{inp}→{out} at ({r}, {j}): \
                                 {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
