// Tensor-core building blocks (f16 operands, f32 accumulators): mma.sync m16n8k16 and ldmatrix
// through inline PTX (`mma_16816`, `ldmatrix_x4`), whose register layouts the PTX ISA fixes, so
// that accumulators can be worked on in registers.
//
// - The fused head kernels: each warp owns 16 token rows of a block, multiplies them by weights
//   staged in shared memory (`warp_rows_linear`: W stored [out][in] as PyTorch, read as Wᵀ)
//   into C tiles in registers, and works on those there: a bias and GELU applied and the tiles
//   fed to the next GEMM as its A operand (feed_forward_mma), a softmax (the attention
//   kernels), the residual added straight into x (`write_tiles_to_rows`), with no round trip
//   through shared memory. `stage_weights_async` copies a weight block from global memory into
//   such a staging area, zero-filling what lies outside the matrix.
// - The block-tile GEMMs of the dense layers and the convolutions (`warp_tile_mma`): each warp
//   a 32 × 32 or larger part of a 64 × 64 or 128 × 64 output tile, K in slabs of MMA_K, the
//   epilogue through an f32 staging area (`store_warp_tile`).
// - On sm_90a, wgmma.mma_async (`wgmma_ss`, below): a warpgroup's 64 × N × 16 products read
//   straight from shared memory, asynchronously: the implicit GEMM's path on an H100.
//
// Shared rows are padded by MMA_PAD halves so that ldmatrix's eight rows of 16 bytes fall in
// different banks (a row stride of 80 bytes for the slabs); every ldmatrix row is 16-byte
// aligned, which the paddings and the callers' layouts keep.
#pragma once

#include <cuda_pipeline.h>

#include "common.cuh"

constexpr int MMA_PAD = 8;
// K step of the 64 × 64-tile GEMMs (linear_mma_f16, the tensor-core convolutions), and the row
// stride of their staged slabs (MMA_K halves, padded).
constexpr int MMA_K = 32;
constexpr int SLAB_LD = MMA_K + MMA_PAD;
// Token rows per block of the fused kernels: a warp per 16 rows, as many as the launch has
// warps. Every block stages the layer's weights from L2 once, so its rows set the weight
// traffic: the backend launches 128 rows (eight warps; the FFN's 256 KB of weights for TIS-B
// are then 2 KB per token against 131 k MACs per token) where the device lets a block have the
// shared memory they need (71 KB for the FFN and 102 KB for the label assignment at width
// 128), else 64 (a GPU of compute capability 8.6 or 8.9 allows 99 KB; src/backend/cuda/mod.rs).
constexpr int FUSED_MAX_THREADS = 256;
__device__ __forceinline__ int fused_rows() { return blockDim.x / 2; }

// The halves at `offset` bytes into the block's dynamic shared memory, which the fused kernels
// lay out as their `*Shared` structs say (byte offsets, 16-byte aligned).
__device__ __forceinline__ __half* shared_halves(int offset) {
    extern __shared__ float fused_shared[];
    return (__half*)((unsigned char*)fused_shared + offset);
}

// dest[r][c] = w[row0 + r][col0 + c] for r < rows, c < cols (row stride ldd halves in dest,
// `width` in w), zero outside w's `height` × `width`. All threads of the block take part. When
// every row starts 16-byte aligned on both sides and the columns come in eights (the fused
// kernels' widths are multiples of 16), 8 halves move as one asynchronous 16-byte copy
// (cp.async, zero-filled outside w), which joins the thread's current group: the caller
// commits and waits (__pipeline_commit, __pipeline_wait_prior) before the barrier that shows
// the block's copies. Other shapes are copied value by value, synchronously.
__device__ __forceinline__ void stage_weights_async(__half* dest, int ldd, const __half* w, int64_t height,
                                                    int64_t width, int64_t row0, int64_t col0, int rows, int cols) {
    if (cols % 8 == 0 && ldd % 8 == 0 && width % 8 == 0 && col0 % 8 == 0 && (uintptr_t)dest % 16 == 0 &&
        (uintptr_t)w % 16 == 0) {
        for (int l = threadIdx.x; l < rows * cols / 8; l += blockDim.x) {
            int r = l / (cols / 8), c = l % (cols / 8) * 8;
            bool inside = row0 + r < height && col0 + c < width;
            __pipeline_memcpy_async(&dest[r * ldd + c], inside ? &w[(row0 + r) * width + col0 + c] : w, 16,
                                    inside ? 0 : 16);
        }
        return;
    }
    for (int l = threadIdx.x; l < rows * cols; l += blockDim.x) {
        int r = l / cols, c = l % cols;
        bool inside = row0 + r < height && col0 + c < width;
        dest[r * ldd + c] = inside ? w[(row0 + r) * width + col0 + c] : __float2half(0.f);
    }
}

// dest[r][kk] = src[row0 + r][k0 + kk] for r < ROWS, kk < MMA_K (dest's rows SLAB_LD halves
// apart; src row-major, `k` values a row), zero past src's `rows` rows or k columns: the slab of
// one K step of the 64 × 64-tile GEMMs. 8 halves a 16-byte load where the rows come in eights and
// src is 16-byte aligned, else value by value. All threads of the block take part; the caller
// puts the barrier after.
template <int ROWS>
__device__ __forceinline__ void load_slab(__half* dest, const __half* src, int64_t row0, int64_t rows, int64_t k,
                                          int64_t k0) {
    if (k % 8 == 0 && (uintptr_t)src % 16 == 0) {
        for (int l = threadIdx.x; l < ROWS * MMA_K / 8; l += blockDim.x) {
            int r = l / (MMA_K / 8), kk = l % (MMA_K / 8) * 8;
            *(uint4*)&dest[r * SLAB_LD + kk] = k0 + kk < k && row0 + r < rows
                                                   ? *(const uint4*)&src[(row0 + r) * k + k0 + kk]
                                                   : uint4{0, 0, 0, 0};
        }
        return;
    }
    for (int l = threadIdx.x; l < ROWS * MMA_K; l += blockDim.x) {
        int r = l / MMA_K, kk = l % MMA_K;
        dest[r * SLAB_LD + kk] = k0 + kk < k && row0 + r < rows ? src[(row0 + r) * k + k0 + kk] : __float2half(0.f);
    }
}

// ---- mma.sync: fragments in registers, in the PTX ISA's layouts (g = lane / 4, t = lane % 4,
// a register's lower half holding the lower index). A (16 × 16 f16, four registers): row g,
// columns 2t and 2t + 1; row g + 8, the same columns; then both rows at columns 2t + 8 and
// 2t + 9. B (16 × 8 f16, two registers): rows 2t and 2t + 1 of column g, then rows 2t + 8 and
// 2t + 9. C (16 × 8 f32, four floats): row g at columns 2t and 2t + 1, then row g + 8. A C tile
// of columns 16j to 16j + 7 and the next one thus hold, rounded to f16 pairs, exactly the A
// fragment of columns 16j to 16j + 15 (`pack_half2`): a product's columns can be the next
// product's K without leaving registers. The CUDA emulator supplies both instructions
// (tests/cuda-emulator), executed from the same layouts.

// Four 8 × 8 matrices of halves from shared memory: lanes 8i to 8i + 7 pass the addresses of
// matrix i's rows (16 bytes each), and lane l receives in register i matrix i's row l / 4,
// columns 2·(l % 4) and 2·(l % 4) + 1, or with TRANSPOSED (ldmatrix.trans) its column l / 4,
// rows 2·(l % 4) and 2·(l % 4) + 1.
template <bool TRANSPOSED = false> __device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __half* row) {
#ifdef TIS_CUDA_EMULATOR
    const auto loaded = emu::ldmatrix_x4(row, TRANSPOSED);
    for (int i = 0; i < 4; ++i) r[i] = loaded[i];
#else
    const unsigned address = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (TRANSPOSED)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
#endif
}

// d += a·b: one m16n8k16 product of the warp (b is registers b0 and b1 of a B fragment).
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef TIS_CUDA_EMULATOR
    const uint32_t b[2] = {b0, b1};
    const auto sum = emu::mma_m16n8k16({d[0], d[1], d[2], d[3]}, a, b);
    for (int i = 0; i < 4; ++i) d[i] = sum[i];
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats rounded to an f16 pair, `lo` in the lower half.
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 pair = __floats2half2_rn(lo, hi);
    return *(uint32_t*)&pair;
}

// Two halves as an f16 pair, `lo` in the lower half.
__device__ __forceinline__ uint32_t pack_halves(__half lo, __half hi) {
    __half2 pair = __halves2half2(lo, hi);
    return *(uint32_t*)&pair;
}

// Two C tiles of a warp (columns 8j to 8j + 7 and the next eight), rounded to f16, as the A
// fragment of those 16 columns: the layouts line up, so a product's columns become the next
// product's K without leaving registers.
__device__ __forceinline__ void tiles_as_a_fragment(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = pack_half2(lo[0], lo[1]);
    a[1] = pack_half2(lo[2], lo[3]);
    a[2] = pack_half2(hi[0], hi[1]);
    a[3] = pack_half2(hi[2], hi[3]);
}

// The same for GELU of the two tiles (gelu_fast_f16x2): a hidden layer's C tiles straight into
// the A fragments of the product after it (the FFNs, the label MLP).
__device__ __forceinline__ void gelu_tiles_as_a_fragment(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = gelu_fast_f16x2(lo[0], lo[1]);
    a[1] = gelu_fast_f16x2(lo[2], lo[3]);
    a[2] = gelu_fast_f16x2(hi[0], hi[1]);
    a[3] = gelu_fast_f16x2(hi[2], hi[3]);
}

// The sum and the maximum of v over the quad of lanes (4g to 4g + 3) that holds a row of C tiles.
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// One block of keys of an online softmax (flash attention) over the rows of a warp's score
// tiles s (rows g and g + 8: elements 0, 1 and 2, 3; keys to leave out already −∞, each row with
// at least one finite score, so that the first correction is 0): each row's running max and this
// lane's share of its sum updated (quad_sum adds the shares up at the end), the rows of the
// output tiles o rescaled where the max grew, and s replaced by the weights exp(s − max) rounded
// to f16, as P will be in O += P·V, so that the sum is that of the weights O is summed with.
// `exp` is the exponential of the scores' units (e^x, or 2^x for scores in log2 units). FIRST:
// the first block, before which the max is −∞ and the sum and o are zero, so that nothing is
// rescaled (the label copy's usual case: up to 16 clicks are one block).
template <bool FIRST = false, int S_TILES, int O_TILES, typename Exp>
__device__ __forceinline__ void online_softmax_block(float (&s)[S_TILES][4], float (&max)[2], float (&sum)[2],
                                                     float (&o)[O_TILES][4], Exp exp) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float block_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < S_TILES; ++j) block_max = fmaxf(block_max, fmaxf(s[j][2 * half], s[j][2 * half + 1]));
        const float new_max = FIRST ? quad_max(block_max) : fmaxf(max[half], quad_max(block_max));
        const float correction = FIRST ? 1.f : exp(max[half] - new_max);
        max[half] = new_max;
        if (!FIRST) sum[half] *= correction;
#pragma unroll
        for (int j = 0; j < S_TILES; ++j)
#pragma unroll
            for (int i = 2 * half; i < 2 * half + 2; ++i) {
                s[j][i] = __half2float(__float2half_rn(exp(s[j][i] - new_max)));  // 0 for the keys left out
                sum[half] += s[j][i];
            }
        if (!FIRST)
#pragma unroll
            for (int j = 0; j < O_TILES; ++j)
#pragma unroll
                for (int i = 2 * half; i < 2 * half + 2; ++i) o[j][i] *= correction;
    }
}

// The A fragment of the warp's 16 rows (from `rows`, row stride ld halves), columns k0 to k0 + 15.
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const __half* rows, int ld, int k0) {
    const int lane = threadIdx.x % 32, matrix = lane / 8;
    ldmatrix_x4(a, rows + (lane % 8 + 8 * (matrix % 2)) * ld + k0 + 8 * (matrix / 2));
}

// The B fragments of columns c0 to c0 + 15 of a K step of 16 from k0, B in shared memory (row
// stride ld halves) stored as PyTorch stores a weight, W = Bᵀ ([n][k], the default), or as B
// itself ([k][n], B_ROW_MAJOR, read by ldmatrix.trans): registers 0 and 1 for columns c0 to
// c0 + 7, 2 and 3 for the next eight. Matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
// (k 8-15, n 8-15): each lane passes row lane % 8 of its matrix, at K offset 8·(matrix % 2) and
// N offset 8·(matrix / 2) (a row of W is a column n, a row of B a K index).
template <bool B_ROW_MAJOR = false>
__device__ __forceinline__ void load_b_fragments(uint32_t (&r)[4], const __half* b, int ld, int c0, int k0) {
    const int lane = threadIdx.x % 32, matrix = lane / 8, k = k0 + 8 * (matrix % 2), n = c0 + 8 * (matrix / 2);
    if constexpr (B_ROW_MAJOR) ldmatrix_x4<true>(r, b + (k + lane % 8) * ld + n);
    else ldmatrix_x4(r, b + (n + lane % 8) * ld + k);
}

// acc[j] += a·B[k0 : k0 + 16, 8j : 8j + 8] for j < N / 8: one K step of 16 of the warp's
// 16 × N product, B in shared memory as load_b_fragments reads it, two column tiles an ldmatrix.
template <int N, bool B_ROW_MAJOR = false>
__device__ __forceinline__ void mma_rows_k16(float (&acc)[N / 8][4], const uint32_t (&a)[4], const __half* b, int ld,
                                             int k0) {
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
        uint32_t r[4];
        load_b_fragments<B_ROW_MAJOR>(r, b, ld, 16 * j, k0);
        mma_16816(acc[2 * j], a, r[0], r[1]);
        mma_16816(acc[2 * j + 1], a, r[2], r[3]);
    }
}

// One K step of a warp's FM × NT C tiles of a block tile (linear_mma_f16, the tensor-core
// convolutions; 2 × 4, a 32 × 32 quarter of a 64 × 64 tile, unless a convolution's tile says
// otherwise): acc[i][j] += A·B for the warp's rows wr + 16i to wr + 16i + 15 and columns
// wc + 8j to wc + 8j + 7. `a` and `b` are the step's slabs in shared memory: A's rows are the
// tile's rows, MMA_K halves each (row stride SLAB_LD); B's rows are its columns (W stored [n][k],
// row stride SLAB_LD), or with B_ROW_MAJOR its MMA_K rows of K (row stride ldb). Each A fragment
// feeds NT products and each pair of B fragments 2·FM: per 16 of K, FM + NT/2 ldmatrix for
// FM·NT mma.sync.
template <int FM, int NT, bool B_ROW_MAJOR = false>
__device__ __forceinline__ void warp_tile_mma(float (&acc)[FM][NT][4], const __half* a, const __half* b, int wr,
                                              int wc, int ldb = SLAB_LD) {
    static_assert(NT % 2 == 0, "column tiles in pairs, one ldmatrix each");
#pragma unroll
    for (int k0 = 0; k0 < MMA_K; k0 += 16) {
        uint32_t fa[FM][4];
#pragma unroll
        for (int i = 0; i < FM; ++i) load_a_fragment(fa[i], a + (wr + 16 * i) * SLAB_LD, SLAB_LD, k0);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            uint32_t fb[4];
            load_b_fragments<B_ROW_MAJOR>(fb, b, ldb, wc + 8 * j, k0);
#pragma unroll
            for (int i = 0; i < FM; ++i) {
                mma_16816(acc[i][j], fa[i], fb[0], fb[1]);
                mma_16816(acc[i][j + 1], fa[i], fb[2], fb[3]);
            }
        }
    }
}

// ---- wgmma (sm_90a's warpgroup MMA): a warpgroup (4 warps, 128 threads) multiplies a 64 × 16
// tile of A by a 16 × N tile of B, both in shared memory, into f32 accumulators in registers,
// asynchronously: the tensor cores read the operands while the warps go on, so a K step costs a
// few instructions where mma.sync costs one per 16 × 8 × 16 product and its fragments' ldmatrix.
// Only sm_90a cubins have it (TIS_WGMMA: nvcc's __CUDA_ARCH_FEAT_SM90_ALL), and the CUDA
// emulator, which runs it when it poses as a GPU of compute capability 9.0. Kernels keep the
// mma.sync path beside it, the only one of the other targets (sm_80, the PTX fallback).
//
// Operands lie in shared memory as wgmma's canonical K-major layout without swizzle: core
// matrices of 8 rows × 8 halves, each 128 contiguous bytes (row r of the core matrix at byte
// 16r), the core matrices next to each other along K `lbo` bytes apart and groups of 8 rows
// `sbo` bytes apart (core_matrix_offset, SharedOperand). A matrix's rows are A's rows (M) or B's
// columns (N, a weight stored [n][k] as PyTorch stores it). The accumulators of warp w of the
// warpgroup are rows 16w to 16w + 15 of the 64, held as mma.sync's C tiles (d[j]: columns 8j to
// 8j + 7).
// A may come from registers instead (`wgmma_rs`): each warp's 16 rows of the 64 as mma.sync's
// A fragment, so that a product's C tiles, packed as f16 pairs, are the next product's A
// (`tiles_as_a_fragment`) without a round trip through shared memory, whose bandwidth both
// operands' reads otherwise share with the copies (warpgroup_product).
// Ordering: every thread fences its shared-memory writes of the operands towards the tensor
// cores (`fence_proxy_async`) before the barrier after which they are read; `wgmma_fence`
// precedes the first wgmma after the accumulators (or A's registers) were touched otherwise;
// `wgmma_commit` closes a group and `wgmma_wait<G>` waits until at most G groups are in flight,
// after which the accumulators may be read and the operands' shared memory reused.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(TIS_CUDA_EMULATOR)
#define TIS_WGMMA 1
#endif

// Where the 8-row group `row / 8`, core matrix `k / 8` of a block of core matrices starts, in
// halves: 8 halves a row, groups of K_HALVES / 8 core matrices (lbo 128 bytes, sbo K_HALVES · 16
// bytes), so that a block of rows × K_HALVES halves is dense. row and k are never negative: as
// unsigned values, their divisions and remainders are shifts and masks (signed, each took a
// correction for negative values).
template <int K_HALVES> __device__ __forceinline__ constexpr int core_matrix_offset(int row, int k) {
    const unsigned r = row, c = k;
    return (int)(r / 8 * (K_HALVES * 8) + c / 8 * 64 + r % 8 * 8 + c % 8);
}

// A shared-memory operand of wgmma: its 64-bit matrix descriptor (bits 0-13 the start address,
// 16-29 the leading-dimension byte offset lbo, 32-45 the stride byte offset sbo, all in units of
// 16 bytes; base offset 0 and swizzle mode 0, none, in bits 49-51 and 62-63), and the start it
// describes, which only the CUDA emulator reads (to check one against the other; the compiler
// drops it elsewhere). The descriptor of a block of core matrices is made once; the operands in
// it are `at` offsets from it, a constant added to its address bits.
struct SharedOperand {
    uint64_t descriptor;
    const __half* start;
    // The operand `halves` further on (a multiple of 8: the address bits count 16 bytes). The
    // addition is to the low 32 bits alone: a shared-memory address fits its 14 bits, so nothing
    // carries out of them, and the high half (sbo) stays the constant it was made with. Where the
    // descriptor is per thread (the FFN's A operands: each warpgroup its own rows) that is one
    // 32-bit addition a wgmma and not a 64-bit one with its moves, and the FFN's wgmma kernel fits
    // its 128 registers (with the 64-bit addition it spilled 156 bytes); where it is uniform (the
    // implicit GEMM's) it costs one move of the constant high half a wgmma more than a 64-bit
    // uniform addition did (about 8 instructions a K step of 270 to 330).
    __device__ __forceinline__ SharedOperand at(int halves) const {
        const uint32_t low = (uint32_t)descriptor + (uint32_t)halves / 8;
        return SharedOperand{descriptor >> 32 << 32 | low, start + halves};
    }
};

// The operand at the start of a block laid out by core_matrix_offset<K_HALVES>.
template <int K_HALVES> __device__ __forceinline__ SharedOperand core_matrices(const __half* block) {
    const uint32_t address = (uint32_t)__cvta_generic_to_shared(block);
    constexpr uint64_t lbo = 128 / 16, sbo = K_HALVES * 16 / 16;
    return SharedOperand{(uint64_t)((address & 0x3FFFF) >> 4) | lbo << 16 | sbo << 32, block};
}

// dest, a block of core matrices (core_matrix_offset<K_HALVES>), = w[row0 + r][col0 + k] for
// r < ROWS (a multiple of 8), k < K_HALVES, zero outside w's `height` × `width` (fewer than 2³¹
// values a row): a weight block as wgmma's B operand (its rows the products' N), or a block of
// token rows as its A (the label assignment's Va). The
// block's THREADS threads all take part. Where w's rows start 16-byte aligned (width a multiple
// of 8), a 16-byte piece (8 values of a row) is one asynchronous copy that joins the thread's
// current group, as in stage_weights_async; consecutive threads take the 8 rows of one core
// matrix, so that a warp's copies land in 4 whole core matrices (512 contiguous bytes, no bank
// conflicts). A thread's pieces are then THREADS / (K_HALVES / 8) rows apart in the same column
// (16 and 32 in the FFN's chunks at width 128), so their source and destination move by
// constant steps: its first piece's place is worked out once, each further piece costs its
// copy, a bounds check and an addition (the FFN stages 8 pieces a thread per chunk of hidden
// units; worked out piece by piece in a loop over blockDim.x, each took about 30 instructions
// in the sm_90a SASS). Other widths are copied value by value.
template <int K_HALVES, int ROWS, int THREADS>
__device__ __forceinline__ void stage_core_matrices_async(__half* dest, const __half* w, int64_t height,
                                                          int64_t width, int64_t row0, int64_t col0) {
    constexpr unsigned PIECES = K_HALVES / 8, ROW_STEP = THREADS / PIECES;
    static_assert(THREADS % (8 * PIECES) == 0 && ROWS % ROW_STEP == 0, "whole rounds of 8-row groups");
    const unsigned rows_left = (unsigned)max(min(height - row0, (int64_t)ROWS), (int64_t)0);
    const unsigned cols_left = (unsigned)max(min(width - col0, (int64_t)K_HALVES), (int64_t)0);
    const int ld = (int)width;
    const __half* origin = rows_left && cols_left ? w + row0 * width + col0 : w;
    if (ld % 8 == 0 && col0 % 8 == 0 && (uintptr_t)w % 16 == 0) {
        const unsigned l = threadIdx.x, r = l / (8 * PIECES) * 8 + l % 8, k = l / 8 % PIECES * 8;
        __half* to = dest + core_matrix_offset<K_HALVES>(r, k);
        const __half* from = origin + wide_product(r, ld) + k;
        const int64_t step = wide_product(ROW_STEP, ld);
        if (rows_left == ROWS && cols_left == K_HALVES) {  // the whole block inside w: no checks
#pragma unroll
            for (unsigned i = 0; i < ROWS / ROW_STEP; ++i)
                __pipeline_memcpy_async(to + i * ROW_STEP * K_HALVES, from + i * step, 16);
            return;
        }
#pragma unroll
        for (unsigned i = 0; i < ROWS / ROW_STEP; ++i) {
            const bool inside = r + i * ROW_STEP < rows_left && k < cols_left;
            __pipeline_memcpy_async(to + i * ROW_STEP * K_HALVES, inside ? from + i * step : w, 16, inside ? 0 : 16);
        }
        return;
    }
    for (unsigned l = threadIdx.x; l < ROWS * K_HALVES; l += THREADS) {
        const unsigned r = l / K_HALVES, k = l % K_HALVES;
        dest[core_matrix_offset<K_HALVES>(r, k)] =
            r < rows_left && k < cols_left ? origin[wide_product(r, ld) + k] : __float2half(0.f);
    }
}

#ifdef TIS_CUDA_EMULATOR
__device__ __forceinline__ void wgmma_fence() { emu::wgmma_fence(); }
__device__ __forceinline__ void wgmma_commit() { emu::wgmma_commit(); }
template <int GROUPS> __device__ __forceinline__ void wgmma_wait() { emu::wgmma_wait(GROUPS); }
__device__ __forceinline__ void fence_proxy_async() {}
template <int T> __device__ __forceinline__ void wgmma_fence_operands(float (&)[T][4]) {}
// d (+)= A·B for the warpgroup: A 64 × 16, B 16 × N (its N rows of 16 K values).
template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], const SharedOperand& a, const SharedOperand& b,
                                         bool accumulate) {
    emu::wgmma_ss(&d[0][0], N, {a.start, a.descriptor}, {b.start, b.descriptor}, accumulate);
}
// d (+)= A·B with A in registers: the calling warp's 16 rows of the 64 as mma.sync's A fragment.
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], const SharedOperand& b,
                                         bool accumulate) {
    emu::wgmma_rs(&d[0][0], N, a, {b.start, b.descriptor}, accumulate);
}
template <int K> __device__ __forceinline__ void wgmma_fence_operands(uint32_t (&)[K][4]) {}
#elif defined(TIS_WGMMA)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int GROUPS> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(GROUPS) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins the accumulators in place around wgmma_fence and wgmma_wait: the compiler sees neither
// instruction touch them, so that without this it could move their reads and writes across.
template <int T> __device__ __forceinline__ void wgmma_fence_operands(float (&d)[T][4]) {
#pragma unroll
    for (int j = 0; j < T; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(d[j][i])::"memory");
}
// The same for A fragments in registers (wgmma_rs), written before the wgmma_fence that must
// separate them from the wgmma reading them.
template <int K> __device__ __forceinline__ void wgmma_fence_operands(uint32_t (&a)[K][4]) {
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[k][i])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], const SharedOperand& a, const SharedOperand& b,
                                         bool accumulate);
// One instantiation per N: the instruction names N, and each accumulator is an operand.
#define TIS_TILE_OPERANDS(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define TIS_WGMMA_SS(N, REGISTERS, A, B, SCALE, ...)                                                          \
    template <>                                                                                               \
    __device__ __forceinline__ void wgmma_ss<N>(float (&d)[N / 8][4], const SharedOperand& a,                 \
                                                const SharedOperand& b, bool accumulate) {                    \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" SCALE ", 0;\n"                                      \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 {" REGISTERS "}, %" A ", %" B    \
                     ", p, 1, 1, 0, 0;\n}\n"                                                                  \
                     : __VA_ARGS__                                                                            \
                     : "l"(a.descriptor), "l"(b.descriptor), "r"((int)accumulate));                           \
    }
#define TIS_REGISTERS_16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
TIS_WGMMA_SS(32, TIS_REGISTERS_16, "16", "17", "18", TIS_TILE_OPERANDS(0), TIS_TILE_OPERANDS(1),
             TIS_TILE_OPERANDS(2), TIS_TILE_OPERANDS(3))
#define TIS_REGISTERS_32 TIS_REGISTERS_16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
TIS_WGMMA_SS(64, TIS_REGISTERS_32, "32", "33", "34", TIS_TILE_OPERANDS(0), TIS_TILE_OPERANDS(1), TIS_TILE_OPERANDS(2),
             TIS_TILE_OPERANDS(3), TIS_TILE_OPERANDS(4), TIS_TILE_OPERANDS(5), TIS_TILE_OPERANDS(6),
             TIS_TILE_OPERANDS(7))
TIS_WGMMA_SS(128, TIS_REGISTERS_32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63",
             "64", "65", "66", TIS_TILE_OPERANDS(0), TIS_TILE_OPERANDS(1), TIS_TILE_OPERANDS(2),
             TIS_TILE_OPERANDS(3), TIS_TILE_OPERANDS(4), TIS_TILE_OPERANDS(5), TIS_TILE_OPERANDS(6),
             TIS_TILE_OPERANDS(7), TIS_TILE_OPERANDS(8), TIS_TILE_OPERANDS(9), TIS_TILE_OPERANDS(10),
             TIS_TILE_OPERANDS(11), TIS_TILE_OPERANDS(12), TIS_TILE_OPERANDS(13), TIS_TILE_OPERANDS(14),
             TIS_TILE_OPERANDS(15))
#undef TIS_WGMMA_SS
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], const SharedOperand& b,
                                         bool accumulate);
// A from registers: {a0, a1, a2, a3} in place of A's descriptor, and no transpose flag for it.
#define TIS_WGMMA_RS(N, REGISTERS, A0, A1, A2, A3, B, SCALE, ...)                                              \
    template <>                                                                                               \
    __device__ __forceinline__ void wgmma_rs<N>(float (&d)[N / 8][4], const uint32_t (&a)[4],                 \
                                                const SharedOperand& b, bool accumulate) {                    \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" SCALE ", 0;\n"                                      \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 {" REGISTERS "}, {%" A0 ", %" A1    \
                     ", %" A2 ", %" A3 "}, %" B ", p, 1, 1, 0;\n}\n"                                             \
                     : __VA_ARGS__                                                                            \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b.descriptor), "r"((int)accumulate)); \
    }
TIS_WGMMA_RS(64, TIS_REGISTERS_32, "32", "33", "34", "35", "36", "37", TIS_TILE_OPERANDS(0), TIS_TILE_OPERANDS(1),
             TIS_TILE_OPERANDS(2), TIS_TILE_OPERANDS(3), TIS_TILE_OPERANDS(4), TIS_TILE_OPERANDS(5),
             TIS_TILE_OPERANDS(6), TIS_TILE_OPERANDS(7))
TIS_WGMMA_RS(128, TIS_REGISTERS_32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63",
             "64", "65", "66", "67", "68", "69", TIS_TILE_OPERANDS(0), TIS_TILE_OPERANDS(1), TIS_TILE_OPERANDS(2),
             TIS_TILE_OPERANDS(3), TIS_TILE_OPERANDS(4), TIS_TILE_OPERANDS(5), TIS_TILE_OPERANDS(6),
             TIS_TILE_OPERANDS(7), TIS_TILE_OPERANDS(8), TIS_TILE_OPERANDS(9), TIS_TILE_OPERANDS(10),
             TIS_TILE_OPERANDS(11), TIS_TILE_OPERANDS(12), TIS_TILE_OPERANDS(13), TIS_TILE_OPERANDS(14),
             TIS_TILE_OPERANDS(15))
#undef TIS_WGMMA_RS
#undef TIS_REGISTERS_32
#undef TIS_REGISTERS_16
#undef TIS_TILE_OPERANDS
#else
// Declared only: the kernels' wgmma paths are templates that these targets never instantiate.
__device__ void wgmma_fence();
__device__ void wgmma_commit();
template <int GROUPS> __device__ void wgmma_wait();
__device__ void fence_proxy_async();
template <int T> __device__ void wgmma_fence_operands(float (&d)[T][4]);
template <int K> __device__ void wgmma_fence_operands(uint32_t (&a)[K][4]);
template <int N>
__device__ void wgmma_ss(float (&d)[N / 8][4], const SharedOperand& a, const SharedOperand& b, bool accumulate);
template <int N>
__device__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], const SharedOperand& b, bool accumulate);
#endif

// A K step of 16 of a warpgroup product into `d`, a piece of its accumulators: A from shared
// memory (its 64 rows, core matrices along K) or from registers (the calling warp's 16 rows as
// K/16 mma.sync A fragments).
template <int PIECE, int K>
__device__ __forceinline__ void wgmma_step(float (&d)[PIECE / 8][4], const SharedOperand& a, int k,
                                           const SharedOperand& b) {
    wgmma_ss<PIECE>(d, a.at(core_matrix_offset<K>(0, k)), b, true);
}
template <int PIECE, int K>
__device__ __forceinline__ void wgmma_step(float (&d)[PIECE / 8][4], uint32_t (&a)[K / 16][4], int k,
                                           const SharedOperand& b) {
    wgmma_rs<PIECE>(d, a[k / 16], b, true);
}
__device__ __forceinline__ void wgmma_fence_operands(const SharedOperand&) {}

// acc += the warpgroup's 64 × N product of A (64 rows × K: a SharedOperand, or the calling
// warp's rows in registers, wgmma_step) by Wᵀ (W N × K, core matrices along K at `w`), N a
// multiple of 64: K/16 wgmma of 64 × 128 × 16 where N comes in 128s, else of 64 × 64 × 16,
// waited for. acc is the calling warp's share: its 16 rows of the 64 as N/8 C tiles. The
// tensor cores read a shared operand at each wgmma, and a multiprocessor's shared memory gives
// 128 bytes a cycle, about what 64 × 64 × 16 products at their full rate read with both operands
// there: a wider product reads its A once for more columns, and an A in registers not at all.
template <int N, int K, typename A>
__device__ __forceinline__ void warpgroup_product(float (&acc)[N / 8][4], A&& a, const SharedOperand& w) {
    static_assert(N % 64 == 0 && K % 16 == 0, "whole 64 × 64 × 16 products");
    constexpr int PIECE = N % 128 == 0 ? 128 : 64;
    wgmma_fence_operands(acc);
    wgmma_fence_operands(a);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < K; k += 16)
#pragma unroll
        for (int p = 0; p < N / PIECE; ++p)
            wgmma_step<PIECE, K>(*reinterpret_cast<float(*)[PIECE / 8][4]>(&acc[PIECE / 8 * p]), a, k,
                                 w.at(core_matrix_offset<K>(PIECE * p, k)));
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
}

// Padding of the f32 staging rows, in floats: with rows COLUMNS + 8 floats apart (COLUMNS a
// multiple of 32), the 8-byte stores of a half-warp in store_warp_tile (rows g to g + 3, columns
// 2t and 2t + 1) fall in 32 different banks.
constexpr int STAGED_PAD = 8;

// A warp's FM × NT C tiles of a block tile's accumulators into an f32 staging area, row-major
// (row stride lds floats, even), for the epilogues: each lane its column pairs of rows g and
// g + 8 of every tile, 8 bytes a store. The warp's tiles i are ROW_STEP rows apart from wr on:
// 16 for mma.sync's, 64 for a warpgroup's wgmma accumulators (wr = 16 · its warp).
template <int FM, int NT, int ROW_STEP = 16>
__device__ __forceinline__ void store_warp_tile(float* staged, int lds, const float (&acc)[FM][NT][4], int wr,
                                                int wc) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int half = 0; half < 2; ++half)
                *(float2*)&staged[(wr + ROW_STEP * i + g + 8 * half) * lds + wc + 8 * j + 2 * t] =
                    float2{acc[i][j][2 * half], acc[i][j][2 * half + 1]};
}

// Each C tile of a warp's 16 × N accumulators set to its columns' bias[c], 0 where bias is null
// or c ≥ columns (the columns a weight block has left). A lane's columns come in pairs (2t and
// 2t + 1 of each tile, for rows g and g + 8): one 4-byte load a pair where all N columns are
// there and bias is 4-byte aligned, else a checked load a value.
template <int N>
__device__ __forceinline__ void fill_tiles_with_bias(float (&acc)[N / 8][4], const __half* bias, int64_t columns = N) {
    const int t = threadIdx.x % 4;
    float2 pairs[N / 8];
    if (bias && columns >= N && (uintptr_t)bias % 4 == 0) {
#pragma unroll
        for (int j = 0; j < N / 8; ++j) pairs[j] = __half22float2(*(const __half2*)&bias[8 * j + 2 * t]);
    } else {
#pragma unroll
        for (int j = 0; j < N / 8; ++j) {
            const int c = 8 * j + 2 * t;
            pairs[j] = float2{bias && c < columns ? __half2float(bias[c]) : 0.f,
                              bias && c + 1 < columns ? __half2float(bias[c + 1]) : 0.f};
        }
    }
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
        acc[j][0] = acc[j][2] = pairs[j].x;
        acc[j][1] = acc[j][3] = pairs[j].y;
    }
}

// The warp's 16 × N product with the weights W (N × K, [out][in], staged in shared memory, row
// stride ldw halves) of its 16 rows of an f16 operand (from `rows`, row stride lda halves), as
// N/8 C tiles, each column's bias[c] added (none where bias is null; none past `columns`, the
// columns a weight block has left: fill_tiles_with_bias).
template <int N, int K>
__device__ __forceinline__ void warp_rows_linear(float (&acc)[N / 8][4], const __half* rows, int lda, const __half* w,
                                                 int ldw, const __half* bias, int64_t columns = N) {
    fill_tiles_with_bias<N>(acc, bias, columns);
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
        uint32_t a[4];
        load_a_fragment(a, rows, lda, k0);
        mma_rows_k16<N>(acc, a, w, ldw, k0);
    }
}

// The warp's C tiles (16 × N) as f16 rows in shared memory (from `rows`, row stride ld halves):
// each lane its column pairs of rows g and g + 8.
template <int N> __device__ __forceinline__ void store_tiles(__half* rows, int ld, const float (&acc)[N / 8][4]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half)
            *(__half2*)&rows[(g + 8 * half) * ld + 8 * j + 2 * t] =
                __floats2half2_rn(acc[j][2 * half], acc[j][2 * half + 1]);
}

// x[row0 + r][c] = the warp's C tiles (16 × N, x's rows N wide), or += with ADD (the residual of
// the fused kernels), rows past n left alone: each lane its column pairs of rows g and g + 8, as
// f16 pairs. A row's N/8 old pairs are all loaded before any is used, so that their round trips
// to memory overlap: with a load, add and store a pair in turn (each behind its own bounds check,
// which the compiler made a branch), a thread waited for 2·N/8 loads one after the other, 32 at
// TIS-B's width, at the end of every FFN and label-assignment block.
template <int N, bool ADD>
__device__ __forceinline__ void write_tiles_to_rows(__half* x, const float (&acc)[N / 8][4], int64_t n, int64_t row0) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int64_t row = row0 + g + 8 * half;
        if (row >= n) continue;
        __half2* out = (__half2*)&x[row * N + 2 * t];  // pair j at out[4j]
        float2 old[N / 8];
#pragma unroll
        for (int j = 0; j < N / 8; ++j) old[j] = ADD ? __half22float2(out[4 * j]) : float2{0.f, 0.f};
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
            out[4 * j] = __floats2half2_rn(old[j].x + acc[j][2 * half], old[j].y + acc[j][2 * half + 1]);
    }
}

// The fused kernels' widths: multiples of 16 up to 128 (one instantiation each).
#define FOR_EACH_FUSED_WIDTH(X) X(16) X(32) X(48) X(64) X(80) X(96) X(112) X(128)

// Lanes a row in layer_norm_rows_at: a row's 16-byte pieces (D/8) rounded up to a power of two,
// at most 8.
__host__ __device__ constexpr int layer_norm_lanes(int pieces) { return pieces > 4 ? 8 : pieces > 2 ? 4 : pieces > 1 ? 2 : 1; }

// LayerNorm of `rows` rows of x (D wide, rows ldx halves apart) from row0 on into f16 shared
// memory, value (r, f) at dest[at(r, f)]; rows past n are zero. The arithmetic is
// warp_layer_norm's (common.cuh), each row in registers, so x is read once. A warp normalises
// 32 / LANES rows at once, LANES lanes a row (layer_norm_lanes: 4 rows of 8 lanes at TIS-B's
// width of 128): lane l takes row l % (32 / LANES) and the row's 16-byte pieces l / (32 / LANES),
// that + LANES, …, 8 values each, one 16-byte load and one 16-byte store a piece, with the
// pieces' gamma and beta held in registers for all its rows; the row's two sums go round its
// LANES lanes by shuffles. The 8 lanes that a 16-byte store serves at once then write 4 rows,
// two pieces each: at most two to a bank group, in core matrices as in rows padded by MMA_PAD
// (and reading padded rows of shared memory likewise). x and dest 16-byte aligned (device
// allocations; the fused kernels' widths are multiples of 16). About 35 instructions a row of
// 128 in the sm_90a SASS, where a warp a row with 2-byte values, a lane every 32nd column, took
// about 100: the fused kernels normalise every token of every layer (the FFN's 128-token block,
// 16 rows a warp, spent some 1,600 instructions a thread on them, next to 4,200 for its chunk
// loop).
template <int D, class At>
__device__ __forceinline__ void layer_norm_rows_at(__half* dest, At at, const __half* x, int64_t ldx,
                                                   const __half* gamma, const __half* beta, int64_t n, int64_t row0,
                                                   int rows) {
    static_assert(D % 8 == 0, "16-byte pieces");
    constexpr int PIECES = D / 8, LANES = layer_norm_lanes(PIECES), AT_ONCE = 32 / LANES;
    constexpr int PER_LANE = (PIECES + LANES - 1) / LANES;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, first = lane / AT_ONCE;
    // Piece j of the lane is piece first + LANES·j of the row, if the row has it.
    const auto has = [&](int j) { return PIECES % LANES == 0 || first + LANES * j < PIECES; };
    // The 8 values of piece j from p on, zero where the lane's row lacks the piece.
    const auto load_piece = [&](const __half* p, bool present, float(&v)[8]) {
        if (present) load8(p, v);
        else
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = 0.f;
    };
    float g[PER_LANE][8], b[PER_LANE][8];
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        const int f = 8 * (first + LANES * j);
        load_piece(gamma + f, has(j), g[j]);
        load_piece(beta + f, has(j), b[j]);
    }
    constexpr float INV_WIDTH = 1.f / D;
    // Every lane goes round the loop as often (the shuffles need the whole warp).
    for (int base = AT_ONCE * warp; base < rows; base += AT_ONCE * (blockDim.x / 32)) {
        const int r = base + lane % AT_ONCE;
        const bool inside = r < rows && row0 + r < n;
        const __half* row = x + (row0 + r) * ldx;
        float v[PER_LANE][8], sum = 0.f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            load_piece(row + 8 * (first + LANES * j), inside && has(j), v[j]);
#pragma unroll
            for (int i = 0; i < 8; ++i) sum += v[j][i];
        }
#pragma unroll
        for (int offset = AT_ONCE; offset < 32; offset *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        const float mean = sum * INV_WIDTH;
        float squares = 0.f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j)
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                v[j][i] -= mean;
                if (has(j)) squares += v[j][i] * v[j][i];
            }
#pragma unroll
        for (int offset = AT_ONCE; offset < 32; offset *= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
        const float inv_std = rsqrtf(squares * INV_WIDTH + 1e-5f);
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            if (!has(j)) continue;
            uint32_t pairs[4] = {};  // rows past n are zero
            if (inside)
#pragma unroll
                for (int i = 0; i < 8; i += 2)
                    pairs[i / 2] = pack_half2(fmaf(v[j][i] * inv_std, g[j][i], b[j][i]),
                                              fmaf(v[j][i + 1] * inv_std, g[j][i + 1], b[j][i + 1]));
            *(uint4*)&dest[at(r, 8 * (first + LANES * j))] = uint4{pairs[0], pairs[1], pairs[2], pairs[3]};
        }
    }
}

// The same into shared rows `ld` halves apart, from x's rows `ldx` halves apart.
template <int D>
__device__ __forceinline__ void layer_norm_rows(__half* dest, int ld, const __half* x, int64_t ldx,
                                                const __half* gamma, const __half* beta, int64_t n, int64_t row0,
                                                int rows) {
    layer_norm_rows_at<D>(dest, [ld](int r, int f) { return r * ld + f; }, x, ldx, gamma, beta, n, row0, rows);
}
