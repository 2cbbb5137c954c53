// IEEE half for kernels compiled as host C++ by the CUDA emulator: the same 16 bits as CUDA's
// __half (and Rust's half::f16), converted with the CPU's F16C instructions, round to nearest
// even as __float2half_rn.
#pragma once

#include <immintrin.h>
#include <math.h>
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
inline __half2 __float2half2_rn(float f) { return __half2{__float2half_rn(f), __float2half_rn(f)}; }

// f16x2 arithmetic (HMUL2, HFMA2, HMNMX2) on each half: a product of halves is exact in f32,
// an HFMA2's a·b + c is rounded to f32 (fmaf) and then to f16, where the GPU rounds it once to
// f16 (the two can differ by an f16 ulp where the f32 rounding lands on an f16 tie: rare).
inline __half2 half2_lanes(__half2 a, __half2 b, __half2 c, float (*op)(float, float, float)) {
    auto lane = [&](__half x, __half y, __half z) {
        return __float2half_rn(op(__half2float(x), __half2float(y), __half2float(z)));
    };
    return __half2{lane(a.x, b.x, c.x), lane(a.y, b.y, c.y)};
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return half2_lanes(a, b, c, [](float x, float y, float z) { return fmaf(x, y, z); });
}
inline __half2 __hmul2(__half2 a, __half2 b) {
    return half2_lanes(a, b, __half2{}, [](float x, float y, float) { return x * y; });
}
inline __half2 __hmin2(__half2 a, __half2 b) {
    return half2_lanes(a, b, __half2{}, [](float x, float y, float) { return x < y ? x : y; });
}
