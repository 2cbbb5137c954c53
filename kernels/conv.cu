// The nnU-Net network's convolutions.
//
// conv3d: y[co, o] = b[co] + Σ_ci Σ_t x[ci, o·stride + t − pad] · w[co, ci, t], zero outside the
// input, for every shape nnU-Net plans use (kernels 3³, 1×3×3, 1³; strides 1, 2, 1×2×2; pad k/2).
// Activations are channels-first (C × Z × Y × X, x fastest), weights PyTorch's [cout, cin, taps].
// Two kernels:
// - `conv3d_*` (direct): any storage; one thread per output value. Threads of a warp share `co`
//   and neighbouring x positions, so weight loads are warp-uniform broadcasts and input loads
//   coalesce along x. The f32 mode's path and the correctness baseline.
// - `conv3d_igemm_f16`: the same sum as an implicit GEMM on tensor cores, y[co, m] = b[co] +
//   Σ_k A[m, k]·B[k, co] with M = output voxels, N = cout, K = cin·taps (k = ci·taps + tap):
//   A[m, k] is the input value under tap `tap` of channel `ci` in voxel m's window, gathered
//   straight from x while staging (im2col without the copy), and B[k, co] = w[co][k], read
//   column-major from W's rows as linear_mma_f16 reads Wᵀ. Tiled like linear_mma_f16: a 64 × 64
//   output block (voxels × channels) per 4 warps, each warp 32 × 32 (2 × 2 WMMA 16×16×16 f16
//   fragments, f32 accumulators), K in steps of 32, shared rows padded by 8 halves. Voxels are
//   the contiguous axis of channels-first data, so the A slab is staged k-major (xs[k][m], read
//   as a col_major fragment): consecutive threads gather consecutive voxels. Each thread's voxel
//   is decoded once, and each step's 32 columns once per block into a shared table (channel
//   offset, tap), so the gather does no division. Padding and the ragged ends of M, N and K
//   (the first layer has K = 27 or 9) are zero-fill loads. The epilogue stages the accumulators
//   in shared memory channel-major and writes y[co, m] + b[co] with consecutive threads on
//   consecutive voxels. Voxel blocks are on blockIdx.x (a volume can have more than 65535).
//   The input may be two volumes read as their channel concatenation (`second`,
//   `first_channels`), which spares the decoder's convolutions the concatenated copy.
//   Given `stats`, the epilogue also leaves InstanceNorm's partial sums of the block's 64
//   voxels per channel (Σy, Σy² of the stored f16 values, as instance_norm_partials would
//   compute them; f32 over 64 values, f64 in memory) at stats[(co·gridDim.x + blockIdx.x)·2],
//   the [channel][split] layout instance_norm_finalize reduces: the conv block's normalisation
//   then reads its input once (apply) instead of twice (partials, apply). Two threads per
//   channel add up 32 staged values each, conflict-free, and meet in shared memory.
//
// conv_transpose3d with kernel = stride (no overlap): y[co, i·s + a] = b[co] +
// Σ_ci x[ci, i] · w[ci, co, a]. Two kernels:
// - `conv_transpose3d_*`: any storage, one thread per output value.
// - `conv_transpose3d_mma_f16`: one GEMM on tensor cores, P[i, n] = Σ_ci x[ci, i]·w[ci, n] with
//   M = input voxels, N = cout·taps (n = co·taps + a), K = cin, tiled exactly as
//   conv3d_igemm_f16 (A is x itself, staged k-major; W, stored [cin][cout·taps], staged
//   transposed so that B is read column-major the same way); the epilogue scatters P[i, n] +
//   b[co] to y[co, i·s + a].
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

// The warp's 32 × 32 quarter of the accumulators into staged[c][r], channel-major, so that the
// epilogues' channels-first stores read consecutive voxels from consecutive banks.
__device__ __forceinline__ void stage_quarter(float (&staged)[TILE][TILE + 4], Accumulator (&acc)[2][2], int wr,
                                              int wc) {
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            nvcuda::wmma::store_matrix_sync(&staged[wc + 16 * j][wr + 16 * i], acc[i][j], TILE + 4,
                                            nvcuda::wmma::mem_col_major);
}

// Column k = ci·taps + tap of the implicit A: which input holds channel ci (the decoder's
// convolutions read the channel concatenation [first; second] in place: channels below
// `first_channels` are the first input's), the tap's offsets in the window, and where its value
// sits in that input relative to the window's origin.
struct Column {
    int64_t offset;   // (ci or ci − first_channels)·in.count() + (tz·in.y + ty)·in.x + tx
    int64_t z, y, x;  // tz, ty, tx
    bool second;      // ci ≥ first_channels
};

// Decodes the K step starting at column k0 (none past the last step) into `columns`.
__device__ __forceinline__ void decode_columns(Column* columns, int64_t k0, int64_t k, Dims3 in, Dims3 kernel,
                                               int64_t first_channels) {
    if (threadIdx.x >= MMA_K || k0 >= k) return;
    int64_t col = k0 + threadIdx.x, taps = kernel.count(), tap = col % taps, ci = col / taps;
    Column c;
    c.z = tap / (kernel.y * kernel.x);
    c.y = tap / kernel.x % kernel.y;
    c.x = tap % kernel.x;
    c.second = ci >= first_channels;
    c.offset = (c.second ? ci - first_channels : ci) * in.count() + (c.z * in.y + c.y) * in.x + c.x;
    columns[threadIdx.x] = c;
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS) conv3d_igemm_f16(const __half* x, const __half* w,
                                                                           const __half* bias, __half* y,
                                                                           int64_t cin, Dims3 in, int64_t cout,
                                                                           Dims3 out, Dims3 kernel, Dims3 stride,
                                                                           Dims3 pad, const __half* second,
                                                                           int64_t first_channels, double* stats) {
    using namespace nvcuda;
    __shared__ __align__(32) __half xs[MMA_K][TILE + MMA_PAD];
    __shared__ __align__(32) __half ws[TILE][MMA_K + MMA_PAD];
    __shared__ __align__(32) float staged[TILE][TILE + 4];
    __shared__ Column columns[MMA_K];
    const int64_t m = out.count(), n = cout, k = cin * kernel.count();
    int64_t row0 = (int64_t)blockIdx.x * TILE, col0 = (int64_t)blockIdx.y * TILE;
    int warp = threadIdx.x / 32, wr = (warp / 2) * 32, wc = (warp % 2) * 32;

    // The voxel whose row of A this thread gathers (the same at every step, MMA_THREADS being a
    // multiple of TILE), and its window's origin in x.
    int row = threadIdx.x % TILE;
    int64_t v = row0 + row;
    bool in_m = v < m;
    int64_t z0 = v / (out.y * out.x) * stride.z - pad.z;
    int64_t y0 = v / out.x % out.y * stride.y - pad.y;
    int64_t x0 = v % out.x * stride.x - pad.x;
    int64_t origin = (z0 * in.y + y0) * in.x + x0;

    Accumulator acc[2][2];
    zero_quarter(acc);
    const __half zero = __float2half(0.f);
    decode_columns(columns, 0, k, in, kernel, first_channels);
    __syncthreads();
    for (int64_t k0 = 0; k0 < k; k0 += MMA_K) {
        for (int kk = threadIdx.x / TILE; kk < MMA_K; kk += MMA_THREADS / TILE) {
            const Column& c = columns[kk];
            int64_t iz = z0 + c.z, iy = y0 + c.y, ix = x0 + c.x;
            bool inside = in_m && k0 + kk < k && iz >= 0 && iz < in.z && iy >= 0 && iy < in.y && ix >= 0 &&
                          ix < in.x;
            xs[kk][row] = inside ? (c.second ? second : x)[origin + c.offset] : zero;
        }
        for (int l = threadIdx.x; l < TILE * MMA_K; l += MMA_THREADS) {
            int c = l / MMA_K, kk = l % MMA_K;
            ws[c][kk] = (k0 + kk < k && col0 + c < n) ? w[(col0 + c) * k + k0 + kk] : zero;
        }
        __syncthreads();
        // This step's table has been read (barrier above); the next step's is published by the
        // barrier below.
        decode_columns(columns, k0 + MMA_K, k, in, kernel, first_channels);
        warp_quarter_mma<wmma::col_major>(acc, &xs[0][wr], 1, TILE + MMA_PAD, TILE + MMA_PAD, &ws[wc][0],
                                          MMA_K + MMA_PAD);
        __syncthreads();
    }
    stage_quarter(staged, acc, wr, wc);
    __syncthreads();
    for (int l = threadIdx.x; l < TILE * TILE; l += MMA_THREADS) {
        int c = l / TILE, r = l % TILE;
        if (row0 + r < m && col0 + c < n)
            y[(col0 + c) * m + row0 + r] = from_f32<__half>(staged[c][r] + (bias ? __half2float(bias[col0 + c]) : 0.f));
    }
    if (!stats) return;
    // InstanceNorm's partial sums of the stored values: thread t adds up half of the block's
    // voxels (t / TILE) of channel t % TILE, from a row rotated by the channel, so that the
    // warp's 32 lanes read 32 different banks ((68c + (i + c) mod 32) mod 32 = (5c + i) mod 32).
    static_assert(MMA_THREADS == 2 * TILE, "two threads per channel");
    __shared__ float halves[2][TILE][2];  // [voxels 0–31, 32–63][channel][Σy, Σy²]
    int c = threadIdx.x % TILE, half = threadIdx.x / TILE;
    float b = bias && col0 + c < n ? __half2float(bias[col0 + c]) : 0.f, sum = 0.f, squares = 0.f;
#pragma unroll 4  // fully unrolled, ptxas spills on sm_80
    for (int i = 0; i < TILE / 2; ++i) {
        int r = half * (TILE / 2) + (i + c) % (TILE / 2);
        if (row0 + r < m) {
            float stored = __half2float(from_f32<__half>(staged[c][r] + b));
            sum += stored;
            squares += stored * stored;
        }
    }
    halves[half][c][0] = sum;
    halves[half][c][1] = squares;
    __syncthreads();
    if (half == 0 && col0 + c < n) {
        double* partial = stats + ((col0 + c) * gridDim.x + blockIdx.x) * 2;
        partial[0] = (double)halves[0][c][0] + halves[1][c][0];
        partial[1] = (double)halves[0][c][1] + halves[1][c][1];
    }
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
    using namespace nvcuda;
    __shared__ __align__(32) __half xs[MMA_K][TILE + MMA_PAD];
    __shared__ __align__(32) __half ws[TILE][MMA_K + MMA_PAD];
    __shared__ __align__(32) float staged[TILE][TILE + 4];
    const int64_t taps = stride.count(), m = in.count(), n = cout * taps, k = cin;
    int64_t row0 = (int64_t)blockIdx.x * TILE, col0 = (int64_t)blockIdx.y * TILE;
    int warp = threadIdx.x / 32, wr = (warp / 2) * 32, wc = (warp % 2) * 32;
    Accumulator acc[2][2];
    zero_quarter(acc);
    const __half zero = __float2half(0.f);
    for (int64_t k0 = 0; k0 < k; k0 += MMA_K) {
        // Both slabs with consecutive threads on consecutive addresses: voxels of x, columns of w.
        for (int l = threadIdx.x; l < MMA_K * TILE; l += MMA_THREADS) {
            int kk = l / TILE, i = l % TILE;
            bool in_k = k0 + kk < k;
            xs[kk][i] = in_k && row0 + i < m ? x[(k0 + kk) * m + row0 + i] : zero;
            ws[i][kk] = in_k && col0 + i < n ? w[(k0 + kk) * n + col0 + i] : zero;
        }
        __syncthreads();
        warp_quarter_mma<wmma::col_major>(acc, &xs[0][wr], 1, TILE + MMA_PAD, TILE + MMA_PAD, &ws[wc][0],
                                          MMA_K + MMA_PAD);
        __syncthreads();
    }
    stage_quarter(staged, acc, wr, wc);
    __syncthreads();
    Dims3 out{in.z * stride.z, in.y * stride.y, in.x * stride.x};
    for (int l = threadIdx.x; l < TILE * TILE; l += MMA_THREADS) {
        int c = l / TILE, r = l % TILE;
        int64_t v = row0 + r, col = col0 + c;
        if (v >= m || col >= n) continue;
        int64_t co = col / taps, tap = col % taps;
        int64_t oz = v / (in.y * in.x) * stride.z + tap / (stride.y * stride.x);
        int64_t oy = v / in.x % in.y * stride.y + tap / stride.x % stride.y;
        int64_t ox = v % in.x * stride.x + tap % stride.x;
        y[((co * out.z + oz) * out.y + oy) * out.x + ox] =
            from_f32<__half>(staged[c][r] + (bias ? __half2float(bias[co]) : 0.f));
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

FOR_EACH_STORAGE(CONV_KERNELS)
