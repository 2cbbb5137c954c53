// Dense layers of the TIS head: y = x·Wᵀ + b (W stored [out, in] as PyTorch), with the epilogue
// fused into the GEMM's store: plain, GELU, or residual (y += x·Wᵀ + b, in place).
//
// Two kernels, both tiling the output in 64 × 64 blocks and staging 64-row slabs of x and W in
// shared memory, so each loaded value is reused 64 times:
// - `linear_simt_*`: any storage; 256 threads, each owning a 4 × 4 patch of outputs, K in steps
//   of 16, f32 throughout. The f32 mode's path (and the oracle's closest GPU twin).
// - `linear_mma_f16`: tensor cores through WMMA (16×16×16 f16 fragments, f32 accumulators);
//   4 warps, each owning a 32 × 32 quarter of the block (2 × 2 fragments), K in steps of 32.
//   Shared rows are padded by 8 halves so that fragment loads avoid bank conflicts. The f32
//   accumulators go through shared memory for the epilogue.
// Loads are bounds-checked and zero-filled, so any M, N, K work (the click side has M = 10).
#include <mma.h>

#include "common.cuh"

enum Epilogue { PLAIN = 0, GELU = 1, RESIDUAL = 2 };

template <typename T>
__device__ __forceinline__ void store_output(T* y, int64_t index, float value, float bias, int epilogue) {
    value += bias;
    if (epilogue == GELU) value = gelu(value);
    if (epilogue == RESIDUAL) value += to_f32(y[index]);
    y[index] = from_f32<T>(value);
}

constexpr int TILE = 64;
constexpr int SIMT_K = 16;

template <typename T>
__device__ void linear_simt(const T* x, const T* w, const T* bias, T* y, int64_t m, int64_t n, int64_t k,
                            int epilogue) {
    __shared__ float xs[SIMT_K][TILE];
    __shared__ float ws[SIMT_K][TILE];
    int64_t row0 = (int64_t)blockIdx.y * TILE, col0 = (int64_t)blockIdx.x * TILE;
    int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < k; k0 += SIMT_K) {
        for (int l = threadIdx.x; l < TILE * SIMT_K; l += blockDim.x) {
            int r = l / SIMT_K, kk = l % SIMT_K;
            bool in_k = k0 + kk < k;
            xs[kk][r] = (in_k && row0 + r < m) ? to_f32(x[(row0 + r) * k + k0 + kk]) : 0.f;
            ws[kk][r] = (in_k && col0 + r < n) ? to_f32(w[(col0 + r) * k + k0 + kk]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < SIMT_K; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                a[i] = xs[kk][tr * 4 + i];
                b[i] = ws[kk][tc * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        int64_t r = row0 + tr * 4 + i;
        for (int j = 0; j < 4; ++j) {
            int64_t c = col0 + tc * 4 + j;
            if (r < m && c < n) store_output(y, r * n + c, acc[i][j], bias ? to_f32(bias[c]) : 0.f, epilogue);
        }
    }
}

#define LINEAR_SIMT(T, S)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) linear_simt_##S(                                  \
        const T* x, const T* w, const T* b, T* y, int64_t m, int64_t n, int64_t k, int epilogue) {        \
        linear_simt<T>(x, w, b, y, m, n, k, epilogue);                                                    \
    }
FOR_EACH_STORAGE(LINEAR_SIMT)

constexpr int MMA_K = 32;
constexpr int MMA_PAD = 8;

extern "C" __global__ void __launch_bounds__(128) linear_mma_f16(const __half* x, const __half* w,
                                                                   const __half* bias, __half* y, int64_t m,
                                                                   int64_t n, int64_t k, int epilogue) {
    using namespace nvcuda;
    __shared__ __align__(32) __half xs[TILE][MMA_K + MMA_PAD];
    __shared__ __align__(32) __half ws[TILE][MMA_K + MMA_PAD];
    __shared__ __align__(32) float out[TILE][TILE + 4];
    int64_t row0 = (int64_t)blockIdx.y * TILE, col0 = (int64_t)blockIdx.x * TILE;
    int warp = threadIdx.x / 32, wr = (warp / 2) * 32, wc = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    const __half zero = __float2half(0.f);
    for (int64_t k0 = 0; k0 < k; k0 += MMA_K) {
        for (int l = threadIdx.x; l < TILE * MMA_K; l += blockDim.x) {
            int r = l / MMA_K, kk = l % MMA_K;
            bool in_k = k0 + kk < k;
            xs[r][kk] = (in_k && row0 + r < m) ? x[(row0 + r) * k + k0 + kk] : zero;
            ws[r][kk] = (in_k && col0 + r < n) ? w[(col0 + r) * k + k0 + kk] : zero;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MMA_K; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &xs[wr + 16 * i][kk], MMA_K + MMA_PAD);
            // B = Wᵀ (K × N) read column-major from W's rows.
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &ws[wc + 16 * j][kk], MMA_K + MMA_PAD);
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&out[wr + 16 * i][wc + 16 * j], acc[i][j], TILE + 4, wmma::mem_row_major);
    __syncthreads();
    for (int l = threadIdx.x; l < TILE * TILE; l += blockDim.x) {
        int r = l / TILE, c = l % TILE;
        if (row0 + r < m && col0 + c < n)
            store_output(y, (row0 + r) * n + col0 + c, out[r][c], bias ? __half2float(bias[col0 + c]) : 0.f, epilogue);
    }
}

// The feed-forward sub-layer in one kernel: x ← x + W2·GELU(W1·LN(x) + b1) + b2, per block of
// FFN_ROWS tokens, f16 on tensor cores. LN(x) is computed into shared memory (one warp per
// row); the hidden layer is produced FFN_CHUNK units at a time (H = GELU(LN(x)·W1ᵀ + b1) for
// one chunk, 64 × 64) and consumed at once by the second GEMM (Y += H·W2ᵀ over that chunk), so
// the N × hidden activations never leave shared memory; x is read twice (LN, residual) and
// written once. Warp w owns rows 16w..16w+15 of both GEMMs, so the width D (a multiple of 16,
// ≤ 128; a template parameter, so Y's D/16 accumulator fragments stay in registers) is not
// split between warps. Each chunk of W1 (64 × D) and W2 (D × 64) is staged in shared memory
// for the block's four warps; the weights are re-read from L2 by every block, which is what a
// larger FFN_ROWS would amortise. Dynamic shared memory, laid out as `FfnShared` says.
constexpr int FFN_ROWS = 64;
constexpr int FFN_CHUNK = 64;

template <int D> struct FfnShared {
    static constexpr int LD = D + MMA_PAD, LH = FFN_CHUNK + MMA_PAD, LS = (D > FFN_CHUNK ? D : FFN_CHUNK) + 4;
    static constexpr int normed = 0;                           // LN(x): FFN_ROWS × LD halves
    static constexpr int w1 = normed + FFN_ROWS * LD * 2;      // W1 chunk: FFN_CHUNK × LD halves
    static constexpr int hidden = w1 + FFN_CHUNK * LD * 2;     // GELU(H): FFN_ROWS × LH halves
    static constexpr int w2 = hidden + FFN_ROWS * LH * 2;      // W2 chunk: D × LH halves
    static constexpr int stage = w2 + D * LH * 2;              // accumulators: FFN_ROWS × LS floats
    static constexpr int bytes = stage + FFN_ROWS * LS * 4;
};

template <int D>
__device__ void feed_forward_mma(__half* x, const __half* gamma, const __half* beta, const __half* w1,
                                 const __half* b1, const __half* w2, const __half* b2, int64_t n, int64_t hidden) {
    using namespace nvcuda;
    using L = FfnShared<D>;
    extern __shared__ float ffn_shared[];
    unsigned char* base = (unsigned char*)ffn_shared;
    __half* normed = (__half*)(base + L::normed);
    __half* w1s = (__half*)(base + L::w1);
    __half* hs = (__half*)(base + L::hidden);
    __half* w2s = (__half*)(base + L::w2);
    float* stage = (float*)(base + L::stage);
    const __half zero = __float2half(0.f);
    int64_t row0 = (int64_t)blockIdx.x * FFN_ROWS;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = 16 * warp;

    for (int r = warp; r < FFN_ROWS; r += blockDim.x / 32) {
        __half* dest = normed + r * L::LD;
        if (row0 + r < n)
            warp_layer_norm(x + (row0 + r) * D, gamma, beta, D, lane,
                            [&](int64_t f, float v) { dest[f] = __float2half_rn(v); });
        else
            for (int f = lane; f < D; f += 32) dest[f] = zero;
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> y[D / 16];
    for (int j = 0; j < D / 16; ++j) wmma::fill_fragment(y[j], 0.f);
    for (int64_t c0 = 0; c0 < hidden; c0 += FFN_CHUNK) {
        // Stage this chunk of W1 (its rows) and W2 (its columns); units past `hidden` are zero.
        for (int l = threadIdx.x; l < FFN_CHUNK * D; l += blockDim.x) {
            int r = l / D, f = l % D;
            w1s[r * L::LD + f] = c0 + r < hidden ? w1[(c0 + r) * D + f] : zero;
        }
        for (int l = threadIdx.x; l < D * FFN_CHUNK; l += blockDim.x) {
            int r = l / FFN_CHUNK, u = l % FFN_CHUNK;
            w2s[r * L::LH + u] = c0 + u < hidden ? w2[r * hidden + c0 + u] : zero;
        }
        __syncthreads();
        // H = LN(x)·W1ᵀ for the warp's 16 rows × the chunk's 64 units.
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> h[FFN_CHUNK / 16];
        for (int j = 0; j < FFN_CHUNK / 16; ++j) wmma::fill_fragment(h[j], 0.f);
        for (int k = 0; k < D; k += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
            wmma::load_matrix_sync(a, normed + r0 * L::LD + k, L::LD);
            for (int j = 0; j < FFN_CHUNK / 16; ++j) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
                wmma::load_matrix_sync(b, w1s + 16 * j * L::LD + k, L::LD);
                wmma::mma_sync(h[j], a, b, h[j]);
            }
        }
        for (int j = 0; j < FFN_CHUNK / 16; ++j)
            wmma::store_matrix_sync(stage + r0 * L::LS + 16 * j, h[j], L::LS, wmma::mem_row_major);
        __syncthreads();
        for (int l = lane; l < 16 * FFN_CHUNK; l += 32) {
            int r = r0 + l / FFN_CHUNK, u = l % FFN_CHUNK;
            float bias = c0 + u < hidden ? __half2float(b1[c0 + u]) : 0.f;
            hs[r * L::LH + u] = __float2half_rn(gelu(stage[r * L::LS + u] + bias));
        }
        __syncthreads();
        // Y += GELU(H)·W2ᵀ over this chunk, for the warp's rows × all D outputs.
        for (int k = 0; k < FFN_CHUNK; k += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
            wmma::load_matrix_sync(a, hs + r0 * L::LH + k, L::LH);
            for (int j = 0; j < D / 16; ++j) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
                wmma::load_matrix_sync(b, w2s + 16 * j * L::LH + k, L::LH);
                wmma::mma_sync(y[j], a, b, y[j]);
            }
        }
        __syncthreads();  // before the next chunk overwrites w1s, w2s and stage
    }
    for (int j = 0; j < D / 16; ++j)
        wmma::store_matrix_sync(stage + r0 * L::LS + 16 * j, y[j], L::LS, wmma::mem_row_major);
    __syncthreads();
    for (int l = lane; l < 16 * D; l += 32) {
        int r = r0 + l / D, f = l % D;
        if (row0 + r < n) {
            __half* out = x + (row0 + r) * D + f;
            *out = __float2half_rn(__half2float(*out) + stage[r * L::LS + f] + __half2float(b2[f]));
        }
    }
}

#define FEED_FORWARD_MMA(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) feed_forward_mma_f16_##D(                              \
        __half* x, const __half* g, const __half* b, const __half* w1, const __half* b1, const __half* w2,   \
        const __half* b2, int64_t n, int64_t hidden) {                                                       \
        feed_forward_mma<D>(x, g, b, w1, b1, w2, b2, n, hidden);                                             \
    }
FEED_FORWARD_MMA(16)
FEED_FORWARD_MMA(32)
FEED_FORWARD_MMA(48)
FEED_FORWARD_MMA(64)
FEED_FORWARD_MMA(80)
FEED_FORWARD_MMA(96)
FEED_FORWARD_MMA(112)
FEED_FORWARD_MMA(128)
