// Dense layers of the TIS head: y = x·Wᵀ + b (W stored [out, in] as PyTorch), with the epilogue
// fused into the GEMM's store: plain, GELU, or residual (y += x·Wᵀ + b, in place).
//
// Two kernels, both tiling the output in 64 × 64 blocks and staging 64-row slabs of x and W in
// shared memory, so each loaded value is reused 64 times:
// - `linear_simt_*`: any storage; 256 threads, each owning a 4 × 4 patch of outputs, K in steps
//   of 16, f32 throughout. The f32 mode's path (and the oracle's closest GPU twin).
// - `linear_mma_f16`: tensor cores through mma.sync (warp_tile_mma, f32 accumulators); 4 warps,
//   each owning a 32 × 32 quarter of the block (2 × 4 C tiles of 16 × 8), K in steps of 32.
//   Shared rows are padded by 8 halves so that ldmatrix avoids bank conflicts. The f32
//   accumulators go through shared memory for the epilogue, which stores 8 outputs a thread
//   with one 16-byte store where the rows allow it.
// Loads are bounds-checked and zero-filled, so any M, N, K work (the click side has M = 10);
// the tensor-core kernel's move 8 halves at a time where K comes in eights (load_slab).
// `feed_forward_mma_f16_{D}` and `feed_forward_wgmma_f16_{D}`, the whole FFN sub-layer of the
// head's tokens on mma.sync and on sm_90a's wgmma, and `label_mlp_mma_f16_{D}`, the label MLP on
// the same loop, are instantiated here from kernels/feed_forward.cuh, which says how they are
// shaped.
#include "feed_forward.cuh"

enum Epilogue { PLAIN = 0, GELU = 1, RESIDUAL = 2 };

// The stored value of an output: value + bias, then GELU, or plus the value it replaces (`old`).
__device__ __forceinline__ float epilogue_value(float value, float bias, float old, int epilogue) {
    value += bias;
    if (epilogue == GELU) value = gelu(value);
    if (epilogue == RESIDUAL) value += old;
    return value;
}

template <typename T>
__device__ __forceinline__ void store_output(T* y, int64_t index, float value, float bias, int epilogue) {
    y[index] = from_f32<T>(epilogue_value(value, bias, epilogue == RESIDUAL ? to_f32(y[index]) : 0.f, epilogue));
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
    // Unrolled, so that acc stays in registers (indexed at run time, it went to local memory).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int64_t r = row0 + tr * 4 + i;
#pragma unroll
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

extern "C" __global__ void __launch_bounds__(128) linear_mma_f16(const __half* x, const __half* w,
                                                                   const __half* bias, __half* y, int64_t m,
                                                                   int64_t n, int64_t k, int epilogue) {
    __shared__ __align__(16) __half xs[TILE][SLAB_LD];
    __shared__ __align__(16) __half ws[TILE][SLAB_LD];
    __shared__ __align__(16) float out[TILE][TILE + STAGED_PAD];
    int64_t row0 = (int64_t)blockIdx.y * TILE, col0 = (int64_t)blockIdx.x * TILE;
    int warp = threadIdx.x / 32, wr = (warp / 2) * 32, wc = (warp % 2) * 32;
    float acc[2][4][4] = {};  // the warp's 32 × 32: 2 × 4 C tiles
    for (int64_t k0 = 0; k0 < k; k0 += MMA_K) {
        load_slab<TILE>(&xs[0][0], x, row0, m, k, k0);
        load_slab<TILE>(&ws[0][0], w, col0, n, k, k0);
        __syncthreads();
        warp_tile_mma(acc, &xs[0][0], &ws[0][0], wr, wc);
        __syncthreads();
    }
    store_warp_tile(&out[0][0], TILE + STAGED_PAD, acc, wr, wc);
    __syncthreads();
    // Eight columns of a row a thread: one 16-byte store of y (and load, for the residual) where
    // the rows come in eights and y is 16-byte aligned, else value by value.
    const bool by8 = n % 8 == 0 && (uintptr_t)y % 16 == 0;
    for (int l = threadIdx.x; l < TILE * TILE / 8; l += blockDim.x) {
        const int r = l / (TILE / 8), c = l % (TILE / 8) * 8;
        const int64_t row = row0 + r, col = col0 + c;
        if (row >= m || col >= n) continue;
        auto bias_at = [&](int i) { return bias ? __half2float(bias[col + i]) : 0.f; };
        if (by8) {
            uint4* dst = (uint4*)&y[row * n + col];
            __align__(16) __half values[8];
            *(uint4*)values = epilogue == RESIDUAL ? *dst : uint4{0, 0, 0, 0};
#pragma unroll
            for (int i = 0; i < 8; ++i)
                values[i] = __float2half_rn(epilogue_value(out[r][c + i], bias_at(i), __half2float(values[i]), epilogue));
            *dst = *(const uint4*)values;
        } else {
            for (int i = 0; i < 8 && col + i < n; ++i) store_output(y, row * n + col + i, out[r][c + i], bias_at(i), epilogue);
        }
    }
}

#define FEED_FORWARD_MMA(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS, 2) feed_forward_mma_f16_##D(             \
        __half* x, const __half* g, const __half* b, const __half* w1, const __half* b1, const __half* w2,   \
        const __half* b2, int64_t n, int64_t hidden) {                                                       \
        feed_forward_mma<D>(x, g, b, w1, b1, w2, b2, n, hidden);                                             \
    }
FOR_EACH_FUSED_WIDTH(FEED_FORWARD_MMA)

#define LABEL_MLP_MMA(D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS, 2) label_mlp_mma_f16_##D(                \
        const __half* p, const __half* w_up, const __half* b_up, const __half* w_down, const __half* b_down, \
        __half* out, int64_t n, int64_t classes, int64_t hidden) {                                           \
        label_mlp_mma<D>(p, w_up, b_up, w_down, b_down, out, n, classes, hidden);                            \
    }
FOR_EACH_FUSED_WIDTH(LABEL_MLP_MMA)

// Its wgmma path, for the widths that are multiples of 64 (blocks of 128 tokens, FfnWgmmaShared's
// shared memory), a kernel of its own so that each path keeps its registers (sharing one
// function, ptxas spilled the mma.sync path's) and the profiles name the path. The backend
// launches it only on a GPU that runs the sm_90a cubins; other targets compile it as the mma.sync
// path, which the larger shared memory also holds.
#ifdef TIS_WGMMA
#define FFN_WGMMA_BODY(D) feed_forward_wgmma<D>(x, g, b, w1, b1, w2, b2, n, hidden)
#else
#define FFN_WGMMA_BODY(D) feed_forward_mma<D>(x, g, b, w1, b1, w2, b2, n, hidden)
#endif
#define FEED_FORWARD_WGMMA(D)                                                                                \
    extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS, 2) feed_forward_wgmma_f16_##D(           \
        __half* x, const __half* g, const __half* b, const __half* w1, const __half* b1, const __half* w2,   \
        const __half* b2, int64_t n, int64_t hidden) {                                                       \
        FFN_WGMMA_BODY(D);                                                                                   \
    }
FEED_FORWARD_WGMMA(64)
FEED_FORWARD_WGMMA(128)
#undef FFN_WGMMA_BODY
