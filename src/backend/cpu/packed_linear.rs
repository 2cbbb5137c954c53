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

use super::gemm::{MatRef, gemm_strided};
use super::vector_math::gelu_in_place;
use crate::backend::{Linear, Mlp};
use crate::tensor::Tensor;

/// Output columns per panel (two ymm vectors).
pub const PANEL: usize = 16;
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

/// A `Linear` ready to be applied to many blocks of rows: its weights copied once into the
/// layout of the kernel that will run.
pub struct PackedLinear {
    inp: usize,
    out: usize,
    layout: Layout,
}

enum Layout {
    /// `[out, in]` as PyTorch stores it, for `matrixmultiply`.
    Portable { weight: Vec<f32>, bias: Vec<f32> },
    /// Panels for the register-tile kernel of one instruction set.
    #[cfg(target_arch = "x86_64")]
    Panels {
        isa: Isa,
        /// `[out / 16][in][16]`, zero past `out`.
        panels: Vec<f32>,
        /// The bias, zero past `out`.
        bias: Vec<f32>,
    },
}

/// A strided block of rows: row r is `data[r·stride..][..width]`.
#[derive(Clone, Copy)]
struct Strided {
    rows: usize,
    stride: usize,
}

impl Strided {
    /// Checks that `len` values hold `rows` rows of `width` at this stride.
    fn check(self, len: usize, width: usize, what: &str) {
        assert!(
            self.rows == 0 || (self.rows - 1) * self.stride + width <= len,
            "{what}: {} rows of {width} at stride {} exceed {len} values",
            self.rows,
            self.stride
        );
    }
}

impl PackedLinear {
    /// Packed for the best kernel this CPU runs.
    pub fn new(linear: &Linear<Tensor>) -> Self {
        Self::from_weight(linear.weight.data(), linear.bias.data())
    }

    /// `weight` `[out, in]` (row-major, PyTorch's layout) and `bias` `[out]`, packed for the
    /// best kernel this CPU runs.
    pub fn from_weight(weight: &[f32], bias: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        return Self::for_isa(weight, bias, Isa::detect());
        #[cfg(not(target_arch = "x86_64"))]
        Self::portable(weight, bias)
    }

    /// `(in, out)` of a `[out, in]` weight with an `[out]` bias.
    fn widths(weight: &[f32], bias: &[f32]) -> (usize, usize) {
        let out = bias.len();
        assert_eq!(
            weight.len() % out.max(1),
            0,
            "weight holds whole rows of the bias's width"
        );
        (weight.len() / out.max(1), out)
    }

    /// The `matrixmultiply` path.
    pub fn portable(weight: &[f32], bias: &[f32]) -> Self {
        let (inp, out) = Self::widths(weight, bias);
        PackedLinear {
            inp,
            out,
            layout: Layout::Portable {
                weight: weight.to_vec(),
                bias: bias.to_vec(),
            },
        }
    }

    /// Packed for `isa`'s kernel (the portable path for `None`).
    ///
    /// # Panics
    /// When this CPU does not run `isa`.
    #[cfg(target_arch = "x86_64")]
    pub fn for_isa(weight: &[f32], bias: &[f32], isa: Option<Isa>) -> Self {
        let Some(isa) = isa else {
            return Self::portable(weight, bias);
        };
        assert!(isa.supported(), "this CPU does not run the {isa:?} kernel");
        let (inp, out) = Self::widths(weight, bias);
        let padded = out.div_ceil(PANEL) * PANEL;
        let mut panels = vec![0f32; padded * inp];
        for (j, row) in weight.chunks_exact(inp.max(1)).enumerate() {
            let (panel, lane) = (j / PANEL, j % PANEL);
            for (k, &w) in row.iter().enumerate() {
                panels[(panel * inp + k) * PANEL + lane] = w;
            }
        }
        let mut bias = bias.to_vec();
        bias.resize(padded, 0.0);
        PackedLinear {
            inp,
            out,
            layout: Layout::Panels { isa, panels, bias },
        }
    }

    /// `out ← epilogue(x·Wᵀ + b)` for the rows of `x` (`rows × in`; `out` is `rows × out`).
    /// `scratch` holds a zero-padded copy of a last partial register tile.
    pub fn apply(&self, x: &[f32], epilogue: Epilogue, out: &mut [f32], scratch: &mut Vec<f32>) {
        let rows = x.len() / self.inp.max(1);
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
        self.apply_strided(x, self.inp, rows, epilogue, out, self.out, scratch);
    }

    /// `apply` to `rows` rows of x that start `x_stride` values apart (each row's first `in`
    /// values), writing output rows `out_stride` apart: one head's columns of a wider matrix.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_strided(
        &self,
        x: &[f32],
        x_stride: usize,
        rows: usize,
        epilogue: Epilogue,
        out: &mut [f32],
        out_stride: usize,
        scratch: &mut Vec<f32>,
    ) {
        let (x_rows, out_rows) = (
            Strided {
                rows,
                stride: x_stride,
            },
            Strided {
                rows,
                stride: out_stride,
            },
        );
        x_rows.check(x.len(), self.inp, "x");
        out_rows.check(out.len(), self.out, "out");
        match &self.layout {
            #[cfg(target_arch = "x86_64")]
            Layout::Panels { isa, panels, bias } => {
                let job = Job {
                    panels,
                    bias,
                    x,
                    x_rows,
                    epilogue,
                    out,
                    out_rows,
                    scratch,
                };
                // SAFETY: `for_isa` checked that this CPU runs `isa`; the row extents were
                // checked just above.
                unsafe {
                    match isa {
                        Isa::Avx512 => self.tiles_avx512(job),
                        Isa::Avx2 => self.tiles_avx2(job),
                    }
                }
            }
            Layout::Portable { weight, bias } => {
                if rows == 0 {
                    return;
                }
                let beta = if epilogue == Epilogue::Accumulate {
                    1.0
                } else {
                    0.0
                };
                gemm_strided(
                    MatRef::strided(x, rows, self.inp, x_stride, 1),
                    MatRef::new(weight, self.out, self.inp).t(),
                    beta,
                    out,
                    out_stride,
                );
                for r in 0..rows {
                    let row = &mut out[r * out_stride..][..self.out];
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                    if epilogue == Epilogue::Gelu {
                        gelu_in_place(row);
                    }
                }
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F and AVX-512VL; the job's row extents are checked.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn tiles_avx512(&self, job: Job<'_>) {
        // SAFETY: as the caller vouches.
        unsafe { self.tiles::<ROWS_AVX512>(job) }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; the job's row extents are checked.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tiles_avx2(&self, job: Job<'_>) {
        // SAFETY: as the caller vouches.
        unsafe { self.tiles::<ROWS_AVX2>(job) }
    }

    /// Every MR-row group of x against every panel, then the group's epilogue. Inlined into
    /// the `target_feature` wrappers above, which choose MR.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x` and `out` hold their rows (`Strided::check`).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tiles<const MR: usize>(&self, job: Job<'_>) {
        let Job { out, scratch, .. } = job;
        let (x, x_rows, out_rows, epilogue) = (job.x, job.x_rows, job.out_rows, job.epilogue);
        let (inp, width) = (self.inp, self.out);
        for first_row in (0..x_rows.rows).step_by(MR) {
            let rows = MR.min(x_rows.rows - first_row);
            // A whole group is read in place; a last partial one from a zero-padded copy.
            let (group, group_stride) = if rows == MR {
                (&x[first_row * x_rows.stride..], x_rows.stride)
            } else {
                scratch.clear();
                scratch.resize(MR * inp, 0.0);
                for (r, copy) in scratch.chunks_exact_mut(inp.max(1)).take(rows).enumerate() {
                    copy.copy_from_slice(&x[(first_row + r) * x_rows.stride..][..inp]);
                }
                (scratch.as_slice(), inp)
            };
            let dest = &mut out[first_row * out_rows.stride..];
            for (panel, weights) in job.panels.chunks_exact(inp * PANEL).enumerate() {
                let first = panel * PANEL;
                let tile = Tile {
                    inp,
                    weights,
                    bias: &job.bias[first..first + PANEL],
                    rows,
                    cols: PANEL.min(width - first),
                    accumulate: epilogue == Epilogue::Accumulate,
                };
                // SAFETY: the caller vouches for AVX2; `group` holds MR rows of `inp` at
                // `group_stride` (whole groups: checked by the caller; the copy: sized so);
                // `dest` holds `rows` rows at `out_rows.stride` with first + cols ≤ width.
                unsafe {
                    tile.compute::<MR>(
                        group.as_ptr(),
                        group_stride,
                        dest[first..].as_mut_ptr(),
                        out_rows.stride,
                    )
                }
            }
            if epilogue == Epilogue::Gelu {
                for r in 0..rows {
                    gelu_in_place(&mut dest[r * out_rows.stride..][..width]);
                }
            }
        }
    }
}

/// One `apply_strided` call for the kernel: the packed weights of `Layout::Panels` and the rows.
#[cfg(target_arch = "x86_64")]
struct Job<'a> {
    panels: &'a [f32],
    bias: &'a [f32],
    x: &'a [f32],
    x_rows: Strided,
    epilogue: Epilogue,
    out: &'a mut [f32],
    out_rows: Strided,
    scratch: &'a mut Vec<f32>,
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
    /// The CPU must have AVX2 and FMA; `x` is valid for reads at `r·x_stride + k` for r < MR,
    /// k < inp; `dest` for reads and writes at `r·stride + j` for r < rows, j < cols.
    #[inline(always)]
    unsafe fn compute<const MR: usize>(
        &self,
        x: *const f32,
        x_stride: usize,
        dest: *mut f32,
        stride: usize,
    ) {
        let inp = self.inp;
        debug_assert!(self.weights.len() >= inp * PANEL && self.bias.len() >= PANEL);
        // SAFETY: the loads stay inside `weights` and `bias` (lengths above) and the rows of x
        // the caller vouches for; the stores inside what the caller vouches for.
        unsafe {
            let b = [0, LANES].map(|j| _mm256_loadu_ps(self.bias.as_ptr().add(j)));
            let mut acc = [b; MR];
            let mut w = self.weights.as_ptr();
            for k in 0..inp {
                let w0 = _mm256_loadu_ps(w);
                let w1 = _mm256_loadu_ps(w.add(LANES));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm256_broadcast_ss(&*x.add(r * x_stride + k));
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
pub struct PackedMlp {
    pub up: PackedLinear,
    pub down: PackedLinear,
}

impl PackedMlp {
    pub fn new(mlp: &Mlp<Tensor>) -> Self {
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
    /// that leave partial register tiles, with each epilogue, on contiguous rows and on rows
    /// inside wider matrices (whose other columns must stay as they were).
    #[test]
    fn every_path_matches_the_definition() {
        let mut rng = Rng::new(7);
        for (rows, inp, out) in [(1, 3, 128), (13, 128, 3), (29, 37, 45), (144, 128, 512)] {
            let (weight, bias) = (rng.tensor(&[out, inp], 1.0), rng.tensor(&[out], 1.0));
            let (w, b) = (weight.data(), bias.data());
            let mut paths = vec![("portable", PackedLinear::portable(w, b))];
            #[cfg(target_arch = "x86_64")]
            for (name, isa) in [("avx2", Isa::Avx2), ("avx512", Isa::Avx512)] {
                if isa.supported() {
                    paths.push((name, PackedLinear::for_isa(w, b, Some(isa))));
                }
            }
            for (x_stride, out_stride) in [(inp, out), (inp + 5, out + 3)] {
                let x = rng.tensor(&[rows, x_stride], 1.0);
                let start = rng.tensor(&[rows, out_stride], 1.0);
                let definition = |r: usize, j: usize| -> f64 {
                    let xr = &x.data()[r * x_stride..];
                    (0..inp)
                        .map(|k| xr[k] as f64 * w[j * inp + k] as f64)
                        .sum::<f64>()
                        + b[j] as f64
                };
                for epilogue in [Epilogue::Store, Epilogue::Gelu, Epilogue::Accumulate] {
                    for (name, packed) in &paths {
                        let mut got = start.data().to_vec();
                        let (x, scratch) = (x.data(), &mut Vec::new());
                        if x_stride == inp && out_stride == out {
                            packed.apply(x, epilogue, &mut got, scratch);
                        } else {
                            packed.apply_strided(
                                x, x_stride, rows, epilogue, &mut got, out_stride, scratch,
                            );
                        }
                        for r in 0..rows {
                            for j in 0..out_stride {
                                let before = start.data()[r * out_stride + j] as f64;
                                let want = match epilogue {
                                    _ if j >= out => before,
                                    Epilogue::Store => definition(r, j),
                                    Epilogue::Gelu => {
                                        let v = definition(r, j);
                                        0.5 * v
                                            * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2))
                                    }
                                    Epilogue::Accumulate => before + definition(r, j),
                                };
                                let g = got[r * out_stride + j] as f64;
                                assert!(
                                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                    "{name} {epilogue:?} {rows}×{inp}→{out} (strides {x_stride}, \
                                     {out_stride}) at ({r}, {j}): {g} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
