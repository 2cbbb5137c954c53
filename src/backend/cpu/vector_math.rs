//! `exp` and the exact-form GELU over whole slices, written as branch-free f32 arithmetic that
//! the compiler turns into vector code, instead of one libm call per value.
//!
//! Why. The head's FFN applies GELU to N × ffn_dim values per layer (67 M per click at ROI
//! 32×64×64) and the softmaxes take an exp per score; with libm's scalar `erff` and `expf` these
//! were a third of a click on the CPU. Here each value costs a few dozen vector instructions:
//!
//! - `exp(x)`: x = n·ln2 + r with n = round(x/ln2) and |r| ≤ ln2/2 (Cody–Waite: ln2 split in a
//!   high part with few bits, so n·ln2_hi is exact), e^r by its Taylor series to r⁷ (truncation
//!   below 6e-9 relative), scaled by 2ⁿ built in the exponent bits. Inputs are clamped to
//!   [−87, 88], where 2ⁿ is a normal float; NaN stays NaN.
//! - `GELU(x) = x·(1 + erf(x/√2))/2` with erfc(|z|) = t·P(t)·e^(−z²), t = 1/(1 + p|z|)
//!   (Abramowitz & Stegun 7.1.26, absolute error ≤ 1.5e-7; PyTorch's vectorised CPU erf uses the
//!   same formula). For x < 0, 1 + erf(z) = erfc(|z|) is used directly, so the tail keeps its
//!   relative accuracy instead of cancelling 1 − (1 − ε).
//!
//! On x86-64 the slice loops are compiled a second time for AVX2 + FMA and chosen at run time
//! (`vectorised`, which other token loops of the CPU backend use too).

/// The range exp's input is clamped to (2ⁿ stays a normal float).
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;
/// ln 2 = LN2_HI + LN2_LO; LN2_HI has 9 significant bits, so n·LN2_HI is exact for |n| < 2¹⁵.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding and subtracting 1.5·2²³ rounds an f32 of magnitude below 2²² to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Abramowitz & Stegun 7.1.26: erfc(z) ≈ (a1·t + … + a5·t⁵)·e^(−z²), t = 1/(1 + p·z), z ≥ 0.
const ERFC_P: f32 = 0.327_591_1;
const ERFC_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_72,
    1.421_413_8,
    -1.453_152_1,
    1.061_405_4,
];

/// e^x, branch-free (see the module comment).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // `clamp` keeps NaN (min/max would replace it).
    let x = x.clamp(EXP_MIN, EXP_MAX);
    // n = round(x/ln2) sits in the low mantissa bits of `shifted` (integer arithmetic on the
    // bits, not a float-to-int conversion, which would not vectorise).
    let shifted = x.mul_add(std::f32::consts::LOG2_E, ROUND_MAGIC);
    let n = shifted - ROUND_MAGIC;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    let biased_n = shifted
        .to_bits()
        .wrapping_sub(ROUND_MAGIC.to_bits())
        .wrapping_add(127);
    let two_n = f32::from_bits(biased_n << 23);
    p * two_n
}

/// GELU with the exact (erf) form, to within 6e-7·|x|/2 (f32 evaluation of a formula accurate
/// to 1.5e-7·|x|/2; see the module comment and the test).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / ERFC_P.mul_add(z, 1.0);
    let mut poly = ERFC_A[4];
    for a in ERFC_A[..4].iter().rev() {
        poly = poly.mul_add(t, *a);
    }
    let erfc = poly * t * exp(-z * z);
    let one_plus_erf = if x < 0.0 { erfc } else { 2.0 - erfc };
    0.5 * x * one_plus_erf
}

/// Runs `f` compiled for AVX2 + FMA where the CPU has them (`f` is inlined into a function
/// with those target features, so its loops vectorise 8 lanes wide and `mul_add` is one FMA).
#[inline(always)]
pub fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if super::isa::Isa::Avx2.supported() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { with_avx2(f) };
    }
    f()
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `v ← e^v` for every value.
pub fn exp_in_place(values: &mut [f32]) {
    vectorised(|| values.iter_mut().for_each(|v| *v = exp(*v)))
}

/// `v ← GELU(v)` for every value.
pub fn gelu_in_place(values: &mut [f32]) {
    vectorised(|| values.iter_mut().for_each(|v| *v = gelu(*v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 1/64 from −20 to 20, and a few extremes.
    fn inputs() -> Vec<f32> {
        let mut values: Vec<f32> = (-1280..=1280).map(|i| i as f32 / 64.0).collect();
        values.extend([-200.0, -87.5, -1e-6, 1e-6, 87.9, 1e-30, -1e-30]);
        values
    }

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut values: Vec<f32> = inputs().into_iter().filter(|v| *v < 88.0).collect();
        let expected: Vec<f64> = values.iter().map(|&v| (v as f64).exp()).collect();
        exp_in_place(&mut values);
        for (got, want) in values.iter().zip(&expected) {
            // Inputs below −87 are clamped: the result is e^−87, not smaller.
            let want = want.max((EXP_MIN as f64).exp());
            let rel = (*got as f64 - want).abs() / want;
            assert!(
                rel < 5e-7,
                "exp: got {got}, want {want} (relative error {rel})"
            );
        }
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        let mut values = inputs();
        let expected: Vec<f64> = values
            .iter()
            .map(|&v| {
                let x = v as f64;
                0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
            })
            .collect();
        let originals = values.clone();
        gelu_in_place(&mut values);
        for ((got, want), x) in values.iter().zip(&expected).zip(&originals) {
            // A&S 7.1.26 bounds the absolute error of erf by 1.5e-7; evaluated in f32 it is
            // within 4.8e-7 on these inputs, so GELU's error is bounded by 6e-7·|x|/2.
            let err = (*got as f64 - want).abs();
            let bound = 6e-7 * 0.5 * x.abs() as f64 + 1e-37;
            assert!(err <= bound, "gelu({x}): got {got}, want {want}");
        }
    }

    /// The slice functions run vector code where the CPU has AVX2; called one value at a time
    /// the same formulas run as portable scalar code (`mul_add` a correctly rounded FMA in
    /// both), so the two agree bit for bit.
    #[test]
    fn vector_and_scalar_code_agree_bit_for_bit() {
        fn agree(one: fn(f32) -> f32, slice: fn(&mut [f32])) {
            let mut values: Vec<f32> = inputs().into_iter().filter(|v| *v < 88.0).collect();
            let scalar: Vec<u32> = values.iter().map(|&v| one(v).to_bits()).collect();
            slice(&mut values);
            let vector: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
            assert_eq!(scalar, vector);
        }
        agree(exp, exp_in_place);
        agree(gelu, gelu_in_place);
    }

    #[test]
    fn nan_stays_nan() {
        let mut values = [f32::NAN, f32::NAN];
        exp_in_place(&mut values[..1]);
        gelu_in_place(&mut values[1..]);
        assert!(values.iter().all(|v| v.is_nan()), "{values:?}");
    }
}
