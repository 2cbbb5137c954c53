// IEEE half for kernels compiled as host C++ by the CUDA emulator: the same 16 bits as CUDA's
// __half (and Rust's half::f16), converted with the CPU's F16C instructions, round to nearest
// even as __float2half_rn.
#pragma once

#include <immintrin.h>
#include <stdint.h>

struct __half {
    uint16_t bits;
};

inline float __half2float(__half h) { return _cvtsh_ss(h.bits); }
inline __half __float2half_rn(float f) { return __half{(uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
