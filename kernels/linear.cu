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
