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
#include "mma.cuh"

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

// The feed-forward sub-layer in one kernel: x ← x + W2·GELU(W1·LN(x) + b1) + b2, per block of
// fused_rows() tokens, f16 on tensor cores through mma.sync (mma.cuh). Warp w owns rows
// 16w..16w+15 throughout, so after LN(x) (into shared memory, one warp per row) the warps share
// nothing but the staged weights. The hidden layer goes FFN_CHUNK units at a time: the warp's
// H = LN(x)·W1ᵀ for one chunk (16 × 32, four f32 C tiles in registers), then b1 and GELU applied
// in registers and the C tiles packed as f16 into the A fragments of Y += H·W2ᵀ over that chunk
// (the C and A layouts line up; mma.cuh). H never leaves the registers and Y (16 × D, D/8 C
// tiles) stays there until the residual, which each lane adds to its own x values (f16 pairs).
// x is read twice (LN, residual) and written once. Each chunk of W1 (32 × D) and W2 (D × 32) is
// staged in shared memory for the block's warps, double-buffered: the next chunk's copies
// (cp.async) fly while this one multiplies, and the first chunk's while LN(x) is computed; every
// block reads the weights from L2 once (256 KB per 128 tokens for TIS-B, D 128 and hidden 512).
// Shared memory, laid out as `FfnShared` says, is 71 KB at D 128 and 128 rows, and registers stay
// within 128 a thread (__launch_bounds__), so that two blocks (16 warps) share a multiprocessor.
// Per warp and chunk that is 64 mma.sync against 40 ldmatrix and 16 GELUs a lane (gelu_fast).
// The WMMA version before it spent more issue slots on the GELU's erff, on the accumulators'
// round trips through shared memory and on fragment loads than on its 64 products, with one
// block of 8 warps a multiprocessor (5.94 ms a layer on an H200, 69 TFLOP/s).
constexpr int FFN_CHUNK = 32;

template <int D> struct FfnShared {
    static constexpr int LD = D + MMA_PAD, LH = FFN_CHUNK + MMA_PAD;
    static constexpr int W1_HALVES = FFN_CHUNK * LD, W2_HALVES = D * LH;
    // Byte offsets for a block of `rows` tokens.
    int normed, w1, w2;
    __device__ explicit FfnShared(int rows)
        : normed(0),                       // LN(x): rows × LD halves
          w1(normed + rows * LD * 2),      // W1 chunks: 2 × FFN_CHUNK × LD halves
          w2(w1 + 2 * W1_HALVES * 2) {}    // W2 chunks: 2 × D × LH halves
};

template <int D>
__device__ void feed_forward_mma(__half* x, const __half* gamma, const __half* beta, const __half* w1,
                                 const __half* b1, const __half* w2, const __half* b2, int64_t n, int64_t hidden) {
    using L = FfnShared<D>;
    const L layout(fused_rows());
    extern __shared__ float ffn_shared[];
    unsigned char* base = (unsigned char*)ffn_shared;
    __half* normed = (__half*)(base + layout.normed);
    __half* w1s = (__half*)(base + layout.w1);
    __half* w2s = (__half*)(base + layout.w2);
    const int64_t row0 = (int64_t)blockIdx.x * fused_rows();
    const int lane = threadIdx.x % 32, r0 = 16 * (threadIdx.x / 32), t = lane % 4;
    // Copies chunk c0's W1 and W2 blocks into buffer `buffer` as one group of cp.async copies.
    auto prefetch = [&](int64_t c0, int buffer) {
        stage_weights_async(w1s + buffer * L::W1_HALVES, L::LD, w1, hidden, D, c0, 0, FFN_CHUNK, D);
        stage_weights_async(w2s + buffer * L::W2_HALVES, L::LH, w2, D, hidden, 0, c0, D, FFN_CHUNK);
        __pipeline_commit();
    };
    prefetch(0, 0);
    layer_norm_rows<D>(normed, L::LD, x, gamma, beta, n, row0, fused_rows());

    float y[D / 8][4];  // Y, b2 added from the start
    fill_tiles_with_bias<D>(y, b2);
    for (int64_t c0 = 0, chunk = 0; c0 < hidden; c0 += FFN_CHUNK, ++chunk) {
        const int buffer = chunk % 2;
        const __half* w1c = w1s + buffer * L::W1_HALVES;
        const __half* w2c = w2s + buffer * L::W2_HALVES;
        // The other buffer was last read by the previous chunk, which every warp has finished
        // (the barrier ending it).
        if (c0 + FFN_CHUNK < hidden) prefetch(c0 + FFN_CHUNK, 1 - buffer);
        else __pipeline_commit();  // an empty group: this chunk's is always the one before last
        __pipeline_wait_prior(1);
        __syncthreads();  // every thread's copies of this chunk (and, at first, LN(x)) are visible

        float h[FFN_CHUNK / 8][4];
        warp_rows_linear<FFN_CHUNK, D>(h, normed + r0 * L::LD, L::LD, w1c, L::LD, nullptr);
        // GELU(H + b1) into the A fragments of the second product, 16 hidden units (two C tiles)
        // at a time. Units past `hidden` have zero weights on both sides.
#pragma unroll
        for (int k = 0; k < FFN_CHUNK / 16; ++k) {
            float v[2][4];
#pragma unroll
            for (int tile = 0; tile < 2; ++tile) {
                const int64_t unit = c0 + 16 * k + 8 * tile + 2 * t;
                const float bias0 = unit < hidden ? __half2float(b1[unit]) : 0.f;
                const float bias1 = unit + 1 < hidden ? __half2float(b1[unit + 1]) : 0.f;
#pragma unroll
                for (int i = 0; i < 4; ++i) v[tile][i] = gelu_fast(h[2 * k + tile][i] + (i % 2 ? bias1 : bias0));
            }
            uint32_t a[4];
            tiles_as_a_fragment(a, v[0], v[1]);
            mma_rows_k16<D>(y, a, w2c, L::LH, 16 * k);
        }
        __syncthreads();  // every warp is done with this buffer, which the next chunk's prefetch refills
    }
    add_tiles_to_rows<D>(x, y, n, row0 + r0);
}

#define FEED_FORWARD_MMA(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS, 2) feed_forward_mma_f16_##D(             \
        __half* x, const __half* g, const __half* b, const __half* w1, const __half* b1, const __half* w2,   \
        const __half* b2, int64_t n, int64_t hidden) {                                                       \
        feed_forward_mma<D>(x, g, b, w1, b1, w2, b2, n, hidden);                                             \
    }
FOR_EACH_FUSED_WIDTH(FEED_FORWARD_MMA)
