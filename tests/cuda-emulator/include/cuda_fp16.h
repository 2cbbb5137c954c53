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

// Two halves in 32 bits, the lower one first (x), as CUDA's __half2.
struct __attribute__((aligned(4))) __half2 {
    __half x, y;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
