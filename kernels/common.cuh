// Shared helpers of every tis kernel file.
//
// Storage types: every kernel that touches activations or weights exists once per storage type,
// `<name>_f32` and `<name>_f16` (IEEE half, as nnU-Net's autocast), generated from one template
// by FOR_EACH_STORAGE. Arithmetic is always f32: values are widened on load and rounded once on
// store. Flat indices are 64-bit, since a feature volume (C × Z × Y × X) can exceed 2^31 values.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#define FOR_EACH_STORAGE(X) X(float, f32) X(__half, f16)

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Grid-stride loop over [0, n).
#define GRID_LOOP(i, n)                                                              \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n); \
         i += (int64_t)gridDim.x * blockDim.x)

// Grid-stride loop of whole warps over [0, n): warp w takes item w (its lanes share the item).
#define WARP_LOOP(w, n)                                                                                \
    for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; w < (int64_t)(n);          \
         w += (int64_t)gridDim.x * blockDim.x / 32)

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// LayerNorm of one row of `width` values by the 32 lanes of a warp (eps 1e-5, biased variance,
// as torch.nn.LayerNorm): two passes over the row (mean, then variance), then
// `store(f, normalised value)` for each of the lane's columns f.
template <typename T, typename Store>
__device__ __forceinline__ void warp_layer_norm(const T* row, const T* gamma, const T* beta, int64_t width, int lane,
                                                Store store) {
    const float inv_width = 1.f / (float)width;  // one division a row, not two (warp_row_moments)
    float sum = 0.f;
    for (int64_t f = lane; f < width; f += 32) sum += to_f32(row[f]);
    float mean = warp_sum(sum) * inv_width, squares = 0.f;
    for (int64_t f = lane; f < width; f += 32) {
        float d = to_f32(row[f]) - mean;
        squares += d * d;
    }
    float inv_std = rsqrtf(warp_sum(squares) * inv_width + 1e-5f);
    for (int64_t f = lane; f < width; f += 32)
        store(f, (to_f32(row[f]) - mean) * inv_std * to_f32(gamma[f]) + to_f32(beta[f]));
}

// The 8 values from p on, widened: one 16-byte load in f16, two in f32 (p 16-byte aligned).
template <typename T> __device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
    if constexpr (sizeof(T) == 2) {
        uint4 raw = *(const uint4*)p;
        const __half* h = (const __half*)&raw;
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __half2float(h[j]);
    } else {
        float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
        float w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = w[j];
    }
}

// The mean and 1/σ of a row of `width` values held by a warp's lanes, V a lane (value i of a
// lane is column lane + 32·i, zero past the width): warp_layer_norm's arithmetic for rows kept in
// registers. The sums are scaled by 1/width, not divided by the width: a division by a width that
// is not a power of two (the default model's 48) is an IEEE-exact sequence of about a dozen
// instructions with a slow-path call, twice a row; the fused kernels' widths are compile-time
// constants, so 1/width is one.
template <int V>
__device__ __forceinline__ void warp_row_moments(const float (&v)[V], int64_t width, int lane, float& mean,
                                                 float& inv_std) {
    const float inv_width = 1.f / (float)width;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) sum += v[i];
    mean = warp_sum(sum) * inv_width;
    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        float d = lane + 32 * i < width ? v[i] - mean : 0.f;
        squares += d * d;
    }
    inv_std = rsqrtf(warp_sum(squares) * inv_width + 1e-5f);
}

// A value known at compile time, passed as an argument: a generic lambda called with one reads
// it as decltype(c)::value (a loop's bound, the first pass of a loop).
template <auto V> struct Constant {
    static constexpr auto value = V;
};

// Exact GELU, 0.5·x·(1 + erf(x/√2)), as torch.nn.GELU().
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752440f)); }

// 2^x and tanh on the special function unit: ex2.approx.ftz (one MUFU; subnormals flushed to
// zero: __expf adds a fix-up of three or four instructions) and tanh.approx.f16x2 (two f16
// values in 32 bits: two MUFU.TANH.F16 and a PRMT in the sm_90a SASS), whose relative error the
// PTX ISA puts at about 2^-11. In the CUDA emulator, the host's arithmetic, with tanh made 2^-11
// too small in magnitude everywhere before its rounding to f16 (the worst case, and of one sign,
// so that the errors add up rather than cancel): the emulator's tests then see what the kernels
// must bear.
__device__ __forceinline__ float approx_exp2(float x) {
#ifdef TIS_CUDA_EMULATOR
    return exp2f(x);
#else
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}
// 1/x by rcp.approx.ftz (one MUFU, within an ulp), for x that is neither tiny nor huge: where
// 1.f / x is an IEEE division (a check and a slow-path call) and __fdividef(1, x) a MUFU.RCP with
// a guard for |x| < 2^-126 (five instructions more).
__device__ __forceinline__ float approx_rcp(float x) {
#ifdef TIS_CUDA_EMULATOR
    return 1.f / x;
#else
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}
__device__ __forceinline__ __half2 approx_tanh_f16x2(__half2 x) {
#ifdef TIS_CUDA_EMULATOR
    const float2 v = __half22float2(x);
    return __floats2half2_rn(tanhf(v.x) * (1.f - 0x1p-11f), tanhf(v.y) * (1.f - 0x1p-11f));
#else
    uint32_t r;
    asm("tanh.approx.f16x2 %0, %1;" : "=r"(r) : "r"(*(const uint32_t*)&x));
    return *(const __half2*)&r;
#endif
}

// GELU, x·Φ(x), of two values (lo, hi: a C tile's pair) rounded to f16, in f16x2 arithmetic,
// packed as an f16 pair (the A fragment register of the product that takes it, `lo` in the
// lower half): ½x·(1 + tanh(u)) with u = x·P(min(x², 25)) and P(s) = a + b·s + c·s² fitted to
// the exact GELU (its largest error 2.5e-5 over −20…20 in exact arithmetic with an exact tanh:
// minimax by Nelder–Mead from a least-squares fit of atanh(erf(x/√2))/x, numpy and scipy in f64).
// Every fused f16 kernel takes it for every hidden unit of its FFNs and MLPs (512 a token and a
// layer for TIS-B). Evaluated in f16 (the coefficients rounded, each HFMA2 rounded once) it is,
// against the exact GELU of the f16 input, within f16's rounding of the result for x > 0 and
// within 4.6e-4 for x ≤ 0 (where ½x and ½x·tanh(u) nearly cancel), with an exact tanh; a relative
// L2 error of 3.2e-4 over x ~ N(0, 1.5), against 2.1e-4 for the same formula in f32 (a
// simulation of both in Python, each operation rounded as the GPU rounds it). That costs 10
// instructions a pair (HMUL2, HMNMX2, two HFMA2, HMUL2, the two tanh, HMUL2, HFMA2, and the f32
// pair's conversion) where f32 took 17: the wgmma FFN's chunk loop went 1,005 → 902 sm_90a SASS
// instructions a thread, its FMUL, FFMA and FMNMX (224) giving way to 112 HMUL2, HFMA2 and
// HMNMX2. (Tried before the FFN's second product took its A from registers, it spilled.) The clamp
// keeps P positive (c < 0); from |x| = 5 on, tanh(u) is ±1 in f16 anyway.
__device__ __forceinline__ uint32_t gelu_fast_f16x2(float lo, float hi) {
    const __half2 x = __floats2half2_rn(lo, hi);
    const __half2 s = __hmin2(__hmul2(x, x), __float2half2_rn(25.f));
    const __half2 p = __hfma2(s, __hfma2(s, __float2half2_rn(-3.51516789e-4f), __float2half2_rn(3.70056460e-2f)),
                              __float2half2_rn(7.97507884e-1f));
    const __half2 half_x = __hmul2(__float2half2_rn(0.5f), x);
    const __half2 r = __hfma2(half_x, approx_tanh_f16x2(__hmul2(x, p)), half_x);
    return *(const uint32_t*)&r;
}

// a·b in 64 bits, of two 32-bit factors: one IMAD.WIDE (mul.wide.s32). Written as
// (int64_t)a * b, nvcc multiplied 64 × 64 bits (four instructions and two sign extensions) in
// the implicit GEMM's address of every piece.
__device__ __forceinline__ int64_t wide_product(int a, int b) {
#ifdef TIS_CUDA_EMULATOR
    return (int64_t)a * b;
#else
    int64_t product;
    asm("mul.wide.s32 %0, %1, %2;" : "=l"(product) : "r"(a), "r"(b));
    return product;
#endif
}

// A grid of 3 extents, passed by value to kernels.
struct Dims3 {
    int64_t z, y, x;
    __device__ __forceinline__ int64_t count() const { return z * y * x; }
};

// Source index pair and weight of an align_corners = True resize, as PyTorch computes them
// (the positional encoding's trilinear resize).
struct ResizeTap { int64_t i0, i1; float lambda; };
__device__ __forceinline__ ResizeTap align_corners_tap(int64_t in, int64_t out, int64_t o) {
    float scale = out > 1 ? (float)(in - 1) / (float)(out - 1) : 0.f;
    float real = scale * (float)o;
    int64_t i0 = min((int64_t)real, in - 1);
    ResizeTap t{i0, i0 < in - 1 ? i0 + 1 : i0, fminf(fmaxf(real - (float)i0, 0.f), 1.f)};
    return t;
}
