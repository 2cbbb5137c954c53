// The nnU-Net network's convolutions.
//
// conv3d: y[co, o] = b[co] + Σ_ci Σ_t x[ci, o·stride + t − pad] · w[co, ci, t], zero outside the
// input, for every shape nnU-Net plans use (kernels 3³, 1×3×3, 1³; strides 1, 2, 1×2×2; pad k/2).
// conv_transpose3d with kernel = stride (no overlap): y[co, i·s + a] = b[co] +
// Σ_ci x[ci, i] · w[ci, co, a].
//
// f32 storage (the exactness mode): `conv3d_f32` and `conv_transpose3d_f32`, one thread per
// output value over channels-first volumes (C × Z × Y × X) and PyTorch's weights. Threads of a
// warp share `co` and neighbouring x positions: weight loads are warp-uniform broadcasts, input
// loads coalesce along x.
//
// f16 storage: tensor-core GEMMs, and a direct kernel for the first layer, over channels-last
// volumes (Z × Y × X × C, the channel fastest, so that 8 channels of a voxel are one aligned
// 16-byte load) and weights packed by `swap_inner_axes` of kernels/volume.cu (conv
// [cout][tap][cin], transposed conv [cin][tap][cout]).
// - `conv3d_igemm_f16_*`: the implicit GEMM y[m, co] = b[co] + Σ_k A[m, k]·B[k, co], M = output
//   voxels, N = cout, K = taps·cin with k = tap·cin + ci: A[m, k] is channel ci of the input
//   voxel under tap `tap` of voxel m's window, gathered straight from x while staging (im2col
//   without the copy); B[k, co] = packed[co][k]. It runs when every channel count is a multiple
//   of 8 (every layer of an nnU-Net plan but the first). Tiled like linear_mma_f16: a 64 × 64
//   output block (voxels × channels; 128 × 32 or 128 × 64 where the layer suits them, see
//   IgemmTile) per 4 warps, each warp 32 × 32 (2 × 4 mma.sync C tiles of 16 × 8, f32
//   accumulators; 64 × 32 in the 128 × 64 tile, warp_tile_mma), K in steps of 32, both slabs
//   row-major with rows padded by 8 halves. A step's slabs are rows of 4 pieces of 16 bytes (8
//   consecutive columns are 8 channels of one tap in one input), 4 to 6 pieces per thread,
//   copied with cp.async (A's through L1, where the other taps find them again; B's past it)
//   into a 3-stage ring: the copies of step t + 2 fly while step t multiplies, one barrier per
//   step. Each thread copies the same 8 columns of the same rows at every step: its rows'
//   windows (32-bit voxel indices, and which taps land inside the input: RowTaps) and weight
//   rows are worked out once, and its column (tap, channel, input) follows from step to step
//   without division, so that a piece costs a few instructions (a test of its tap's bit, one
//   address; its tap's offset one load from a table in shared memory): run A's kernel took 492
//   instructions a warp a step for its 32 mma.sync (161 now, sm_90a SASS of the 128 × 64 tile),
//   recomputing 64-bit addresses and bounds for every piece. Padding and the ragged ends of M, N
//   and K are the copies' zero fill. In sm_90a cubins (and the CUDA emulator posing as an H100)
//   the 4 warps are one warpgroup and the products are wgmma.mma_async (mma.cuh): the slabs lie
//   as wgmma's core matrices (unpadded), a K step is 64 wide, and a step of the 128 × 64 tile is
//   8 asynchronous 64 × 64 × 16 products, waited for before the next barrier, where mma.sync
//   takes 64 and 24 ldmatrix a warp: 220 instructions a warp for 64 of K, most of them the
//   copies', against 2 × 161 (SASS counts, not timings). The epilogue stages the
//   accumulators row-major in shared memory (reusing the ring's bytes; dynamic shared memory:
//   31, 39 and 47 KB for the 64 × 64, 128 × 32 and 128 × 64 tiles with mma.sync, 48, 60 and
//   72 KB with wgmma) and writes y[m][co] + b[co], 8 channels a thread (store_block). Voxel
//   blocks are on blockIdx.x (a volume can have more than 65535). Where the 64 × 64 tiles are
//   fewer than the multiprocessors (a plan's deepest stages: 20 to 80 blocks for an H100's 132),
//   K is split over blockIdx.z: each split leaves its raw sums in f32, and
//   `conv3d_split_sum_f16` adds them up and runs the epilogue.
// - `conv3d_direct_f16`: a concatenation whose parts' channels do not come in eights, on CUDA
//   cores over the same layouts. (A single input of 1 to 7 channels, a network's first layer,
//   runs on the implicit GEMM instead, its channels and weights padded with zeros to 8 by
//   `pad_inner_axis_f16` in kernels/volume.cu: 8 times the multiply-adds, on tensor cores, where
//   this kernel took run A 0.34 ms for the Pancreas plan's first layer, all of it on CUDA cores
//   and per-block weight staging.) A block of 64 threads has 64 output voxels and 32 output
//   channels (blockIdx.y), each thread one voxel and its 32 f32 accumulators. Per input channel and chunk of up to 27
//   taps, the block stages the weights in shared memory as [tap][channel] (warp-uniform float4
//   reads: one 16-byte load feeds 4 FMAs) and each thread gathers its voxel's window into
//   registers (zero outside the input), then multiplies. The output is staged in shared memory
//   and written by store_block, as the implicit GEMM's.
// Both read the input as two volumes' channel concatenation when given `second` and
// `first_channels`, which spares the decoder's convolutions the concatenated copy. Given
// `stats`, both epilogues also leave InstanceNorm's partial sums of each block's voxels per
// channel (Σy, Σy² of the stored f16 values, as instance_norm_partials would compute them; f32
// over 32 values a thread, f64 in memory) at stats[(co·gridDim.x + blockIdx.x)·2], the
// [channel][split] layout instance_norm_finalize reduces: the conv block's normalisation then
// reads its output once (apply) instead of twice (partials, apply).
// - `conv_transpose3d_mma_f16`: one GEMM, P[i, n] = Σ_ci x[i, ci]·packed[ci, n] with M = input
//   voxels, N = taps·cout (n = tap·cout + co), K = cin, tiled as above: A is x itself, B the
//   packed weights' rows as they lie ([k][n], 16-byte asynchronous copies where n comes in
//   eights), read by ldmatrix.trans. The epilogue writes P[i, n] + b[co] to y[i·s + tap][co], 8
//   channels (16 bytes) a store where cout comes in eights: 8 columns of a row are then 8
//   consecutive channels of one tap, consecutive in y.
#include "mma.cuh"

template <typename T>
__device__ void conv3d(const T* x, const T* w, const T* bias, T* y, int64_t cin, Dims3 in, int64_t cout, Dims3 out,
                       Dims3 kernel, Dims3 stride, Dims3 pad) {
    int64_t taps = kernel.count();
    GRID_LOOP(i, cout * out.count()) {
        int64_t ox = i % out.x, oy = (i / out.x) % out.y, oz = (i / (out.x * out.y)) % out.z;
        int64_t co = i / out.count();
        float acc = bias ? to_f32(bias[co]) : 0.f;
        for (int64_t ci = 0; ci < cin; ++ci) {
            const T* xc = x + ci * in.count();
            const T* wc = w + (co * cin + ci) * taps;
            for (int64_t kz = 0; kz < kernel.z; ++kz) {
                int64_t iz = oz * stride.z + kz - pad.z;
                if (iz < 0 || iz >= in.z) continue;
                for (int64_t ky = 0; ky < kernel.y; ++ky) {
                    int64_t iy = oy * stride.y + ky - pad.y;
                    if (iy < 0 || iy >= in.y) continue;
                    for (int64_t kx = 0; kx < kernel.x; ++kx) {
                        int64_t ix = ox * stride.x + kx - pad.x;
                        if (ix < 0 || ix >= in.x) continue;
                        acc += to_f32(xc[(iz * in.y + iy) * in.x + ix]) * to_f32(wc[(kz * kernel.y + ky) * kernel.x + kx]);
                    }
                }
            }
        }
        y[i] = from_f32<T>(acc);
    }
}

constexpr int TILE = 64;
constexpr int MMA_THREADS = 128;
// Halves per 16-byte load.
constexpr int VECTOR = 8;

// One output voxel's window in the input: its origin (negative at the padding) and the
// origin's voxel index in the input (which may lie outside it: only a tap that lands inside is
// read). Voxel indices are 32-bit: the backend refuses volumes of 2³¹ voxels or more. A voxel
// past the output (the last block's rows past M, whose results are never stored) gets an origin
// no tap brings into the input, so that it reads zeros like the padding: its own window would
// lie a row or a plane past the output's, whose index can pass 2³¹ in a volume just below it.
struct Window {
    int z, y, x, voxel;
};

__device__ __forceinline__ Window window_of(int64_t v, int64_t m, Dims3 in, Dims3 out, Dims3 stride, Dims3 pad) {
    if (v >= m) return Window{-(1 << 29), 0, 0, 0};  // far below any tap's reach, without overflow
    const int z = (int)(v / (out.y * out.x) * stride.z - pad.z), y = (int)(v / out.x % out.y * stride.y - pad.y),
              x = (int)(v % out.x * stride.x - pad.x);
    return Window{z, y, x, (z * (int)in.y + y) * (int)in.x + x};
}

// Column k = tap·cin + ci of the implicit A (for the direct kernel, tap `tap` of input channel
// ci) in two parts. The tap: its place in the window (z, y, x) and its offset from the window's
// origin in voxels of the input.
struct Tap {
    int z, y, x, offset;
};

__device__ __forceinline__ Tap tap_of(int z, int y, int x, Dims3 in) {
    return Tap{z, y, x, (z * (int)in.y + y) * (int)in.x + x};
}

// And where channel ci lies: channel ci of the first input, or (the decoder's convolutions read
// the channel concatenation [first; second] in place) channel ci − first_channels of the second.
// `source` points at that channel of the input's voxel 0, `voxel_bytes` is the input's bytes per
// voxel (its channels).
struct Channel {
    const __half* source;
    int voxel_bytes;
};

__device__ __forceinline__ Channel channel_of(int ci, const __half* x, const __half* second, int cin,
                                              int first_channels) {
    const bool in_second = ci >= first_channels;
    return Channel{in_second ? second + (ci - first_channels) : x + ci,
                   (int)sizeof(__half) * (in_second ? cin - first_channels : first_channels)};
}

// Whether A[voxel, column] lies inside the input (else it is a zero), and where (channels-last
// inputs). The three bounds are one unsigned comparison each (a negative coordinate wraps past
// the extent).
__device__ __forceinline__ bool a_source(const Window& window, const Tap& tap, const Channel& channel, Dims3 in,
                                         const __half*& source) {
    // In bytes, so that the product and the sum are one IMAD.WIDE.
    source = (const __half*)((const char*)channel.source +
                             wide_product(window.voxel + tap.offset, channel.voxel_bytes));
    return (unsigned)(window.z + tap.z) < (unsigned)in.z && (unsigned)(window.y + tap.y) < (unsigned)in.y &&
           (unsigned)(window.x + tap.x) < (unsigned)in.x;
}

// Copies 16 bytes from global to shared memory asynchronously, or 16 zeros when `zero` (`src`
// must then still be a valid address; nothing is read from it), joining the thread's current
// group of __pipeline_commit. THROUGH_L1 keeps the source in L1 (cp.async.ca): the implicit
// GEMM's A pieces, which the window's other taps read again a few K steps later (a neighbouring
// voxel's tap covers the same input voxel); else past it (cp.async.cg), B's weights. One
// instruction either way, the zero fill its predicate operand, where __pipeline_memcpy_async
// with a run-time zero fill compiles to two (one predicated each way). The CUDA emulator, which
// compiles kernels as host C++, has no cache to hint: it takes __pipeline_memcpy_async.
template <bool THROUGH_L1> __device__ __forceinline__ void copy_16_async(void* dst, const void* src, bool zero) {
#ifdef __CUDA_ARCH__
    if constexpr (THROUGH_L1)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)),
                     "l"(src), "r"(zero ? 0 : 16));
    else
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)),
                     "l"(src), "r"(zero ? 0 : 16));
#else
    __pipeline_memcpy_async(dst, src, 16, zero ? 16 : 0);
#endif
}

// The implicit GEMM's kernels have at most this many taps (bits of RowTaps::inside); others run
// on conv3d_direct_f16 (no nnU-Net plan has any: its kernels are 3³, 1×3×3 and 1³).
constexpr int IGEMM_MAX_TAPS = 32;

// One row of the implicit GEMM's A, worked out once per block: its window's origin as a voxel
// index of the input (which may lie outside it) and which of the kernel's taps land inside the
// input, bit t for tap t = (z·ky + y)·kx + x. A piece of the row is then inside when its
// column's tap bit is set (one LOP3 a piece where three bounds tests took six instructions), and
// the columns past K, whose taps are past the kernel's, find no bit. A row past the output
// (the last block's rows past M, whose results are never stored) has no taps inside, and reads
// zeros like the padding.
struct RowTaps {
    int voxel;
    uint32_t inside;
};

__device__ __forceinline__ RowTaps row_taps(int64_t v, int64_t m, Dims3 in, Dims3 out, Dims3 kernel, Dims3 stride,
                                            Dims3 pad) {
    if (v >= m) return RowTaps{0, 0u};
    const Window w = window_of(v, m, in, out, stride, pad);
    const int kz = (int)kernel.z, ky = (int)kernel.y, kx = (int)kernel.x;
    uint32_t along_x = 0, plane = 0, inside = 0;
    for (int x = 0; x < kx; ++x) along_x |= (uint32_t)((unsigned)(w.x + x) < (unsigned)in.x) << x;
    for (int y = 0; y < ky; ++y)
        if ((unsigned)(w.y + y) < (unsigned)in.y) plane |= along_x << (y * kx);
    for (int z = 0; z < kz; ++z)
        if ((unsigned)(w.z + z) < (unsigned)in.z) inside |= plane << (z * ky * kx);
    return RowTaps{w.voxel, inside};
}

// The implicit GEMM's taps' offsets from a window's origin, in voxels of the input: entry t for
// tap t = (z·ky + y)·kx + x, staged in shared memory once a block (`stage_tap_offsets`), so
// that a column's tap costs one shared load a step where following its (z, y, x) from step to
// step and working out the offset took some ten instructions. A column k reaches tap
// k / cin < (K + STEP_K) / cin ≤ taps + 8 (cin ≥ 8): the entries past the kernel's taps, which
// only the columns past K reach (and find no bit of RowTaps::inside), are zeros.
constexpr int TAP_TABLE = 2 * IGEMM_MAX_TAPS;

__device__ __forceinline__ void stage_tap_offsets(int* offsets, Dims3 in, Dims3 kernel) {
    const int taps = (int)kernel.count(), ky = (int)kernel.y, kx = (int)kernel.x;
    for (int t = threadIdx.x; t < TAP_TABLE; t += blockDim.x)
        offsets[t] = t < taps ? tap_of(t / (ky * kx), t / kx % ky, t % kx, in).offset : 0;
}

// One thread's column in the pipelined path, followed from step to step without division: the
// thread loads columns kk…kk + 7 of every step, kk fixed, i.e. k = k0 + kk = tap·cin + ci.
// `bit` is its tap's bit of RowTaps::inside (none past the kernel's taps: a column past K).
struct ColumnCursor {
    int tap, ci;
    uint32_t bit;

    ColumnCursor() = default;

    __device__ __forceinline__ ColumnCursor(int k, int cin) : tap(k / cin), ci(k % cin) {
        bit = tap < IGEMM_MAX_TAPS ? 1u << tap : 0u;
    }
    __device__ __forceinline__ void advance(int step, int cin) {
        for (ci += step; ci >= cin; ci -= cin) {
            ++tap;
            bit <<= 1;
        }
    }
};

// The epilogue of the f16 convolutions (THREADS threads, a multiple of COLUMNS):
// y[row0 + r][col0 + c] = staged[r][c] + b[col0 + c] for the block's ROWS voxels × COLUMNS
// channels, staged row-major (row stride ld floats), 8 consecutive channels a thread and
// consecutive threads on consecutive eights: where n comes in eights, the 8 values are 16
// aligned bytes of y, all inside the output or all past it, and go as one store (the stores of
// a 128-row block fall from 64 to 8 a thread), else one at a time.
// Each thread leaves the values it stored in `staged` (zeros outside the output), so that, given
// `stats`, InstanceNorm's partial sums of the block are of the stored values: THREADS / COLUMNS
// threads per channel (t % COLUMNS) each add up as many consecutive voxels, a warp's lanes
// reading consecutive floats of a row; the first adds up their sums.
template <int ROWS, int COLUMNS, int THREADS>
__device__ __forceinline__ void store_block(float* staged, int ld, const __half* bias, __half* y, int64_t row0,
                                            int64_t m, int64_t col0, int64_t n, double* stats) {
    constexpr int PARTS = THREADS / COLUMNS, PART_ROWS = ROWS / PARTS;
    static_assert(PARTS * COLUMNS == THREADS && PARTS * PART_ROWS == ROWS, "whole parts of the block");
    static_assert(COLUMNS % 8 == 0, "whole eights of channels");
    const bool by8 = n % 8 == 0 && (uintptr_t)y % 16 == 0;
    for (int l = threadIdx.x; l < ROWS * COLUMNS / 8; l += THREADS) {
        const int r = l / (COLUMNS / 8), c = l % (COLUMNS / 8) * 8;
        const int64_t row = row0 + r, col = col0 + c;
        float* values = staged + r * ld + c;
        __half stored[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const bool inside = row < m && col + i < n;
            stored[i] = from_f32<__half>(values[i] + (bias && inside ? __half2float(bias[col + i]) : 0.f));
            values[i] = inside ? __half2float(stored[i]) : 0.f;
        }
        if (row >= m || col >= n) continue;
        __half* out = y + row * n + col;
        if (by8)
            *(uint4*)out = uint4{pack_halves(stored[0], stored[1]), pack_halves(stored[2], stored[3]),
                                 pack_halves(stored[4], stored[5]), pack_halves(stored[6], stored[7])};
        else
            for (int i = 0; i < 8 && col + i < n; ++i) out[i] = stored[i];
    }
    if (!stats) return;
    __shared__ float parts[PARTS][COLUMNS][2];  // [voxels part][channel][Σy, Σy²]
    __syncthreads();
    int c = threadIdx.x % COLUMNS, part = threadIdx.x / COLUMNS;
    float sum = 0.f, squares = 0.f;
#pragma unroll 4  // fully unrolled, ptxas spills on sm_80
    for (int r = part * PART_ROWS; r < (part + 1) * PART_ROWS; ++r) {
        float stored = staged[r * ld + c];
        sum += stored;
        squares += stored * stored;
    }
    parts[part][c][0] = sum;
    parts[part][c][1] = squares;
    __syncthreads();
    if (part == 0 && col0 + c < n) {
        double total[2] = {0.0, 0.0};
        for (int p = 0; p < PARTS; ++p)
            for (int i = 0; i < 2; ++i) total[i] += parts[p][c][i];
        double* partial = stats + ((col0 + c) * gridDim.x + blockIdx.x) * 2;
        partial[0] = total[0];
        partial[1] = total[1];
    }
}

// Depth of the implicit GEMM's ring of shared slabs (steps in flight: STAGES − 1).
constexpr int STAGES = 3;

// The implicit GEMM's block tile: 4 warps, WARPS_M along the voxels and 4 / WARPS_M along the
// channels, each with FM × FN blocks of 16 × 16 outputs (FM × 2·FN mma.sync C tiles).
// - 64 × 64 (2 × 2 warps of 32 × 32): any layer.
// - 128 × 32 (4 × 1 warps of 32 × 32) where cout ≤ 32 (a plan's first stage, encoder and
//   decoder: 15 % of a Pancreas forward's multiply-accumulates, 50 % of the generic 128³
//   plan's), where a 64-channel tile would compute half zeros.
// - 128 × 64 (2 × 2 warps of 64 × 32) where cout > 32 and the volume gives enough blocks: each
//   staged B row serves 128 voxels instead of 64 (a step moves 12 KB for 262 k MACs instead of
//   8 KB for 131 k), and each loaded fragment feeds more products (6 ldmatrix per 16 mma.sync
//   instead of 4 per 8).
// With WGMMA (sm_90a), the 4 warps are one warpgroup and the tile's ROWS / 64 blocks of 64 rows
// are wgmma.mma_async products of N = COLUMNS, both slabs in wgmma's core-matrix layout
// (unpadded) instead of padded rows, and a K step is 64 wide (STEP_K) instead of 32: wgmma
// leaves the copies most of the issue slots, and a wider step spreads each step's fixed cost
// (barrier, cursor, descriptors) over twice the products.
template <int WARPS_M, int FM, int FN, bool WGMMA> struct IgemmTile {
    static constexpr int WARPS_N = 4 / WARPS_M, ROWS = WARPS_M * 16 * FM, COLUMNS = WARPS_N * 16 * FN;
    static_assert(!WGMMA || ROWS % 64 == 0, "whole warpgroup products of 64 rows");
    static constexpr int STEP_K = WGMMA ? 2 * MMA_K : MMA_K;
    // A slab's row stride in halves, and where column kk of row r of a slab lies.
    static constexpr int SLAB_HALVES = WGMMA ? STEP_K : SLAB_LD;
    __device__ static constexpr int slab_offset(int r, int kk) {
        return WGMMA ? core_matrix_offset<STEP_K>(r, kk) : r * SLAB_LD + kk;
    }
    // STAGES slabs of A (ROWS × STEP_K) and B (COLUMNS × STEP_K) while the K loop runs, then (the
    // same bytes) the f32 accumulators for the epilogue: dynamic shared memory (72 KB for the
    // wgmma 128 × 64 tile), sized alike by igemm_shared_bytes in src/backend/cuda/conv.rs.
    static constexpr int A_BYTES = STAGES * ROWS * SLAB_HALVES * 2, B_BYTES = STAGES * COLUMNS * SLAB_HALVES * 2;
    static constexpr int STAGED_LD = COLUMNS + STAGED_PAD, STAGED_BYTES = ROWS * STAGED_LD * 4;
    static constexpr int SHARED_BYTES =
        A_BYTES + B_BYTES > STAGED_BYTES ? A_BYTES + B_BYTES : STAGED_BYTES;
};

// The K step of a warpgroup's wgmma products (WGMMA): acc[i] += A[64i : 64i + 64]·B for the
// slabs of one stage (STEP_K wide), a product per 16 of K and block of 64 rows, waited for
// before the next barrier lets the stage be refilled.
template <int ROWS, int COLUMNS, int STEP_K>
__device__ __forceinline__ void wgmma_slabs(float (&acc)[ROWS / 64][COLUMNS / 8][4], const SharedOperand& a,
                                            const SharedOperand& b) {
#pragma unroll
    for (int i = 0; i < ROWS / 64; ++i) wgmma_fence_operands(acc[i]);
    wgmma_fence();
#pragma unroll
    for (int k0 = 0; k0 < STEP_K; k0 += 16)
#pragma unroll
        for (int i = 0; i < ROWS / 64; ++i)
            wgmma_ss<COLUMNS>(acc[i], a.at(core_matrix_offset<STEP_K>(64 * i, k0)),
                              b.at(core_matrix_offset<STEP_K>(0, k0)), true);
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < ROWS / 64; ++i) wgmma_fence_operands(acc[i]);
}

template <int WARPS_M, int FM, int FN, bool WGMMA>
__device__ __forceinline__ void conv3d_igemm(const __half* x, const __half* w, const __half* bias, __half* y,
                                             int64_t cin, Dims3 in, int64_t cout, Dims3 out, Dims3 kernel,
                                             Dims3 stride, Dims3 pad, const __half* second, int64_t first_channels,
                                             double* stats, float* split_sums) {
    using Tile = IgemmTile<WARPS_M, FM, FN, WGMMA>;
    constexpr int ROWS = Tile::ROWS, COLUMNS = Tile::COLUMNS, STEP_K = Tile::STEP_K;
    extern __shared__ float4 igemm_shared[];
    unsigned char* const shared = reinterpret_cast<unsigned char*>(igemm_shared);
    __half* const xs = reinterpret_cast<__half*>(shared);                  // [stage]: ROWS × STEP_K of A
    __half* const ws = reinterpret_cast<__half*>(shared + Tile::A_BYTES);  // [stage]: COLUMNS × STEP_K of B
    auto staged = reinterpret_cast<float(*)[Tile::STAGED_LD]>(shared);     // after the K loop
    constexpr int A_STAGE = ROWS * Tile::SLAB_HALVES, B_STAGE = COLUMNS * Tile::SLAB_HALVES;
    const int64_t m = out.count(), n = cout, k = cin * kernel.count();
    int64_t row0 = (int64_t)blockIdx.x * ROWS, col0 = (int64_t)blockIdx.y * COLUMNS;
    int warp = threadIdx.x / 32, wr = warp / Tile::WARPS_N * 16 * FM, wc = warp % Tile::WARPS_N * 16 * FN;
    // mma.sync: the warp's FM × 2FN C tiles; wgmma: the warpgroup's ROWS / 64 products' share.
    float acc[WGMMA ? ROWS / 64 : FM][WGMMA ? COLUMNS / 8 : 2 * FN][4] = {};
    // Split K (gridDim.z > 1): this block multiplies steps [first, last) of the K loop and
    // leaves its raw sums in split_sums[blockIdx.z][m][n] for conv3d_split_sum_f16. Step
    // counts, channels and K are 32-bit (K = cin·taps is a few thousand).
    const int steps = (int)((k + STEP_K - 1) / STEP_K), per_split = (steps + gridDim.z - 1) / gridDim.z;
    const int first = blockIdx.z * per_split, last = min(steps, first + per_split);
    // 8 consecutive columns are 8 channels of one tap in one input: 16 aligned bytes, copied
    // asynchronously STAGES − 1 steps ahead. Thread t copies columns kk…kk + 7 (and, in a step
    // 64 wide, kk + 32…kk + 39) of rows t / 4 + 32j of both slabs (ROWS / 32 of A, COLUMNS / 32
    // of B), at every step. Everything about its rows is worked out here, once: its voxels'
    // windows and the taps that land inside the input, its weight rows' addresses; a step then
    // moves each column on (a cursor) and costs a few instructions a copy: the column's tap
    // offset and input once, and per A row a test of its tap's bit and one address.
    constexpr int THREAD_ROWS = MMA_THREADS / (MMA_K / VECTOR);
    static_assert(THREAD_ROWS == 32, "a slab's rows in groups of 32, a row of 4 pieces per 4 threads");
    const int row = threadIdx.x / (MMA_K / VECTOR), kk = threadIdx.x % (MMA_K / VECTOR) * VECTOR;
    RowTaps rows[ROWS / THREAD_ROWS];
#pragma unroll
    for (int j = 0; j < ROWS / THREAD_ROWS; ++j)
        rows[j] = row_taps(row0 + row + j * THREAD_ROWS, m, in, out, kernel, stride, pad);
    // The thread's weight rows as offsets in w (fewer than 2³² values: the backend checks), so
    // that a piece's address is one IMAD.WIDE.U32 from w.
    unsigned weight_rows[COLUMNS / THREAD_ROWS];
    bool weight_row_exists[COLUMNS / THREAD_ROWS];  // not past N
#pragma unroll
    for (int j = 0; j < COLUMNS / THREAD_ROWS; ++j) {
        const int64_t c = col0 + row + j * THREAD_ROWS;
        weight_row_exists[j] = c < n;
        weight_rows[j] = (unsigned)((weight_row_exists[j] ? c : 0) * k + kk);
    }
    // Where the thread's first piece of a stage goes in either slab; its next rows' lie
    // slab_offset(THREAD_ROWS, 0) halves apart (both layouts are linear in whole 8-row groups),
    // its second column's slab_offset(0, MMA_K) apart.
    const int piece = Tile::slab_offset(row, kk);
    constexpr int PIECE_STRIDE = Tile::slab_offset(THREAD_ROWS, 0), COLUMN_STRIDE = Tile::slab_offset(0, MMA_K);
    constexpr int COLUMNS_A_THREAD = STEP_K / MMA_K;
    ColumnCursor cursors[COLUMNS_A_THREAD];
#pragma unroll
    for (int c = 0; c < COLUMNS_A_THREAD; ++c)
        cursors[c] = ColumnCursor(first * STEP_K + c * MMA_K + kk, (int)cin);
    __shared__ int tap_offsets[TAP_TABLE];
    stage_tap_offsets(tap_offsets, in, kernel);
    __syncthreads();
    // Copies step `step`'s slabs into stage `stage` (zeros outside the input and the matrices),
    // commits them as one group, and moves the cursors to the next step.
    auto issue = [&](int step, int stage) {
#pragma unroll
        for (int c = 0; c < COLUMNS_A_THREAD; ++c) {
            const int k0 = step * STEP_K + c * MMA_K;
            const bool in_k = k0 + kk < (int)k;
            const int tap_offset = tap_offsets[cursors[c].tap];
            const Channel channel = channel_of(cursors[c].ci, x, second, (int)cin, (int)first_channels);
            const int dest = piece + c * COLUMN_STRIDE;
#pragma unroll
            for (int j = 0; j < ROWS / THREAD_ROWS; ++j) {
                // Outside the input (or past K) the copy reads nothing: its address is the
                // channel's at voxel 0, valid, where selecting another pointer took two SEL.
                const bool inside = rows[j].inside & cursors[c].bit;
                const int voxel = inside ? rows[j].voxel + tap_offset : 0;
                copy_16_async<true>(xs + stage * A_STAGE + dest + j * PIECE_STRIDE,
                                    (const char*)channel.source + wide_product(voxel, channel.voxel_bytes), !inside);
            }
#pragma unroll
            for (int j = 0; j < COLUMNS / THREAD_ROWS; ++j) {
                const bool inside = in_k && weight_row_exists[j];
                copy_16_async<false>(ws + stage * B_STAGE + dest + j * PIECE_STRIDE,
                                     w + (weight_rows[j] + (inside ? (unsigned)k0 : 0u)), !inside);
            }
            cursors[c].advance(STEP_K, (int)cin);
        }
        __pipeline_commit();
    };
    // wgmma's view of the slabs (WGMMA): their descriptors, made once.
    const SharedOperand a_slabs = core_matrices<STEP_K>(xs), b_slabs = core_matrices<STEP_K>(ws);
    // The ring's stages in turn: step t reads stage `reading` while step t + STAGES − 1 fills
    // stage `filling`, the one step t − 1 read.
    int reading = 0, filling = STAGES - 1;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (first + s < last) issue(first + s, s);
        else __pipeline_commit();  // an empty group keeps the count of groups per step
    }
    for (int t = first; t < last; ++t) {
        // Step t's group is complete once at most the STAGES − 2 after it are pending; the
        // barrier shows every thread's copies (to wgmma too, each thread's fenced towards it)
        // and retires the stage step t − 1 read (its wgmma waited for).
        __pipeline_wait_prior(STAGES - 2);
        if constexpr (WGMMA) fence_proxy_async();
        __syncthreads();
        if (t + STAGES - 1 < last) issue(t + STAGES - 1, filling);
        else __pipeline_commit();
        if constexpr (WGMMA)
            wgmma_slabs<ROWS, COLUMNS, STEP_K>(acc, a_slabs.at(reading * A_STAGE), b_slabs.at(reading * B_STAGE));
        else warp_tile_mma(acc, xs + reading * A_STAGE, ws + reading * B_STAGE, wr, wc);
        reading = reading == STAGES - 1 ? 0 : reading + 1;
        filling = filling == STAGES - 1 ? 0 : filling + 1;
    }
    __syncthreads();  // every warp is done with the slabs, whose bytes become `staged`
    if constexpr (WGMMA) store_warp_tile<ROWS / 64, COLUMNS / 8, 64>(&staged[0][0], Tile::STAGED_LD, acc, 16 * warp, 0);
    else store_warp_tile(&staged[0][0], Tile::STAGED_LD, acc, wr, wc);
    __syncthreads();
    if (gridDim.z == 1) {
        store_block<ROWS, COLUMNS, MMA_THREADS>(&staged[0][0], Tile::STAGED_LD, bias, y, row0, m, col0, n, stats);
        return;
    }
    for (int l = threadIdx.x; l < ROWS * COLUMNS; l += MMA_THREADS) {
        int r = l / COLUMNS, c = l % COLUMNS;
        if (row0 + r < m && col0 + c < n) split_sums[(blockIdx.z * m + row0 + r) * n + col0 + c] = staged[r][c];
    }
}

// The split-K convolution's epilogue, on the 64 × 64 tiles of its blocks: the splits' sums
// added up into the staging area, then store_block as the unsplit kernel does (bias, f16 store,
// InstanceNorm's partial sums).
extern "C" __global__ void __launch_bounds__(MMA_THREADS) conv3d_split_sum_f16(const float* split_sums, int64_t splits,
                                                                               const __half* bias, __half* y, int64_t m,
                                                                               int64_t n, double* stats) {
    __shared__ float staged[TILE][TILE + STAGED_PAD];
    const int64_t row0 = (int64_t)blockIdx.x * TILE, col0 = (int64_t)blockIdx.y * TILE;
    for (int l = threadIdx.x; l < TILE * TILE; l += MMA_THREADS) {
        int r = l / TILE, c = l % TILE;
        float sum = 0.f;
        if (row0 + r < m && col0 + c < n)
            for (int64_t z = 0; z < splits; ++z) sum += split_sums[(z * m + row0 + r) * n + col0 + c];
        staged[r][c] = sum;
    }
    __syncthreads();
    store_block<TILE, TILE, MMA_THREADS>(&staged[0][0], TILE + STAGED_PAD, bias, y, row0, m, col0, n, stats);
}

// The kernels' entry: `wgmma` (nonzero) takes the wgmma path, which the backend asks for on a GPU
// of compute capability 9.0 (running the sm_90a cubin) unless TIS_CUDA_WGMMA=0, so that one run
// can time both; the other cubins have only the mma.sync path and ignore it. The launch's
// shared memory is the path's (igemm_shared_bytes).
template <int WARPS_M, int FM, int FN>
__device__ __forceinline__ void conv3d_igemm_path(const __half* x, const __half* w, const __half* bias, __half* y,
                                                  int64_t cin, Dims3 in, int64_t cout, Dims3 out, Dims3 kernel,
                                                  Dims3 stride, Dims3 pad, const __half* second,
                                                  int64_t first_channels, double* stats, float* split_sums,
                                                  int wgmma) {
#ifdef TIS_WGMMA
    if (wgmma) {
        conv3d_igemm<WARPS_M, FM, FN, true>(x, w, bias, y, cin, in, cout, out, kernel, stride, pad, second,
                                            first_channels, stats, split_sums);
        return;
    }
#endif
    conv3d_igemm<WARPS_M, FM, FN, false>(x, w, bias, y, cin, in, cout, out, kernel, stride, pad, second,
                                         first_channels, stats, split_sums);
}

#define CONV3D_IGEMM(WARPS_M, FM, FN, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                                   \
        NAME(const __half* x, const __half* w, const __half* b, __half* y, int64_t cin, Dims3 in, int64_t cout, \
             Dims3 out, Dims3 k, Dims3 s, Dims3 p, const __half* second, int64_t first_channels, double* stats,    \
             float* split_sums, int wgmma) {                                                                      \
        conv3d_igemm_path<WARPS_M, FM, FN>(x, w, b, y, cin, in, cout, out, k, s, p, second, first_channels,      \
                                           stats, split_sums, wgmma);                                            \
    }
CONV3D_IGEMM(2, 2, 2, conv3d_igemm_f16_64x64)
CONV3D_IGEMM(4, 2, 2, conv3d_igemm_f16_128x32)
CONV3D_IGEMM(2, 4, 2, conv3d_igemm_f16_128x64)

// conv3d_direct_f16's output channels per block (a thread's accumulators), and taps per chunk
// (a thread's window in registers: a 3 × 3 × 3 kernel's, the largest nnU-Net plans use, is one).
constexpr int DIRECT_CHANNELS = 32;
constexpr int DIRECT_TAPS = 27;

extern "C" __global__ void __launch_bounds__(TILE) conv3d_direct_f16(const __half* x, const __half* w,
                                                                     const __half* bias, __half* y, int64_t cin,
                                                                     Dims3 in, int64_t cout, Dims3 out, Dims3 kernel,
                                                                     Dims3 stride, Dims3 pad, const __half* second,
                                                                     int64_t first_channels, double* stats,
                                                                     float* /* split_sums: never split */,
                                                                     int /* wgmma: none */) {
    __shared__ __align__(16) float weights[DIRECT_TAPS][DIRECT_CHANNELS];  // [tap][channel] of one chunk
    __shared__ Tap chunk_taps[DIRECT_TAPS];                                // the chunk's taps
    __shared__ float staged[TILE][DIRECT_CHANNELS + 1];                    // [voxel][channel], for the epilogue
    const int64_t m = out.count(), taps = kernel.count(), k = cin * taps;
    const int64_t row0 = (int64_t)blockIdx.x * TILE, col0 = (int64_t)blockIdx.y * DIRECT_CHANNELS;
    const Window window = window_of(row0 + threadIdx.x, m, in, out, stride, pad);
    float acc[DIRECT_CHANNELS] = {};
    for (int64_t ci = 0; ci < cin; ++ci) {
        const Channel channel = channel_of((int)ci, x, second, (int)cin, (int)first_channels);
        for (int64_t t0 = 0; t0 < taps; t0 += DIRECT_TAPS) {
            __syncthreads();  // every thread is done with the previous chunk's weights and taps
            for (int l = threadIdx.x; l < DIRECT_TAPS * DIRECT_CHANNELS; l += TILE) {
                int t = l / DIRECT_CHANNELS, c = l % DIRECT_CHANNELS;
                bool inside = t0 + t < taps && col0 + c < cout;
                weights[t][c] = inside ? __half2float(w[(col0 + c) * k + (t0 + t) * cin + ci]) : 0.f;
            }
            if (threadIdx.x < DIRECT_TAPS) {
                int64_t tap = t0 + threadIdx.x;  // past the last tap in the last chunk: never read
                chunk_taps[threadIdx.x] =
                    tap_of((int)(tap / (kernel.y * kernel.x)), (int)(tap / kernel.x % kernel.y), (int)(tap % kernel.x), in);
            }
            __syncthreads();
            const int chunk = taps - t0 < DIRECT_TAPS ? (int)(taps - t0) : DIRECT_TAPS;
            float values[DIRECT_TAPS];  // the voxel's window
#pragma unroll
            for (int t = 0; t < DIRECT_TAPS; ++t) {
                const __half* a;
                values[t] = t < chunk && a_source(window, chunk_taps[t], channel, in, a) ? __half2float(*a) : 0.f;
            }
#pragma unroll
            for (int t = 0; t < DIRECT_TAPS; ++t) {
                if (t >= chunk) break;
#pragma unroll
                for (int c = 0; c < DIRECT_CHANNELS; c += 4) {
                    float4 wt = *reinterpret_cast<const float4*>(&weights[t][c]);
                    acc[c] += values[t] * wt.x;
                    acc[c + 1] += values[t] * wt.y;
                    acc[c + 2] += values[t] * wt.z;
                    acc[c + 3] += values[t] * wt.w;
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < DIRECT_CHANNELS; ++c) staged[threadIdx.x][c] = acc[c];
    __syncthreads();
    store_block<TILE, DIRECT_CHANNELS, TILE>(&staged[0][0], DIRECT_CHANNELS + 1, bias, y, row0, m, col0, cout, stats);
}

template <typename T>
__device__ void conv_transpose3d(const T* x, const T* w, const T* bias, T* y, int64_t cin, Dims3 in, int64_t cout,
                                 Dims3 stride) {
    Dims3 out{in.z * stride.z, in.y * stride.y, in.x * stride.x};
    int64_t taps = stride.count();
    GRID_LOOP(i, cout * out.count()) {
        int64_t ox = i % out.x, oy = (i / out.x) % out.y, oz = (i / (out.x * out.y)) % out.z;
        int64_t co = i / out.count();
        int64_t v = ((oz / stride.z) * in.y + oy / stride.y) * in.x + ox / stride.x;
        int64_t tap = ((oz % stride.z) * stride.y + oy % stride.y) * stride.x + ox % stride.x;
        float acc = bias ? to_f32(bias[co]) : 0.f;
        for (int64_t ci = 0; ci < cin; ++ci)
            acc += to_f32(x[ci * in.count() + v]) * to_f32(w[(ci * cout + co) * taps + tap]);
        y[i] = from_f32<T>(acc);
    }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS) conv_transpose3d_mma_f16(const __half* x, const __half* w,
                                                                                   const __half* bias, __half* y,
                                                                                   int64_t cin, Dims3 in,
                                                                                   int64_t cout, Dims3 stride) {
    constexpr int W_LD = TILE + MMA_PAD;  // 144-byte rows: ldmatrix.trans's 8 rows in different banks
    __shared__ __align__(16) __half xs[TILE][SLAB_LD];
    __shared__ __align__(16) __half ws[MMA_K][W_LD];  // [k][n]
    __shared__ __align__(16) float staged[TILE][TILE + STAGED_PAD];
    const int64_t taps = stride.count(), m = in.count(), n = cout * taps, k = cin;
    int64_t row0 = (int64_t)blockIdx.x * TILE, col0 = (int64_t)blockIdx.y * TILE;
    int warp = threadIdx.x / 32, wr = (warp / 2) * 32, wc = (warp % 2) * 32;
    float acc[2][4][4] = {};  // the warp's 32 × 32: 2 × 4 C tiles
    for (int64_t k0 = 0; k0 < k; k0 += MMA_K) {
        load_slab<TILE>(&xs[0][0], x, row0, m, k, k0);
        stage_weights_async(&ws[0][0], W_LD, w, k, n, k0, col0, MMA_K, TILE);
        __pipeline_commit();
        __pipeline_wait_prior(0);
        __syncthreads();
        warp_tile_mma<2, 4, true>(acc, &xs[0][0], &ws[0][0], wr, wc, W_LD);
        __syncthreads();
    }
    // Where P[i, n] goes splits into a part of the row and a part of the column: y's index of
    // output voxel (i·s + tap), channel co, is ((iz·sz·Y + iy·sy)·X + ix·sx)·cout (the row's)
    // + ((tz·Y + ty)·X + tx)·cout + co (the column's), computed once per row and column of the
    // block here instead of per value (64-bit divisions, a few hundred instructions each value).
    __shared__ int64_t row_base[TILE], column_offset[TILE];
    __shared__ float column_bias[TILE];
    const Dims3 out{in.z * stride.z, in.y * stride.y, in.x * stride.x};
    for (int l = threadIdx.x; l < TILE; l += MMA_THREADS) {
        int64_t v = row0 + l, col = col0 + l;
        row_base[l] = v < m ? ((v / (in.y * in.x) * stride.z * out.y + v / in.x % in.y * stride.y) * out.x +
                               v % in.x * stride.x) * cout
                            : -1;
        int64_t tap = col / cout, co = col % cout;
        column_offset[l] = col < n ? ((tap / (stride.y * stride.x) * out.y + tap / stride.x % stride.y) * out.x +
                                      tap % stride.x) * cout + co
                                   : -1;
        column_bias[l] = col < n && bias ? __half2float(bias[co]) : 0.f;
    }
    store_warp_tile(&staged[0][0], TILE + STAGED_PAD, acc, wr, wc);
    __syncthreads();
    // 8 columns a thread. Where cout comes in eights, they are 8 channels of one tap (taps start
    // at multiples of cout), all inside N or all past it, and 16-byte aligned in y.
    const bool by8 = cout % 8 == 0 && (uintptr_t)y % 16 == 0;
    for (int l = threadIdx.x; l < TILE * TILE / 8; l += MMA_THREADS) {
        const int r = l / (TILE / 8), c = l % (TILE / 8) * 8;
        if (row_base[r] < 0) continue;
        if (by8) {
            if (column_offset[c] < 0) continue;
            __align__(16) __half values[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) values[i] = __float2half_rn(staged[r][c + i] + column_bias[c + i]);
            *(uint4*)&y[row_base[r] + column_offset[c]] = *(const uint4*)values;
        } else {
            for (int i = 0; i < 8; ++i)
                if (column_offset[c + i] >= 0)
                    y[row_base[r] + column_offset[c + i]] = __float2half_rn(staged[r][c + i] + column_bias[c + i]);
        }
    }
}

#define CONV_KERNELS(T, S)                                                                                       \
    extern "C" __global__ void conv3d_##S(const T* x, const T* w, const T* b, T* y, int64_t cin, Dims3 in,      \
                                          int64_t cout, Dims3 out, Dims3 k, Dims3 s, Dims3 p) {                  \
        conv3d<T>(x, w, b, y, cin, in, cout, out, k, s, p);                                                      \
    }                                                                                                            \
    extern "C" __global__ void conv_transpose3d_##S(const T* x, const T* w, const T* b, T* y, int64_t cin,      \
                                                    Dims3 in, int64_t cout, Dims3 s) {                           \
        conv_transpose3d<T>(x, w, b, y, cin, in, cout, s);                                                       \
    }

CONV_KERNELS(float, f32)
