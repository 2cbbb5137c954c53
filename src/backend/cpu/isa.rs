//! The x86-64 vector instruction sets the hand-written CPU kernels (conv_direct.rs,
//! packed_linear.rs) are compiled for, detected at run time.

/// The instruction sets a kernel is compiled for.
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
}
