// The TIS head's input tokens in one pass (f16, the fused kernels' widths D):
//
//   X[n] = features[:, the voxel of token n in the ROI]·W_inᵀ + b_in + PE(n),
//
// PE the trilinear resize (align_corners) of the positional grid to the ROI, as
// `region_tokens`, `linear_mma_f16` and `add_positional_encoding` (kernels/volume.cu,
// kernels/linear.cu) compute it in three launches. Those write the N × C_f tokens and read them
// back, then write X and read and write it again for the encoding: at TIS-B's ROI (1.6 M
// tokens, C_f 32, D 128) about 1.4 GB a click where this kernel reads the features once and
// writes X once (0.5 GB).
//
// A block of fused_rows() tokens (consecutive in the ROI's C order, so that they run along x
// and the gather's reads coalesce), a warp per 16 of them, as the head's other fused kernels:
// the block gathers its tokens' C_f features from the channels-first volume into shared rows
// (each token's voxel index worked out once), zero past C_f up to a multiple of 16, while W_in
// (D × C_f, small) is copied in with cp.async; each warp multiplies its 16 rows on tensor cores
// (mma.sync, C tiles in registers with the bias in them from the start), adds the encoding to
// its C tiles in registers (each lane works out its two rows' eight grid corners and weights
// once, and reads the grid channels-last, two channels a load), and writes its rows of X.
// Shared memory: (rows + D) × (C_f rounded up to 16, + 8) halves, 20 KB at TIS-B; registers are
// held to 128 a thread (__launch_bounds__), so that at least two blocks share a multiprocessor.
#include "mma.cuh"

template <int D>
__device__ void input_tokens(const __half* features, const __half* w, const __half* bias, const __half* grid,
                             __half* x, int channels, int k_padded, Dims3 dims, Dims3 start, Dims3 box,
                             Dims3 grid_dims) {
    const int rows = fused_rows(), ld = k_padded + MMA_PAD;
    __half* gathered = shared_halves(0);            // rows × ld
    __half* weights = shared_halves(rows * ld * 2);  // D × ld
    __shared__ int64_t voxel[FUSED_MAX_THREADS / 2];  // each row's voxel in the volume, −1 past the ROI
    const int64_t n = box.count(), row0 = (int64_t)blockIdx.x * rows, volume = dims.count();

    stage_weights_async(weights, ld, w, D, channels, 0, 0, D, k_padded);  // zero past C_f
    __pipeline_commit();
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const int64_t token = row0 + r, z = token / (box.y * box.x), y = token / box.x % box.y, xx = token % box.x;
        voxel[r] = token < n ? ((start.z + z) * dims.y + start.y + y) * dims.x + start.x + xx : -1;
    }
    __syncthreads();
    for (int l = threadIdx.x; l < rows * k_padded; l += blockDim.x) {
        const int c = l / rows, r = l % rows;
        gathered[r * ld + c] = voxel[r] >= 0 && c < channels ? features[c * volume + voxel[r]] : __float2half(0.f);
    }
    __pipeline_wait_prior(0);
    __syncthreads();

    const int r0 = 16 * (threadIdx.x / 32), lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float acc[D / 8][4];
    fill_tiles_with_bias<D>(acc, bias);
    for (int k0 = 0; k0 < k_padded; k0 += 16) {
        uint32_t a[4];
        load_a_fragment(a, gathered + r0 * ld, ld, k0);
        mma_rows_k16<D>(acc, a, weights, ld, k0);
    }
    // The encoding of the lane's rows g and g + 8 (C tile elements 0, 1 and 2, 3): the grid's
    // eight corners around the token and their weights, then two channels a load.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int64_t token = row0 + r0 + g + 8 * half;
        if (token >= n) continue;  // never stored
        const ResizeTap tz = align_corners_tap(grid_dims.z, box.z, token / (box.x * box.y));
        const ResizeTap ty = align_corners_tap(grid_dims.y, box.y, token / box.x % box.y);
        const ResizeTap tx = align_corners_tap(grid_dims.x, box.x, token % box.x);
        int64_t corner[8];
        float weight[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const bool cz = i & 4, cy = i & 2, cx = i & 1;
            corner[i] = (((cz ? tz.i1 : tz.i0) * grid_dims.y + (cy ? ty.i1 : ty.i0)) * grid_dims.x +
                         (cx ? tx.i1 : tx.i0)) * D;
            weight[i] = (cz ? tz.lambda : 1.f - tz.lambda) * (cy ? ty.lambda : 1.f - ty.lambda) *
                        (cx ? tx.lambda : 1.f - tx.lambda);
        }
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            float2 encoding = {0.f, 0.f};
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float2 value = __half22float2(*(const __half2*)&grid[corner[i] + 8 * j + 2 * t]);
                encoding.x += weight[i] * value.x;
                encoding.y += weight[i] * value.y;
            }
            acc[j][2 * half] += encoding.x;
            acc[j][2 * half + 1] += encoding.y;
        }
    }
    write_tiles_to_rows<D, false>(x, acc, n, row0 + r0);
}

#define INPUT_TOKENS(D)                                                                                              \
    extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS, 2) input_tokens_f16_##D(                         \
        const __half* features, const __half* w, const __half* bias, const __half* grid, __half* x, int channels,    \
        int k_padded, Dims3 dims, Dims3 start, Dims3 box, Dims3 grid_dims) {                                         \
        input_tokens<D>(features, w, bias, grid, x, channels, k_padded, dims, start, box, grid_dims);                \
    }
FOR_EACH_FUSED_WIDTH(INPUT_TOKENS)
