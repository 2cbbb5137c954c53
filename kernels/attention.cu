// Attention of the TIS head.
//
// Click cross-attention (few queries, up to millions of keys) never forms the N × d keys or
// values: the key projection is folded into the queries, q·(LN(x)·Wkᵀ + bk)ᵀ = (q·Wk)·LN(x)ᵀ +
// q·bk (`cross_fold`), and the value projection is applied after the weighted sum, since the
// softmax weights sum to one: Σ a·(LN(x)·Wvᵀ + bv) = (Σ a·LN(x))·Wvᵀ + bv (`cross_project`).
// `cross_partial` splits the voxels over blocks; a block walks its voxels in tiles of 32 rows:
// LayerNorm into shared memory (one warp per row), scores against every (click, head) column,
// then an online-softmax update of the block's running max, sum and Σ exp·LN(x) per column, all
// in shared memory (columns × d floats; columns are split over blockIdx.y when they would not
// fit). With f16 storage and the fused kernels' widths, `cross_partial_mma_f16_{D}` does the
// same on tensor cores (below). `cross_merge` combines the blocks' partials (flash-attention
// style) into the weighted mean of LN(x) per column.
//
// Label assignment (`assign_mix`): one thread per (voxel, head) scores the voxel's query against
// the click keys, softmaxes over the clicks, copies the clicks' label embeddings A·Vc and mixes
// them with the automatic segmentation's embedding: (1 − α)·U + α·Va. A bound on the head width
// is a template parameter (8, 16, 32, 64; the width itself, e.g. 12, is an argument), so the
// query and the running sum stay in registers. One pass over the clicks (a running maximum), the
// clicks' rows read 16 bytes at a time where the head width comes in eights.
//
// `assign_fused_f16_{D}` is the whole label-assignment sub-layer in one kernel, for f16 widths
// D that are multiples of 16 up to 128, per block of fused_rows() tokens, each warp owning 16
// rows: LN_q(x) and Q = LN_q(x)·Wqᵀ + bq (mma.sync, mma.cuh; Q kept as f16 rows), then per head
// the softmax over the clicks and the copy of their label embeddings on tensor cores
// (`copy_click_labels_mma`, the clicks' keys and values packed beforehand as its B fragments by
// `pack_click_fragments_f16`, which every block reads from L1) and the α mix with the automatic
// segmentation's embedding Va (label_mlp(P), the same in every layer: computed once a click and
// passed in), written in place over Va as the operand of the output projection, whose C tiles
// are added straight into x. x is read twice (LN, residual) and written once, Va read once;
// nothing N × D is written to global memory. Wq, then W_out, is staged in shared memory, each
// copied with cp.async while the CUDA-core step before its GEMM runs (LN_q; the softmax, copy
// and mix), Va's rows with Wq. Dynamic shared memory, laid out as `AssignShared` says: 102 KB at
// D = 128 and 128 rows, two blocks a multiprocessor (registers are held to 128 a thread).
// (Before, each layer ran the label MLP on the probabilities of its block again: its K-wide first
// layer on the CUDA cores, about 1,900 instructions a thread of the sm_90a SASS at TIS-B's
// width, and a third D × D product.)
// `assign_wgmma_f16_{64,128}` is the same sub-layer for sm_90a, its two D × D products as
// warpgroup products (wgmma, 64 rows a warpgroup, the operands and the weights as core matrices):
// mma.sync reaches about half of an H100's dense f16 rate.
//
// `attention_small`: plain attention among the clicks, one block per (query, head).
//
// `click_update_f16_{D}` is the click side of a layer after its cross-attention in one block
// (for up to 128 clicks, heads of at most 64): the cross-attention's output projection and
// residual, the self-attention sub-layer among the clicks, their FFN (`feed_forward_mma`, as
// over the voxels) and the label assignment's click keys LN_k(c)·W_kᵀ + b_k. Run as separate
// launches these were some twelve kernels a layer of one or two blocks each, every one
// latency-bound (run B's Nsight Compute: about 30 µs for a click-side linear) and waiting for
// the one before. Here each warp owns 16 click rows, as in the fused kernels over the voxels:
// its rows of LN(c) give its rows of K and V (shared memory, for every warp's queries) and of Q
// (written over LN(c)); the attention per head is `copy_click_labels_mma` with K and V read from
// shared memory, its output written over Q; the projections add their C tiles straight into the
// clicks' rows. One D × D weight matrix is staged at a time, the next one's copies flying while
// the CUDA-core steps run. Dynamic shared memory as `ClickShared` says (the FFN lays out its own
// over the same bytes once the attention is done): 87 KB at D = 128 and 64 rows.
#include "feed_forward.cuh"

constexpr int ROWS = 32;          // voxels per tile of cross_partial
constexpr int CROSS_THREADS = 256;

// folded[col, f] = scale·Σ_{e ∈ head h} q[c, e]·Wk[e, f]; offset[col] = scale·Σ q[c, e]·bk[e];
// col = c·heads + h. One thread per (col, f), f = d computing the offset.
template <typename T>
__device__ void cross_fold(const T* q, const T* wk, const T* bk, float* folded, float* offset, int64_t clicks,
                           int64_t width, int64_t heads) {
    int64_t dh = width / heads;
    float scale = rsqrtf((float)dh);
    GRID_LOOP(i, clicks * heads * (width + 1)) {
        int64_t f = i % (width + 1), col = i / (width + 1);
        int64_t c = col / heads, h = col % heads;
        float acc = 0.f;
        for (int64_t e = h * dh; e < (h + 1) * dh; ++e)
            acc += to_f32(q[c * width + e]) * (f < width ? to_f32(wk[e * width + f]) : to_f32(bk[e]));
        if (f < width) folded[col * width + f] = scale * acc;
        else offset[col] = scale * acc;
    }
}

// Dynamic shared memory: ln[ROWS][width + 1], score[ROWS][group], max/sum/correction[group],
// weighted[group][width]; `group` columns per blockIdx.y. The scores give a warp one column and
// its 32 rows, so that the folded query is one broadcast load and the rows (odd stride) fall in
// 32 banks; the weighted sums give it 32 values of one column.
template <typename T>
__device__ void cross_partial(const T* x, const T* gamma, const T* beta, const float* folded, const float* offset,
                              float* part_max, float* part_sum, float* part_weighted, int64_t n, int64_t width,
                              int64_t columns, int64_t group, int64_t tokens_per_block) {
    extern __shared__ float shared[];
    const int64_t lw = width + 1;
    float* ln = shared;
    float* score = ln + ROWS * lw;
    float* run_max = score + ROWS * group;
    float* run_sum = run_max + group;
    float* correction = run_sum + group;
    float* weighted = correction + group;
    int64_t col0 = (int64_t)blockIdx.y * group;
    int64_t cols = min(group, columns - col0);
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) { run_max[i] = -INFINITY; run_sum[i] = 0.f; }
    for (int64_t i = threadIdx.x; i < cols * width; i += blockDim.x) weighted[i] = 0.f;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    int64_t begin = (int64_t)blockIdx.x * tokens_per_block, end = min(n, begin + tokens_per_block);
    for (int64_t t0 = begin; t0 < end; t0 += ROWS) {
        __syncthreads();
        for (int r = warp; r < ROWS; r += warps) {
            int64_t token = t0 + r;
            float* dest = ln + r * lw;
            if (token >= end) {
                for (int64_t f = lane; f < width; f += 32) dest[f] = 0.f;
                continue;
            }
            warp_layer_norm(x + token * width, gamma, beta, width, lane, [&](int64_t f, float v) { dest[f] = v; });
        }
        __syncthreads();
        for (int64_t i = threadIdx.x; i < ROWS * cols; i += blockDim.x) {
            int64_t r = i % ROWS, c = i / ROWS;
            float s = -INFINITY;
            if (t0 + r < end) {
                const float* fold = folded + (col0 + c) * width;
                s = offset[col0 + c];
                for (int64_t f = 0; f < width; ++f) s += ln[r * lw + f] * fold[f];
            }
            score[r * group + c] = s;
        }
        __syncthreads();
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
            float tile_max = -INFINITY;
            for (int r = 0; r < ROWS; ++r) tile_max = fmaxf(tile_max, score[r * group + c]);
            float new_max = fmaxf(run_max[c], tile_max);
            float corr = __expf(run_max[c] - new_max);  // 0 while run_max is -inf
            float sum = 0.f;
            for (int r = 0; r < ROWS; ++r) {
                float p = __expf(score[r * group + c] - new_max);
                score[r * group + c] = p;
                sum += p;
            }
            run_sum[c] = run_sum[c] * corr + sum;
            run_max[c] = new_max;
            correction[c] = corr;
        }
        __syncthreads();
        for (int64_t i = threadIdx.x; i < cols * width; i += blockDim.x) {
            int64_t c = i / width, f = i % width;
            float acc = weighted[i] * correction[c];
            for (int r = 0; r < ROWS; ++r) acc += score[r * group + c] * ln[r * lw + f];
            weighted[i] = acc;
        }
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        part_max[blockIdx.x * columns + col0 + c] = run_max[c];
        part_sum[blockIdx.x * columns + col0 + c] = run_sum[c];
    }
    for (int64_t i = threadIdx.x; i < cols * width; i += blockDim.x)
        part_weighted[(blockIdx.x * columns + col0) * width + i] = weighted[i];
}

// `cross_partial_mma_f16_{D}`: cross_partial on tensor cores, for the f16 widths of the fused
// kernels. It is flash attention turned around: the queries are the (click, head) columns, the
// keys and values the voxels' LN(x), and each warp owns 16 columns of its block's group (the
// group's folded queries staged once as f16). A block walks its voxels in tiles of
// CROSS_MMA_TOKENS: the tile's LN(x) goes to shared memory as f16 (every warp normalises some
// rows), then each warp, on its own and in registers (mma.sync, mma.cuh): S = F·LN(x)ᵀ
// (16 columns × 64 voxels, K = D, eight C tiles); each column's running max and sum (the quad of
// lanes holding a column exchanges its maximum by shuffles), O rescaled where the max grew;
// P = e^(S − max) packed as f16 straight from S's C tiles into the A fragments of
// O += P·LN(x) (16 × D, K = 64; LN(x) read transposed by ldmatrix.trans). Per voxel and column
// that is 2·D multiply-accumulates on tensor cores. The WMMA version before it took S and O
// through shared memory and gave the softmax two lanes a column, 32 exponentials in a row
// (1.62 ms a layer for TIS-B on an H200). A block walks some 47 tiles (TIS-B), so the next
// tile's x is copied into shared memory (cp.async) while the warps work on this one, and LN(x)
// reads it from there: where each tile's LayerNorm loaded x from global memory itself, the
// block waited out a memory round trip for every pair of rows a warp normalised.
constexpr int CROSS_MMA_TOKENS = 64;

template <int D> struct CrossShared {
    static constexpr int T = CROSS_MMA_TOKENS, LD = D + MMA_PAD;
    // Byte offsets: LN(x) of the tile (T × LD halves), the next tile's x (T × LD halves: padded
    // rows, which layer_norm_rows_at reads without bank conflicts), then the group's folded
    // queries (16·warps × LD halves).
    static constexpr int ln = 0, next = T * LD * 2, fold = next + T * LD * 2;
};

template <int D>
__device__ void cross_partial_mma(const __half* x, const __half* gamma, const __half* beta, const float* folded,
                                  const float* offset, float* part_max, float* part_sum, float* part_weighted,
                                  int64_t n, int64_t columns, int64_t tokens_per_block) {
    using L = CrossShared<D>;
    constexpr int T = CROSS_MMA_TOKENS;
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    __half* ln = shared_halves(L::ln);
    __half* next = shared_halves(L::next);
    __half* fold = shared_halves(L::fold);
    const int64_t col0 = (int64_t)blockIdx.y * 16 * warps + 16 * warp;  // the warp's first column
    for (int l = threadIdx.x; l < 16 * warps * D; l += blockDim.x) {
        int64_t c = (int64_t)blockIdx.y * 16 * warps + l / D;
        fold[l / D * L::LD + l % D] = __float2half_rn(c < columns ? folded[c * D + l % D] : 0.f);
    }
    // The lane's columns: col0 + g (C elements 0 and 1) and col0 + g + 8 (elements 2 and 3).
    float bias[2], run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int64_t c = col0 + g + 8 * half;
        bias[half] = c < columns ? offset[c] : 0.f;
    }
    float o[D / 8][4] = {};
    const int64_t begin = (int64_t)blockIdx.x * tokens_per_block, end = min(n, begin + tokens_per_block);
    // The tile from t0 on into `next`, zero past the block's voxels, as one group of copies.
    auto prefetch = [&](int64_t t0) {
        stage_weights_async(next, L::LD, x, end, D, t0, 0, T, D);
        __pipeline_commit();
    };
    if (begin < end) prefetch(begin);
    for (int64_t t0 = begin; t0 < end; t0 += T) {
        __pipeline_wait_prior(0);
        __syncthreads();  // the tile's x has landed; every warp is done with the previous LN(x)
        layer_norm_rows<D>(ln, L::LD, next, L::LD, gamma, beta, min((int64_t)T, end - t0), 0, T);
        __syncthreads();  // LN(x) is ready and `next` free for the tile after
        if (t0 + T < end) prefetch(t0 + T);
        // S: element i of C tile j is voxel t0 + 8j + 2t + i % 2 of column col0 + g + 8·(i / 2).
        float s[T / 8][4];
        warp_rows_linear<T, D>(s, fold + 16 * warp * L::LD, L::LD, ln, L::LD, nullptr);
        // The columns' offsets added, and the voxels past the block's left out (its last tile only:
        // elsewhere the comparisons would be half of this step's instructions).
        const int valid = (int)min((int64_t)T, end - t0);
#pragma unroll
        for (int j = 0; j < T / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[j][i] += bias[i / 2];
        if (valid < T)
#pragma unroll
            for (int j = 0; j < T / 8; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    if (8 * j + 2 * t + i % 2 >= valid) s[j][i] = -INFINITY;
        online_softmax_block(s, run_max, run_sum, o, [](float v) { return __expf(v); });
        // O += P·LN(x): P's A fragments are S's C tiles 2k and 2k + 1 (voxels 16k to 16k + 15).
#pragma unroll
        for (int k = 0; k < T / 16; ++k) {
            uint32_t p[4];
            tiles_as_a_fragment(p, s[2 * k], s[2 * k + 1]);
            mma_rows_k16<D, true>(o, p, ln, L::LD, 16 * k);
        }
    }
    const int64_t slot = (int64_t)blockIdx.x * columns;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float sum = quad_sum(run_sum[half]);
        const int64_t c = col0 + g + 8 * half;
        if (c >= columns) continue;
        if (t == 0) {
            part_max[slot + c] = run_max[half];
            part_sum[slot + c] = sum;
        }
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *(float2*)&part_weighted[(slot + c) * D + 8 * j + 2 * t] = float2{o[j][2 * half], o[j][2 * half + 1]};
    }
}

#define CROSS_PARTIAL_MMA(D)                                                                                         \
    extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS) cross_partial_mma_f16_##D(                       \
        const __half* x, const __half* g, const __half* b, const float* folded, const float* offset, float* pm,      \
        float* ps, float* pw, int64_t n, int64_t columns, int64_t tokens_per_block) {                                \
        cross_partial_mma<D>(x, g, b, folded, offset, pm, ps, pw, n, columns, tokens_per_block);                     \
    }
FOR_EACH_FUSED_WIDTH(CROSS_PARTIAL_MMA)

// mean[col, f] = Σ_b e^(max_b − M)·weighted_b[col, f] / Σ_b e^(max_b − M)·sum_b with
// M = max_b max_b[col]: a block per column and 32 values of f (blockIdx.y), its MERGE_WARPS warps
// splitting the voxel blocks b between them and a lane per f, so that a warp reads a block's 32
// consecutive partial sums (one 128-byte line) a step, with several steps in flight; the warps'
// sums meet in shared memory. A thread per (col, f) walking every b, as before, was latency-bound:
// 160 µs a layer in run B for TIS-B's 80 columns over 523 blocks (21 MB of partials).
constexpr int MERGE_WARPS = 8;

__device__ void merge_partials(const float* part_max, const float* part_sum, const float* part_weighted, float* mean,
                               int64_t blocks, int64_t columns, int64_t width) {
    __shared__ float reduce[MERGE_WARPS][33];  // each warp's 32 sums and its Σ weight·sum_b
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t col = blockIdx.x, f = 32 * (int64_t)blockIdx.y + lane;
    float m = -INFINITY;
    for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) m = fmaxf(m, part_max[b * columns + col]);
    m = warp_max(m);
    if (lane == 0) reduce[warp][32] = m;
    __syncthreads();
    m = reduce[0][32];
    for (int w = 1; w < MERGE_WARPS; ++w) m = fmaxf(m, reduce[w][32]);
    __syncthreads();  // every thread has read the maxima before reduce is reused
    float sum = 0.f, acc = 0.f;
#pragma unroll 4
    for (int64_t b = warp; b < blocks; b += MERGE_WARPS) {
        const float weight = __expf(part_max[b * columns + col] - m);
        sum += part_sum[b * columns + col] * weight;
        if (f < width) acc += part_weighted[(b * columns + col) * width + f] * weight;
    }
    reduce[warp][lane] = acc;
    if (lane == 0) reduce[warp][32] = sum;
    __syncthreads();
    if (warp == 0 && f < width) {
        float total = 0.f, weights = 0.f;
        for (int w = 0; w < MERGE_WARPS; ++w) {
            total += reduce[w][lane];
            weights += reduce[w][32];
        }
        mean[col * width + f] = total / weights;
    }
}

// out[c, e] = mean[(c, head of e)]·Wv[e]ᵀ + bv[e]
template <typename T>
__device__ void cross_project(const float* mean, const T* wv, const T* bv, T* out, int64_t clicks, int64_t width,
                              int64_t heads) {
    int64_t dh = width / heads;
    GRID_LOOP(i, clicks * width) {
        int64_t c = i / width, e = i % width;
        const float* m = mean + (c * heads + e / dh) * width;
        float acc = to_f32(bv[e]);
        for (int64_t f = 0; f < width; ++f) acc += m[f] * to_f32(wv[e * width + f]);
        out[i] = from_f32<T>(acc);
    }
}

// Whether a head's dh values of every click row can be read 8 at a time: dh and the row width in
// eights, the rows 16-byte aligned.
template <typename T>
__device__ __forceinline__ bool heads_by_eight(const T* keys, const T* values, int64_t width, int dh) {
    return dh % 8 == 0 && width % 8 == 0 && (uintptr_t)keys % 16 == 0 && (uintptr_t)values % 16 == 0;
}

// f(e, value[e]) for e < dh, widened, the loop unrolled to the bound MAX_DH and left at dh (so
// that register arrays indexed by e stay in registers, and a head narrower than the bound issues
// no idle iterations); 8 values a load where `by8`.
template <int MAX_DH, typename T, typename F>
__device__ __forceinline__ void for_each_head_value(const T* value, int dh, bool by8, F f) {
    if (by8) {
#pragma unroll
        for (int e0 = 0; e0 < MAX_DH; e0 += 8) {
            if (e0 >= dh) break;
            float v[8];
            load8(value + e0, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) f(e0 + j, v[j]);
        }
        return;
    }
#pragma unroll
    for (int e = 0; e < MAX_DH; ++e) {
        if (e >= dh) break;
        f(e, to_f32(value[e]));
    }
}

// The label copy of one (token, head): out = Σ_c softmax_c(query·key_c/√dh)·value_c over the
// clicks, where key_c and value_c are the head's dh values in click c's row (`keys` and
// `values` point at the head's first value of click 0; rows are `width` apart). One pass over
// the clicks with a running maximum (out and the sum rescaled when it grows), out in registers.
template <int MAX_DH, typename Q, typename T>
__device__ __forceinline__ void copy_click_labels(const Q* query, const T* keys, const T* values, int64_t clicks,
                                                  int64_t width, int dh, bool by8, float (&out)[MAX_DH]) {
    float scale = rsqrtf((float)dh), max = -INFINITY, sum = 0.f;
#pragma unroll
    for (int e = 0; e < MAX_DH; ++e) out[e] = 0.f;
    for (int64_t c = 0; c < clicks; ++c) {
        float s = 0.f;
        for_each_head_value<MAX_DH>(keys + c * width, dh, by8, [&](int e, float k) { s += to_f32(query[e]) * k; });
        s *= scale;
        float correction = 1.f;
        if (s > max) {
            correction = __expf(max - s);  // 0 at the first click
            max = s;
        }
        float p = __expf(s - max);
        sum = sum * correction + p;
        for_each_head_value<MAX_DH>(values + c * width, dh, by8,
                                    [&](int e, float v) { out[e] = out[e] * correction + p * v; });
    }
    float inverse = 1.f / sum;
#pragma unroll
    for (int e = 0; e < MAX_DH; ++e) out[e] *= inverse;
}

template <typename T, int MAX_DH>
__device__ void assign_mix(const T* q, const T* keys, const T* values, const T* auto_embedding, T* mixed, int64_t n,
                           int64_t clicks, int64_t heads, int dh, float alpha) {
    int64_t width = heads * dh;
    const bool by8 = heads_by_eight(keys, values, width, dh);
    GRID_LOOP(i, n * heads) {
        int64_t token = i / heads, h = i % heads;
        float query[MAX_DH], copied[MAX_DH];
#pragma unroll
        for (int e = 0; e < MAX_DH; ++e) query[e] = e < dh ? to_f32(q[token * width + h * dh + e]) : 0.f;
        copy_click_labels<MAX_DH>(query, keys + h * dh, values + h * dh, clicks, width, dh, by8, copied);
#pragma unroll
        for (int e = 0; e < MAX_DH; ++e) {
            if (e >= dh) break;
            int64_t o = token * width + h * dh + e;
            mixed[o] = from_f32<T>((1.f - alpha) * copied[e] + alpha * to_f32(auto_embedding[o]));
        }
    }
}

// One block per (query, head); keys are few (clicks). Dynamic shared memory: one float per key.
template <typename T>
__device__ void attention_small(const T* q, const T* k, const T* v, T* out, int64_t keys, int64_t width,
                                int64_t heads) {
    extern __shared__ float scores[];
    __shared__ float reduce[32];
    int64_t query = blockIdx.x, h = blockIdx.y, dh = width / heads;
    float scale = rsqrtf((float)dh);
    float local_max = -INFINITY;
    for (int64_t j = threadIdx.x; j < keys; j += blockDim.x) {
        float s = 0.f;
        for (int64_t e = 0; e < dh; ++e) s += to_f32(q[query * width + h * dh + e]) * to_f32(k[j * width + h * dh + e]);
        scores[j] = s * scale;
        local_max = fmaxf(local_max, s * scale);
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    local_max = warp_max(local_max);
    if (lane == 0) reduce[warp] = local_max;
    __syncthreads();
    float max = -INFINITY;
    for (int w = 0; w < warps; ++w) max = fmaxf(max, reduce[w]);
    __syncthreads();
    float local_sum = 0.f;
    for (int64_t j = threadIdx.x; j < keys; j += blockDim.x) {
        scores[j] = __expf(scores[j] - max);
        local_sum += scores[j];
    }
    local_sum = warp_sum(local_sum);
    if (lane == 0) reduce[warp] = local_sum;
    __syncthreads();
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum += reduce[w];
    for (int64_t e = threadIdx.x; e < dh; e += blockDim.x) {
        float acc = 0.f;
        for (int64_t j = 0; j < keys; ++j) acc += scores[j] * to_f32(v[j * width + h * dh + e]);
        out[query * width + h * dh + e] = from_f32<T>(acc / sum);
    }
}

#define ATTENTION_KERNELS(T, S)                                                                                      \
    extern "C" __global__ void cross_fold_##S(const T* q, const T* wk, const T* bk, float* folded, float* offset,   \
                                              int64_t clicks, int64_t width, int64_t heads) {                        \
        cross_fold<T>(q, wk, bk, folded, offset, clicks, width, heads);                                              \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(CROSS_THREADS)                                                      \
        cross_partial_##S(const T* x, const T* g, const T* b, const float* folded, const float* offset, float* pm,  \
                          float* ps, float* pw, int64_t n, int64_t width, int64_t columns, int64_t group,            \
                          int64_t tokens_per_block) {                                                                \
        cross_partial<T>(x, g, b, folded, offset, pm, ps, pw, n, width, columns, group, tokens_per_block);           \
    }                                                                                                                \
    extern "C" __global__ void cross_project_##S(const float* mean, const T* wv, const T* bv, T* out,               \
                                                 int64_t clicks, int64_t width, int64_t heads) {                     \
        cross_project<T>(mean, wv, bv, out, clicks, width, heads);                                                   \
    }                                                                                                                \
    extern "C" __global__ void attention_small_##S(const T* q, const T* k, const T* v, T* out, int64_t keys,        \
                                                   int64_t width, int64_t heads) {                                   \
        attention_small<T>(q, k, v, out, keys, width, heads);                                                        \
    }                                                                                                                \
    ASSIGN_MIX(T, S, 8) ASSIGN_MIX(T, S, 16) ASSIGN_MIX(T, S, 32) ASSIGN_MIX(T, S, 64)

#define ASSIGN_MIX(T, S, DH)                                                                                         \
    extern "C" __global__ void assign_mix_##S##_##DH(const T* q, const T* k, const T* v, const T* va, T* mixed,     \
                                                     int64_t n, int64_t clicks, int64_t heads, int dh, float alpha) { \
        assign_mix<T, DH>(q, k, v, va, mixed, n, clicks, heads, dh, alpha);                                          \
    }

FOR_EACH_STORAGE(ATTENTION_KERNELS)

extern "C" __global__ void __launch_bounds__(32 * MERGE_WARPS) cross_merge(const float* pm, const float* ps,
                                                                           const float* pw, float* mean,
                                                                           int64_t blocks, int64_t columns,
                                                                           int64_t width) {
    merge_partials(pm, ps, pw, mean, blocks, columns, width);
}

// The clicks' keys and values of one head as the B fragments of the label copy's products
// (copy_click_labels_mma; mma.cuh's layouts, g = lane / 4, t = lane % 4), 16 clicks from c0 on:
// keys(c0, k) those of S = Q_h·K_hᵀ for the head's columns 16k to 16k + 15 (registers 0 and 1
// for clicks c0 to c0 + 7, 2 and 3 for the next eight), values(c0, p) those of O += P·V_h for
// its columns 16p to 16p + 8 (registers 0 and 1) and 16p + 8 to 16p + 15 (2 and 3). Zero past
// the clicks and past the head's dh columns.
//
// ClickRows reads them from the clicks' f16 rows (`keys` and `values` at the head's first
// column, rows `width` apart) a value at a time: 16 loads a fragment with their checks (the
// click update, whose rows lie in its shared memory).
struct ClickRows {
    const __half* keys;
    const __half* values;
    int clicks, width, dh;
    __device__ __forceinline__ uint4 keys_at(int c0, int k) const {
        const int lane = threadIdx.x % 32, g = lane / 4, e = 16 * k + 2 * (lane % 4);
        uint32_t r[4];
#pragma unroll
        for (int tile = 0; tile < 2; ++tile) {
            const int c = c0 + 8 * tile + g;
            r[2 * tile] = pack_halves(at(keys, c, e), at(keys, c, e + 1));
            r[2 * tile + 1] = pack_halves(at(keys, c, e + 8), at(keys, c, e + 9));
        }
        return uint4{r[0], r[1], r[2], r[3]};
    }
    __device__ __forceinline__ uint4 values_at(int c0, int p) const {
        const int lane = threadIdx.x % 32, c = c0 + 2 * (lane % 4);
        uint32_t r[4];
#pragma unroll
        for (int tile = 0; tile < 2; ++tile) {
            const int e = 16 * p + 8 * tile + lane / 4;
            r[2 * tile] = pack_halves(at(values, c, e), at(values, c + 1, e));
            r[2 * tile + 1] = pack_halves(at(values, c + 8, e), at(values, c + 9, e));
        }
        return uint4{r[0], r[1], r[2], r[3]};
    }
    __device__ __forceinline__ __half at(const __half* rows, int c, int e) const {
        return c < clicks && e < dh ? rows[(int64_t)c * width + e] : __float2half(0.f);
    }
};

// PackedClicks reads the same fragments as `pack_click_fragments_f16` laid them out in global
// memory, a lane's four registers one 16-byte load: for each chunk of 16 clicks and each head,
// ⌈dh/16⌉ key fragments then ⌈dh/16⌉ value fragments, 32 lanes' uint4 each (`head` points at
// chunk 0 of the head, chunks `chunk_stride` uint4 apart). Every warp of the label assignment
// reads the same few KB (8 KB for TIS-B's 10 clicks), from L1: per head and 16 clicks two
// loads a lane, where ClickRows's 32 checked 2-byte loads and their packing took some 150
// instructions (sm_90a SASS).
struct PackedClicks {
    const uint4* head;
    int chunk_stride, steps;
    __device__ __forceinline__ uint4 keys_at(int c0, int k) const { return fragment(c0, k); }
    __device__ __forceinline__ uint4 values_at(int c0, int p) const { return fragment(c0, steps + p); }
    __device__ __forceinline__ uint4 fragment(int c0, int slot) const {
        return head[c0 / 16 * chunk_stride + 32 * slot + threadIdx.x % 32];
    }
};

// The label copy of the calling warp's 16 rows for one head, on tensor cores (flash attention
// with the clicks as keys): S = Q_h·K_hᵀ for 16 clicks at a time (two m16n8k16 products per 16
// head columns), an online softmax per row in registers (the quad of lanes holding a row
// exchanges its maximum and sum by shuffles), O_h += P·V_h with P packed as f16 straight from
// S's C tiles (mma.cuh), K_h and V_h as `Clicks` gives their fragments (ClickRows,
// PackedClicks). Q_h comes from the f16 rows `q` (the warp's first row, rows ldq apart, the
// head's first column): one ldmatrix a K step where dh comes in sixteens, else a value at a
// time, zero past dh (any dh ≤ MAX_DH: the default model's 12 pads to 16). Each lane hands its
// share of weight·O_h / Σ to store(row, e, lo, hi), values e and e + 1 of the row (e even,
// e < dh, dh even): rows g and g + 8, head columns 8j + 2t. Per 16 rows, head and 16 clicks that is
// 4·⌈dh/16⌉ products against the CUDA-core copy's 2·dh multiply-adds per row and click.
template <int MAX_DH, typename Clicks, typename Store>
__device__ __forceinline__ void copy_click_labels_mma(const __half* q, int ldq, const Clicks& click, int clicks,
                                                      int dh, float weight, Store store) {
    constexpr int STEPS = (MAX_DH + 15) / 16;  // K steps of S, pairs of O's C tiles
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float scale = rsqrtf((float)dh) * 1.44269504088896340736f;  // scores in log2 units, for exp2
    uint32_t qa[STEPS][4];
    if (dh % 16 == 0) {
#pragma unroll
        for (int k = 0; k < STEPS; ++k)
            if (16 * k < dh) load_a_fragment(qa[k], q, ldq, 16 * k);
    } else {
        auto q_at = [&](int row, int e) { return e < dh ? q[row * ldq + e] : __float2half(0.f); };
#pragma unroll
        for (int k = 0; k < STEPS; ++k) {
            const int e = 16 * k + 2 * t;
            qa[k][0] = pack_halves(q_at(g, e), q_at(g, e + 1));
            qa[k][1] = pack_halves(q_at(g + 8, e), q_at(g + 8, e + 1));
            qa[k][2] = pack_halves(q_at(g, e + 8), q_at(g, e + 9));
            qa[k][3] = pack_halves(q_at(g + 8, e + 8), q_at(g + 8, e + 9));
        }
    }
    float o[2 * STEPS][4] = {}, max[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};
    // The clicks from c0 on, 16 at a time; `first` (Constant<true> for c0 = 0) starts the softmax.
    auto chunk = [&](int c0, auto first) {
        // S for clicks c0 + 8·tile + 2t + (i % 2) of row g + 8·(i / 2), element i of C tile `tile`.
        float s[2][4] = {};
#pragma unroll
        for (int k = 0; k < STEPS; ++k) {
            if (16 * k >= dh) break;
            const uint4 b = click.keys_at(c0, k);
            mma_16816(s[0], qa[k], b.x, b.y);
            mma_16816(s[1], qa[k], b.z, b.w);
        }
        // Click c0 is in the chunk, so every row has a finite score.
#pragma unroll
        for (int tile = 0; tile < 2; ++tile)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[tile][i] = c0 + 8 * tile + 2 * t + i % 2 < clicks ? s[tile][i] * scale : -INFINITY;
        online_softmax_block<decltype(first)::value>(s, max, sum, o, approx_exp2);
        uint32_t pa[4];
        tiles_as_a_fragment(pa, s[0], s[1]);
#pragma unroll
        for (int p = 0; p < STEPS; ++p) {
            if (16 * p >= dh) break;
            const uint4 b = click.values_at(c0, p);
            mma_16816(o[2 * p], pa, b.x, b.y);
            mma_16816(o[2 * p + 1], pa, b.z, b.w);  // zero past dh
        }
    };
    chunk(0, Constant<true>{});
    for (int c0 = 16; c0 < clicks; c0 += 16) chunk(c0, Constant<false>{});
    // One reciprocal a row (each sum is at least 1: the row's largest score gives e⁰), then a
    // multiplication a value, `weight` in it.
    const float inverse[2] = {weight * approx_rcp(quad_sum(sum[0])), weight * approx_rcp(quad_sum(sum[1]))};
#pragma unroll
    for (int j = 0; j < 2 * STEPS; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int e = 8 * j + 2 * t;
            if (e < dh) store(g + 8 * half, e, o[j][2 * half] * inverse[half], o[j][2 * half + 1] * inverse[half]);
        }
}

// pack_click_fragments_f16: the fragments PackedClicks reads (`fragments`, ⌈clicks/16⌉ · heads ·
// 2⌈dh/16⌉ · 32 uint4), from the clicks' keys and values (clicks × width f16 rows), a warp per
// fragment: each lane computes its registers as ClickRows would and stores them.
extern "C" __global__ void pack_click_fragments_f16(const __half* keys, const __half* values, uint4* fragments,
                                                    int clicks, int width, int heads) {
    const int dh = width / heads, steps = (dh + 15) / 16;
    const int64_t per_chunk = (int64_t)heads * 2 * steps;
    WARP_LOOP(w, (clicks + 15) / 16 * per_chunk) {
        const int chunk = (int)(w / per_chunk), h = (int)(w % per_chunk / (2 * steps)), slot = (int)(w % (2 * steps));
        const ClickRows rows{keys + h * dh, values + h * dh, clicks, width, dh};
        fragments[w * 32 + threadIdx.x % 32] =
            slot < steps ? rows.keys_at(16 * chunk, slot) : rows.values_at(16 * chunk, slot - steps);
    }
}

// The heads are at most this wide (the Rust side checks).
constexpr int ASSIGN_MAX_DH = 64;

// f(Constant<MAX_DH>{}) with copy_click_labels_mma's bound on the head width: the least of 16,
// 32 and 64 (and of D: no head is wider than the tokens) that holds dh. Its loops are unrolled to
// the bound and left at dh, but what they leave is not all skipped: with the one bound of 64,
// TIS-B's heads of 16 issued the wider heads' bounds checks and predicated-off loads and stores
// (a head's loop, 1,378 instructions in the sm_90a SASS of assign_wgmma_f16_128, against 469
// for the bound of 16).
template <int D, typename F> __device__ __forceinline__ void with_head_bound(int dh, F f) {
    if (dh <= 16) f(Constant<16>{});
    else if constexpr (D > 16) {
        if (dh <= 32) f(Constant<32>{});
        else if constexpr (D > 32) f(Constant<(D < ASSIGN_MAX_DH ? D : ASSIGN_MAX_DH)>{});
    }
}

// Where the label assignment's operands lie. mma.sync (`assign_fused_f16_*`): f16 rows padded by
// 8 halves, blocks of fused_rows() tokens. wgmma (sm_90a, `assign_wgmma_f16_*`, widths that are
// multiples of 64): the products' operands and the staged weights as wgmma's core matrices along
// D (unpadded), blocks of 128 tokens, a warpgroup's products over 64 rows. Q, which only the
// label copy reads, lies in padded rows either way, over LN_q(x) in the same buffer.
template <int D, bool WGMMA> struct AssignShared {
    static constexpr int LD = D + MMA_PAD;
    // Byte offsets for a block of `rows` tokens.
    int operand, weights, q;
    __device__ explicit AssignShared(int rows)
        : operand(0),                                     // Va, then the mix: rows × D (× LD for mma.sync)
          weights(rows * (WGMMA ? D : LD) * 2),           // one staged D × D matrix
          q(weights + D * (WGMMA ? D : LD) * 2) {}        // LN_q(x) as an operand, then Q: rows × LD halves
    // The place of operand value (r, f), in halves.
    __device__ static int at(int r, int f) { return WGMMA ? core_matrix_offset<D>(r, f) : r * LD + f; }
};

// The whole label assignment sub-layer for a block of tokens: x += mix·W_outᵀ + b_out, the mix
// made of the clicks' label embeddings (softmax over the clicks of Q = LN_q(x)·Wqᵀ + bq against
// their keys) and the automatic segmentation's, Va = label_mlp(P) (given: it is the same in every
// layer, the contract's, computed once a click). Wq and the block's rows of Va are copied in
// while LN_q(x) is computed, W_out while the clicks' labels are copied. mma.sync: warp w
// multiplies its own 16 rows (warp_rows_linear). wgmma: each warpgroup's 64 rows are one product
// (warpgroup_product) whose accumulators are the same C tiles per warp, so the rest is the same
// code; the threads fence their shared-memory writes of an operand towards the tensor cores
// before the barrier after which it is read.
template <int D, bool WGMMA>
__device__ void assign_sublayer(__half* x, const __half* gamma, const __half* beta, const __half* wq,
                                const __half* bq, const uint4* fragments, const __half* auto_embedding,
                                const __half* w_out, const __half* b_out, int64_t n, int64_t clicks, int heads,
                                float alpha) {
    using L = AssignShared<D, WGMMA>;
    const int rows = fused_rows();
    const L layout(rows);
    __half* operand = shared_halves(layout.operand);
    __half* w = shared_halves(layout.weights);
    __half* q = shared_halves(layout.q);
    const int64_t row0 = (int64_t)blockIdx.x * rows;
    const int r0 = 16 * (threadIdx.x / 32);
    float acc[D / 8][4];  // the warp's 16 rows of each projection, C tiles (mma.cuh)
    const auto at = [](int r, int f) { return L::at(r, f); };
    auto stage = [&](const __half* weights) {
        if constexpr (WGMMA) stage_core_matrices_async<D, D, FUSED_MAX_THREADS>(w, weights, D, D, 0, 0);
        else stage_weights_async(w, L::LD, weights, D, D, 0, 0, D, D);
        __pipeline_commit();
    };
    // The staged copies and the operands' new values visible to every warp (and to wgmma).
    auto staged = [&] {
        __pipeline_wait_prior(0);
        if constexpr (WGMMA) fence_proxy_async();
        __syncthreads();
    };
    // acc = a·Wᵀ + bias for the warp's rows, a laid out as `at` says.
    auto project = [&](const __half* a, const __half* bias) {
        if constexpr (WGMMA) {
            fill_tiles_with_bias<D>(acc, bias);
            warpgroup_product<D, D>(acc, core_matrices<D>(a).at(core_matrix_offset<D>(r0 / 64 * 64, 0)),
                                    core_matrices<D>(w));
        } else {
            warp_rows_linear<D, D>(acc, a + r0 * L::LD, L::LD, w, L::LD, bias);
        }
    };

    // Q = LN_q(x)·Wqᵀ + bq, Wq's copies and the block's rows of Va (zero past n) flying while
    // LN_q(x) is computed.
    stage(wq);
    if constexpr (WGMMA) stage_core_matrices_async<D, 128, FUSED_MAX_THREADS>(operand, auto_embedding, n, D, row0, 0);
    else stage_weights_async(operand, L::LD, auto_embedding, n, D, row0, 0, rows, D);
    __pipeline_commit();
    layer_norm_rows_at<D>(q, at, x, D, gamma, beta, n, row0, rows);
    staged();
    project(q, bq);
    // Q replaces LN_q(x) once the product has read it (the warp's own rows, or with wgmma every
    // warpgroup's: Q's padded rows overlap the next warpgroup's core matrices).
    if constexpr (WGMMA) __syncthreads();
    else __syncwarp();
    store_tiles<D>(q + r0 * L::LD, L::LD, acc);
    __syncthreads();  // every warp is done with Wq
    // W_out flies in while the clicks' labels are copied and mixed.
    stage(w_out);

    // Per head, for the warp's rows: softmax over the clicks, their label embeddings copied
    // (tensor cores), mixed by α with Va, which each value of the mix replaces in place (the lane
    // that reads it writes it). Rows past n are mixed too: each row of the output projection is
    // its operand row's alone, and write_tiles_to_rows leaves them out.
    const int dh = D / heads, steps = (dh + 15) / 16;
    const __half2 alpha2 = __float2half2_rn(alpha);
    with_head_bound<D>(dh, [&](auto bound) {
        for (int h = 0; h < heads; ++h) {
            const PackedClicks click{fragments + 32 * 2 * steps * h, 32 * 2 * steps * heads, steps};
            copy_click_labels_mma<decltype(bound)::value>(
                q + r0 * L::LD + h * dh, L::LD, click, (int)clicks, dh, 1.f - alpha,
                [&](int r, int e, float lo, float hi) {
                    __half2* mix = (__half2*)&operand[at(r0 + r, h * dh + e)];  // Va's pair, then the mix's
                    *mix = __hfma2(alpha2, *mix, __floats2half2_rn(lo, hi));
                });
        }
    });
    staged();

    // x += mix·W_outᵀ + b_out.
    project(operand, b_out);
    write_tiles_to_rows<D, true>(x, acc, n, row0 + r0);
}

#define ASSIGN_ARGUMENTS                                                                                             \
    __half *x, const __half *g, const __half *b, const __half *wq, const __half *bq, const uint4 *fragments,         \
        const __half *auto_embedding, const __half *w_out, const __half *b_out, int64_t n, int64_t clicks, int heads, \
        float alpha
#define ASSIGN_PASSED x, g, b, wq, bq, fragments, auto_embedding, w_out, b_out, n, clicks, heads, alpha
#define ASSIGN_FUSED(D)                                                                                              \
    extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS, 2) assign_fused_f16_##D(ASSIGN_ARGUMENTS) {      \
        assign_sublayer<D, false>(ASSIGN_PASSED);                                                                    \
    }
FOR_EACH_FUSED_WIDTH(ASSIGN_FUSED)
// The wgmma path, for widths that are multiples of 64 (blocks of 128 tokens), a kernel of its own
// as the FFN's (kernels/linear.cu): the backend launches it only on a GPU that runs the sm_90a
// cubins, and other targets compile it as the mma.sync path (whose shared memory is no larger).
#ifdef TIS_WGMMA
#define ASSIGN_WGMMA_PATH true
#else
#define ASSIGN_WGMMA_PATH false
#endif
#define ASSIGN_WGMMA(D)                                                                                              \
    extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS, 2) assign_wgmma_f16_##D(ASSIGN_ARGUMENTS) {      \
        assign_sublayer<D, ASSIGN_WGMMA_PATH>(ASSIGN_PASSED);                                                        \
    }
ASSIGN_WGMMA(64)
ASSIGN_WGMMA(128)
#undef ASSIGN_WGMMA_PATH

template <int D> struct ClickShared {
    static constexpr int LD = D + MMA_PAD;
    // Byte offsets for a block of `rows` clicks.
    int operand, keys, values, weights;
    __device__ explicit ClickShared(int rows)
        : operand(0),                     // the cross-attention's output, LN(c), Q, the attention: rows × LD halves
          keys(rows * LD * 2),            // K: rows × LD halves
          values(keys + rows * LD * 2),   // V: rows × LD halves
          weights(values + rows * LD * 2) {}  // one staged D × D matrix: D × LD halves
};

// A linear layer of the clicks: the warp's 16 rows of `rows` (row stride LD) times the staged
// weights W (D × D), plus bias, as C tiles, once every thread's copies of W have landed.
template <int D>
__device__ __forceinline__ void staged_linear(float (&acc)[D / 8][4], const __half* rows, const __half* w,
                                              const __half* bias) {
    constexpr int LD = ClickShared<D>::LD;
    __pipeline_wait_prior(0);
    __syncthreads();
    warp_rows_linear<D, D>(acc, rows, LD, w, LD, bias);
}

template <int D>
__device__ void click_update(__half* clicks, const __half* attended, const __half* w_cross_out,
                             const __half* b_cross_out, const __half* self_gamma, const __half* self_beta,
                             const __half* wq, const __half* bq, const __half* wk, const __half* bk,
                             const __half* wv, const __half* bv, const __half* wo, const __half* bo,
                             const __half* ffn_gamma, const __half* ffn_beta, const __half* w1, const __half* b1,
                             const __half* w2, const __half* b2, const __half* key_gamma, const __half* key_beta,
                             const __half* w_key, const __half* b_key, __half* click_keys, int64_t n,
                             int64_t hidden, int heads) {
    using L = ClickShared<D>;
    const int rows = fused_rows();  // every click's row, and zero rows past n
    const L layout(rows);
    __half* operand = shared_halves(layout.operand);
    __half* keys = shared_halves(layout.keys);
    __half* values = shared_halves(layout.values);
    __half* w = shared_halves(layout.weights);
    const int r0 = 16 * (threadIdx.x / 32);
    __half* own = operand + r0 * L::LD;  // the warp's rows of the operand
    auto stage = [&](const __half* weights) {
        stage_weights_async(w, L::LD, weights, D, D, 0, 0, D, D);
        __pipeline_commit();
    };
    float acc[D / 8][4];

    // c += attended·W_outᵀ + b_out (the cross-attention's output projection).
    stage(w_cross_out);
    stage_weights_async(operand, L::LD, attended, n, D, 0, 0, rows, D);  // rows past n are zero
    __pipeline_commit();
    staged_linear<D>(acc, own, w, b_cross_out);
    write_tiles_to_rows<D, true>(clicks, acc, n, r0);
    __syncthreads();  // W_out read by every warp, the clicks' new rows visible

    // Self-attention: K and V of every row, then the warp's own Q over its LN(c) rows.
    stage(wk);
    layer_norm_rows<D>(operand, L::LD, clicks, D, self_gamma, self_beta, n, 0, rows);
    staged_linear<D>(acc, own, w, bk);
    store_tiles<D>(keys + r0 * L::LD, L::LD, acc);
    __syncthreads();
    stage(wv);
    staged_linear<D>(acc, own, w, bv);
    store_tiles<D>(values + r0 * L::LD, L::LD, acc);
    __syncthreads();
    stage(wq);
    staged_linear<D>(acc, own, w, bq);
    __syncwarp();
    store_tiles<D>(own, L::LD, acc);
    __syncthreads();  // every warp's K and V rows stored, Wq read
    // W_o flies in while each head's attention runs; a lane writes its share of the head's
    // output exactly where it read its share of Q_h (copy_click_labels_mma's layouts).
    stage(wo);
    const int dh = D / heads;
    with_head_bound<D>(dh, [&](auto bound) {
        for (int h = 0; h < heads; ++h) {
            const ClickRows click{keys + h * dh, values + h * dh, (int)n, L::LD, dh};
            copy_click_labels_mma<decltype(bound)::value>(own + h * dh, L::LD, click, (int)n, dh, 1.f,
                                                          [&](int r, int e, float lo, float hi) {
                                                              *(__half2*)&own[r * L::LD + h * dh + e] =
                                                                  __floats2half2_rn(lo, hi);
                                                          });
        }
    });
    staged_linear<D>(acc, own, w, bo);
    write_tiles_to_rows<D, true>(clicks, acc, n, r0);
    __syncthreads();

    feed_forward_mma<D>(clicks, ffn_gamma, ffn_beta, w1, b1, w2, b2, n, hidden);
    __syncthreads();  // the FFN's residual visible, its shared memory free

    // The label assignment's click keys.
    stage(w_key);
    layer_norm_rows<D>(operand, L::LD, clicks, D, key_gamma, key_beta, n, 0, rows);
    staged_linear<D>(acc, own, w, b_key);
    write_tiles_to_rows<D, false>(click_keys, acc, n, r0);
}

// One block runs alone, so the registers are not for occupancy. ptxas (CUDA 13.0) spilled a few
// bytes of some kernels when allowed the whole register file (widths 16, 64, 96 and 112 for
// sm_90a), and of the 96- to 128-wide ones when capped at 128 (the launch bound's two blocks):
// the cap is for widths up to 80 only, which spills none.
#define CLICK_UPDATE(D)                                                                                              \
    extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS, D > 80 ? 1 : 2) click_update_f16_##D(            \
        __half* clicks, const __half* attended, const __half* w_cross_out, const __half* b_cross_out,                \
        const __half* self_gamma, const __half* self_beta, const __half* wq, const __half* bq, const __half* wk,     \
        const __half* bk, const __half* wv, const __half* bv, const __half* wo, const __half* bo,                    \
        const __half* ffn_gamma, const __half* ffn_beta, const __half* w1, const __half* b1, const __half* w2,       \
        const __half* b2, const __half* key_gamma, const __half* key_beta, const __half* w_key, const __half* b_key, \
        __half* click_keys, int64_t n, int64_t hidden, int heads) {                                                  \
        click_update<D>(clicks, attended, w_cross_out, b_cross_out, self_gamma, self_beta, wq, bq, wk, bk, wv, bv,   \
                        wo, bo, ffn_gamma, ffn_beta, w1, b1, w2, b2, key_gamma, key_beta, w_key, b_key, click_keys,  \
                        n, hidden, heads);                                                                           \
    }
FOR_EACH_FUSED_WIDTH(CLICK_UPDATE)
