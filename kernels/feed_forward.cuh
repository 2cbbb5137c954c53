// The feed-forward sub-layer of the TIS head as a block-level device function, shared by
// `feed_forward_mma_f16_*` (kernels/linear.cu) and the click side's `click_update_f16_*`
// (kernels/attention.cu), which runs it over the clicks inside its one block.
#pragma once

#include "mma.cuh"

// The feed-forward sub-layer in one kernel: x ← x + W2·GELU(W1·LN(x) + b1) + b2, per block of
// fused_rows() tokens, f16 on tensor cores through mma.sync (mma.cuh). Warp w owns rows
// 16w..16w+15 throughout, so after LN(x) (into shared memory, one warp per row) the warps share
// nothing but the staged weights. The hidden layer goes FFN_CHUNK units at a time: the warp's
// H = LN(x)·W1ᵀ + b1 for one chunk (16 × 32, four f32 C tiles in registers, b1 there from the
// start), then GELU applied in registers and the C tiles packed as f16 into the A fragments of
// Y += H·W2ᵀ over that chunk (the C and A layouts line up; mma.cuh). H never leaves the
// registers and Y (16 × D, D/8 C tiles) stays there until the residual, which each lane adds to
// its own x values (f16 pairs).
// x is read twice (LN, residual) and written once. Each chunk of W1 (32 × D) and W2 (D × 32) is
// staged in shared memory for the block's warps, double-buffered: the next chunk's copies
// (cp.async) fly while this one multiplies, and the first chunk's while LN(x) is computed; every
// block reads the weights from L2 once (256 KB per 128 tokens for TIS-B, D 128 and hidden 512).
// Shared memory, laid out as `FfnShared` says, is 71 KB at D 128 and 128 rows, and registers stay
// within 128 a thread (__launch_bounds__), so that two blocks (16 warps) share a multiprocessor.
// Per warp and chunk that is 64 mma.sync against 40 ldmatrix and 16 GELUs a lane (gelu_fast_f16x2,
// in pairs).
// The WMMA version before it spent more issue slots on the GELU's erff, on the accumulators'
// round trips through shared memory and on fragment loads than on its 64 products, with one
// block of 8 warps a multiprocessor (5.94 ms a layer on an H200, 69 TFLOP/s).
constexpr int FFN_CHUNK = 32;

// The shared memory of GELU(A·W1ᵀ + b1)·W2ᵀ over a block's rows (`GeluMlpChunks`): A's rows (K
// wide), two chunks of W1 (FFN_CHUNK × K) and two of W2 (D × FFN_CHUNK), rows padded by 8 halves.
// The FFN's A is LN(x) (K = D); the label MLP's, the probabilities (K = 16, zero past the classes).
template <int K, int D> struct FfnShared {
    static constexpr int LD = K + MMA_PAD, LH = FFN_CHUNK + MMA_PAD;
    static constexpr int W1_HALVES = FFN_CHUNK * LD, W2_HALVES = D * LH;
    // Byte offsets for a block of `rows` tokens.
    int normed, w1, w2;
    __device__ explicit FfnShared(int rows)
        : normed(0),                       // A: rows × LD halves
          w1(normed + rows * LD * 2),      // W1 chunks: 2 × FFN_CHUNK × LD halves
          w2(w1 + 2 * W1_HALVES * 2) {}    // W2 chunks: 2 × D × LH halves
};

// y += GELU(A·W1ᵀ + b1)·W2ᵀ for each warp's 16 rows of A, the hidden units FFN_CHUNK at a time
// (W1: hidden × `width` values, W2: D × hidden, PyTorch's [out][in]): the loop of the FFN and of
// the label MLP. The caller starts the first chunk's copies (`prefetch(0, 0)`), writes A's rows
// into shared memory meanwhile, and runs `multiply` with every warp of the block.
template <int K, int D> struct GeluMlpChunks {
    using L = FfnShared<K, D>;
    __half* w1s;
    __half* w2s;
    const __half* w1;
    const __half* b1;
    const __half* w2;
    int64_t width, hidden;
    __device__ GeluMlpChunks(const L& layout, const __half* w1, const __half* b1, const __half* w2, int64_t width,
                             int64_t hidden)
        : w1s(shared_halves(layout.w1)), w2s(shared_halves(layout.w2)), w1(w1), b1(b1), w2(w2), width(width),
          hidden(hidden) {}
    // Copies chunk c0's W1 and W2 blocks into buffer `buffer` as one group of cp.async copies
    // (zero past W1's `width` columns and past `hidden`).
    __device__ __forceinline__ void prefetch(int64_t c0, int buffer) const {
        stage_weights_async(w1s + buffer * L::W1_HALVES, L::LD, w1, hidden, width, c0, 0, FFN_CHUNK, K);
        stage_weights_async(w2s + buffer * L::W2_HALVES, L::LH, w2, D, hidden, 0, c0, D, FFN_CHUNK);
        __pipeline_commit();
    }
    // `rows`: the warp's 16 rows of A (ld halves apart).
    __device__ __forceinline__ void multiply(float (&y)[D / 8][4], const __half* rows, int ld) const {
        for (int64_t c0 = 0, chunk = 0; c0 < hidden; c0 += FFN_CHUNK, ++chunk) {
            const int buffer = chunk % 2;
            const __half* w1c = w1s + buffer * L::W1_HALVES;
            const __half* w2c = w2s + buffer * L::W2_HALVES;
            // The other buffer was last read by the previous chunk, which every warp has finished
            // (the barrier ending it).
            if (c0 + FFN_CHUNK < hidden) prefetch(c0 + FFN_CHUNK, 1 - buffer);
            else __pipeline_commit();  // an empty group: this chunk's is always the one before last
            __pipeline_wait_prior(1);
            __syncthreads();  // every thread's copies of this chunk (and, at first, A's rows) are visible

            float h[FFN_CHUNK / 8][4];  // H, b1 added from the start
            warp_rows_linear<FFN_CHUNK, K>(h, rows, ld, w1c, L::LD, b1 + c0, hidden - c0);
            // GELU(H) into the A fragments of the second product, 16 hidden units (two C tiles) at
            // a time. Units past `hidden` have zero weights on both sides.
#pragma unroll
            for (int k = 0; k < FFN_CHUNK / 16; ++k) {
                uint32_t a[4];
                gelu_tiles_as_a_fragment(a, h[2 * k], h[2 * k + 1]);
                mma_rows_k16<D>(y, a, w2c, L::LH, 16 * k);
            }
            __syncthreads();  // every warp is done with this buffer, which the next chunk's prefetch refills
        }
    }
};

template <int D>
__device__ void feed_forward_mma(__half* x, const __half* gamma, const __half* beta, const __half* w1,
                                 const __half* b1, const __half* w2, const __half* b2, int64_t n, int64_t hidden) {
    using L = FfnShared<D, D>;
    const L layout(fused_rows());
    const GeluMlpChunks<D, D> chunks(layout, w1, b1, w2, D, hidden);
    __half* normed = shared_halves(layout.normed);
    const int64_t row0 = (int64_t)blockIdx.x * fused_rows();
    const int r0 = 16 * (threadIdx.x / 32);
    chunks.prefetch(0, 0);
    layer_norm_rows<D>(normed, L::LD, x, D, gamma, beta, n, row0, fused_rows());
    float y[D / 8][4];  // Y, b2 added from the start
    fill_tiles_with_bias<D>(y, b2);
    chunks.multiply(y, normed + r0 * L::LD, L::LD);
    write_tiles_to_rows<D, true>(x, y, n, row0 + r0);
}

// The label MLP over a block of tokens, out = GELU(P·W_upᵀ + b_up)·W_downᵀ + b_down, for
// probabilities P of at most LABEL_MLP_CLASSES classes (zero-padded to them: one K step) and
// outputs D wide: the head's Va, once a click. The loop is the FFN's; P's rows are staged
// value by value (`classes` values a row, no 16-byte pieces), and Y is written, f16 pairs.
constexpr int LABEL_MLP_CLASSES = 16;

template <int D>
__device__ void label_mlp_mma(const __half* p, const __half* w_up, const __half* b_up, const __half* w_down,
                              const __half* b_down, __half* out, int64_t n, int64_t classes, int64_t hidden) {
    using L = FfnShared<LABEL_MLP_CLASSES, D>;
    const L layout(fused_rows());
    const GeluMlpChunks<LABEL_MLP_CLASSES, D> chunks(layout, w_up, b_up, w_down, classes, hidden);
    __half* rows = shared_halves(layout.normed);
    const int64_t row0 = (int64_t)blockIdx.x * fused_rows();
    const int r0 = 16 * (threadIdx.x / 32);
    chunks.prefetch(0, 0);
    stage_weights_async(rows, L::LD, p, n, classes, row0, 0, fused_rows(), LABEL_MLP_CLASSES);
    __pipeline_commit();  // a group of its own (where the classes come in eights), which multiply waits for
    float y[D / 8][4];  // Y, b_down added from the start
    fill_tiles_with_bias<D>(y, b_down);
    chunks.multiply(y, rows + r0 * L::LD, L::LD);
    write_tiles_to_rows<D, false>(out, y, n, row0 + r0);
}

// With wgmma (sm_90a, widths that are multiples of 64, blocks of 128 tokens), the same sub-layer
// as warpgroup products: mma.sync reaches about half of an H100's dense f16 rate (public
// microbenchmarks; the full rate takes wgmma), and the FFN is two thirds of a click's FLOPs. The two
// warpgroups of a block own 64 rows each. LN(x) goes into shared memory as wgmma's core matrices
// (K = D); the hidden layer goes FFN_WGMMA_CHUNK units at a time, each chunk of W1 (64 × D) and
// W2 (D × 64) staged as core matrices, double-buffered as above. Per chunk a warpgroup's
// H = LN(x)·W1ᵀ is D/16 wgmma of 64 × 64 × 16 into registers (b1 there from the start); GELU
// applied there, H is packed as f16 straight into the A fragments of Y += GELU(H)·W2ᵀ, 4 wgmma of
// 64 × D × 16 with A from registers (two of 64 × 64 × 16 each at D 64; warpgroup_product), Y
// (64 × D, D/2 f32 a thread) staying in registers until the residual. The accumulators of warp w
// of a warpgroup are its rows 16w to 16w + 15 as mma.sync's C tiles (mma.cuh), which are also
// the layout of its A fragments, so the bias, GELU, packing and residual code is the mma.sync
// path's. (GELU(H) went through shared memory before, as the second product's A: per chunk and
// block the tensor cores then read 112 KB of operands from shared memory and the copies and H
// wrote 48 KB, some 156 bytes a cycle at their full rate against the 128 a multiprocessor's
// shared memory gives; with A in registers, 128 KB (design arithmetic), and one barrier a chunk
// instead of three.) Each product is waited for at once; the two blocks a multiprocessor takes
// (96 KB of shared memory each at D 128) fill one another's GELU and copies. Every thread fences
// its shared-memory writes (copies, LN) towards the tensor cores before the barrier after which
// wgmma reads them.
constexpr int FFN_WGMMA_CHUNK = 64;

template <int D> struct FfnWgmmaShared {
    static constexpr int ROWS = 128, CH = FFN_WGMMA_CHUNK;
    static constexpr int W1_HALVES = CH * D, W2_HALVES = D * CH;
    // Byte offsets.
    static constexpr int normed = 0;                      // LN(x): ROWS × D, core matrices along D
    static constexpr int w1 = normed + ROWS * D * 2;      // W1 chunks: 2 × CH × D, along D
    static constexpr int w2 = w1 + 2 * W1_HALVES * 2;     // W2 chunks: 2 × D × CH, along CH
};

#ifdef TIS_WGMMA
template <int D>
__device__ void feed_forward_wgmma(__half* x, const __half* gamma, const __half* beta, const __half* w1,
                                   const __half* b1, const __half* w2, const __half* b2, int64_t n, int64_t hidden) {
    using L = FfnWgmmaShared<D>;
    constexpr int CH = L::CH;
    __half* normed = shared_halves(L::normed);
    __half* w1s = shared_halves(L::w1);
    __half* w2s = shared_halves(L::w2);
    const int warp = threadIdx.x / 32, group = warp / 4;
    const int64_t row0 = (int64_t)blockIdx.x * L::ROWS;
    // Copies chunk c0's W1 and W2 blocks into buffer `buffer` as one group of cp.async copies.
    auto prefetch = [&](int64_t c0, int buffer) {
        stage_core_matrices_async<D, CH, FUSED_MAX_THREADS>(w1s + buffer * L::W1_HALVES, w1, hidden, D, c0, 0);
        stage_core_matrices_async<CH, D, FUSED_MAX_THREADS>(w2s + buffer * L::W2_HALVES, w2, D, hidden, 0, c0);
        __pipeline_commit();
    };
    prefetch(0, 0);
    layer_norm_rows_at<D>(
        normed, [](int r, int f) { return core_matrix_offset<D>(r, f); }, x, D, gamma, beta, n, row0, L::ROWS);
    const SharedOperand normed_rows = core_matrices<D>(normed).at(core_matrix_offset<D>(64 * group, 0));

    float y[D / 8][4];  // Y, b2 added from the start
    fill_tiles_with_bias<D>(y, b2);
    for (int64_t c0 = 0, chunk = 0; c0 < hidden; c0 += CH, ++chunk) {
        const int buffer = chunk % 2;
        __pipeline_wait_prior(0);
        fence_proxy_async();
        // Every thread's copies of this chunk (and, at first, LN(x)) are visible, and every warp
        // is done with the other buffer, the last chunk's, which the next chunk's copies fill
        // while this one multiplies.
        __syncthreads();
        if (c0 + CH < hidden) prefetch(c0 + CH, 1 - buffer);

        float h[CH / 8][4];  // H, b1 added from the start; units past `hidden` have zero weights
        fill_tiles_with_bias<CH>(h, b1 + c0, hidden - c0);
        warpgroup_product<CH, D>(h, normed_rows, core_matrices<D>(w1s + buffer * L::W1_HALVES));
        uint32_t gelu_h[CH / 16][4];  // GELU(H) as the A fragments of the next product
#pragma unroll
        for (int k = 0; k < CH / 16; ++k) gelu_tiles_as_a_fragment(gelu_h[k], h[2 * k], h[2 * k + 1]);
        warpgroup_product<D, CH>(y, gelu_h, core_matrices<CH>(w2s + buffer * L::W2_HALVES));
    }
    write_tiles_to_rows<D, true>(x, y, n, row0 + 16 * warp);
}
#endif
