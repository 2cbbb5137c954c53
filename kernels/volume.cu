// Data movement and per-voxel ops: the sliding window's crops, flips and weighted accumulation,
// softmax and argmax over channels, tokens of a region, the trilinear positional encoding, row
// gathers and argmax over rows, and the f16 convolutions' channel padding.
//
// All are memory-bound one-pass kernels, one thread per output element in a grid-stride loop,
// the innermost (x) index fastest so that neighbouring threads touch neighbouring addresses of
// the larger side, except four: `pad_inner_axis_f16`, a thread a row; `swap_inner_axes` and
// `region_tokens`, tiled transposes through shared memory (both sides coalesce); and
// `add_positional_encoding`, a warp per token, its lanes on the token's channels (the write
// side's consecutive addresses), so that the token's place in the region (64-bit divisions, a
// few hundred instructions) is worked out once per token and not once per value.
// Volumes are channels first (C × Z × Y × X); token matrices row-major (N × width). The f16
// network's channels-last volumes (kernels/conv.cu) come here through `swap_inner_axes`.
#include "common.cuh"

// y[c, p] = x[c, start + p] for p in a box of `box` voxels.
template <typename T>
__device__ void crop(const T* x, T* y, int64_t channels, Dims3 dims, Dims3 start, Dims3 box) {
    GRID_LOOP(i, channels * box.count()) {
        int64_t px = i % box.x, py = (i / box.x) % box.y, pz = (i / (box.x * box.y)) % box.z;
        int64_t c = i / box.count();
        y[i] = x[((c * dims.z + start.z + pz) * dims.y + start.y + py) * dims.x + start.x + px];
    }
}

// y = x with the flagged spatial axes reversed.
template <typename T>
__device__ void flip(const T* x, T* y, int64_t channels, Dims3 dims, int flip_z, int flip_y, int flip_x) {
    GRID_LOOP(i, channels * dims.count()) {
        int64_t px = i % dims.x, py = (i / dims.x) % dims.y, pz = (i / (dims.x * dims.y)) % dims.z;
        int64_t c = i / dims.count();
        if (flip_z) pz = dims.z - 1 - pz;
        if (flip_y) py = dims.y - 1 - py;
        if (flip_x) px = dims.x - 1 - px;
        y[i] = x[((c * dims.z + pz) * dims.y + py) * dims.x + px];
    }
}

template <typename T>
__device__ void add_assign(T* acc, const T* x, int64_t n) {
    GRID_LOOP(i, n) acc[i] = from_f32<T>(to_f32(acc[i]) + to_f32(x[i]));
}

template <typename T>
__device__ void scale(T* x, int64_t n, float factor) {
    GRID_LOOP(i, n) x[i] = from_f32<T>(to_f32(x[i]) * factor);
}

// acc[c, start + p] += tile[c, p] · weights[p] over the tile's box (tiles of one launch never
// overlap, so no atomics). The sums are f32 whatever the storage type: the Gaussian's corner
// weights are f16 subnormals, and products with them would lose most of their bits in f16.
template <typename T>
__device__ void accumulate_weighted(float* acc, const T* tile, const T* weights, int64_t channels, Dims3 dims,
                                    Dims3 start, Dims3 box) {
    GRID_LOOP(i, channels * box.count()) {
        int64_t p = i % box.count(), c = i / box.count();
        int64_t px = p % box.x, py = (p / box.x) % box.y, pz = p / (box.x * box.y);
        acc[((c * dims.z + start.z + pz) * dims.y + start.y + py) * dims.x + start.x + px] +=
            to_f32(tile[i]) * to_f32(weights[p]);
    }
}

// y[c, v] = acc[c, v] / weight_sum[v], from the f32 sums to storage.
template <typename T>
__device__ void divide_by_weights(const float* acc, const float* weight_sum, T* y, int64_t channels, int64_t voxels) {
    GRID_LOOP(i, channels * voxels) y[i] = from_f32<T>(acc[i] / weight_sum[i % voxels]);
}

template <typename T>
__device__ void softmax_channels(const T* x, T* y, int64_t channels, int64_t voxels) {
    GRID_LOOP(v, voxels) {
        float max = -INFINITY, sum = 0.f;
        for (int64_t c = 0; c < channels; ++c) max = fmaxf(max, to_f32(x[c * voxels + v]));
        for (int64_t c = 0; c < channels; ++c) sum += __expf(to_f32(x[c * voxels + v]) - max);
        for (int64_t c = 0; c < channels; ++c) y[c * voxels + v] = from_f32<T>(__expf(to_f32(x[c * voxels + v]) - max) / sum);
    }
}

// Index of the largest channel per voxel; ties to the lower index.
template <typename T>
__device__ void argmax_channels(const T* x, uint16_t* labels, int64_t channels, int64_t voxels) {
    GRID_LOOP(v, voxels) {
        float best = to_f32(x[v]);
        uint16_t label = 0;
        for (int64_t c = 1; c < channels; ++c) {
            float value = to_f32(x[c * voxels + v]);
            if (value > best) { best = value; label = (uint16_t)c; }
        }
        labels[v] = label;
    }
}

// Index of the largest column per row; ties to the lower index. Arguments in the order of
// argmax_channels: (x, labels, classes, items).
template <typename T>
__device__ void argmax_rows(const T* x, uint16_t* labels, int64_t cols, int64_t rows) {
    GRID_LOOP(r, rows) {
        float best = to_f32(x[r * cols]);
        uint16_t label = 0;
        for (int64_t c = 1; c < cols; ++c) {
            float value = to_f32(x[r * cols + c]);
            if (value > best) { best = value; label = (uint16_t)c; }
        }
        labels[r] = label;
    }
}

// tokens[n, c] = volume[c, start + position of token n in the box]; a warp per token.
template <typename T>
__device__ void gather_rows(const T* x, const int64_t* rows, T* y, int64_t n_rows, int64_t width) {
    GRID_LOOP(i, n_rows * width) y[i] = x[rows[i / width] * width + i % width];
}

// x[n, c] += trilinear(grid[c], position of token n in `shape`); a warp per token, its lanes on
// the channels. The grid comes channels-last (gz × gy × gx × width), so that the lanes' values
// of a corner are consecutive: one or two cache lines a load, where the channels-first grid put
// every lane's value in a line of its own (32 lines a load, 8 loads a value).
template <typename T>
__device__ void add_positional_encoding(T* x, const T* grid, int64_t width, Dims3 grid_dims, Dims3 shape) {
    const int lane = threadIdx.x % 32;
    WARP_LOOP(n, shape.count()) {
        ResizeTap tz = align_corners_tap(grid_dims.z, shape.z, n / (shape.x * shape.y));
        ResizeTap ty = align_corners_tap(grid_dims.y, shape.y, (n / shape.x) % shape.y);
        ResizeTap tx = align_corners_tap(grid_dims.x, shape.x, n % shape.x);
        for (int64_t c = lane; c < width; c += 32) {
            auto at = [&](int64_t z, int64_t y, int64_t xx) {
                return to_f32(grid[((z * grid_dims.y + y) * grid_dims.x + xx) * width + c]);
            };
            auto lerp_x = [&](int64_t z, int64_t y) { return (1.f - tx.lambda) * at(z, y, tx.i0) + tx.lambda * at(z, y, tx.i1); };
            auto lerp_y = [&](int64_t z) { return (1.f - ty.lambda) * lerp_x(z, ty.i0) + ty.lambda * lerp_x(z, ty.i1); };
            T* out = x + n * width + c;
            *out = from_f32<T>(to_f32(*out) + (1.f - tz.lambda) * lerp_y(tz.i0) + tz.lambda * lerp_y(tz.i1));
        }
    }
}

// y[a][t][b] = x[a][b][t] for a < outer, b < middle, t < inner: with a = 1, a volume from
// channels-first to channels-last (b = channels, t = voxels) or back (b = voxels, t =
// channels); a convolution's weights [cout][cin][taps] packed as [cout][tap][cin], a transposed
// convolution's [cin][cout][taps] as [cin][tap][cout] (kernels/conv.cu reads both). The one
// kernel here that is not one thread per output: a block moves a 32 × 32 tile (b × t) through
// shared memory, reading rows along t and writing rows along b, so that both sides coalesce
// (a thread per output would read at a stride of `inner` values). Grid: x = tiles (b-major),
// y = a; blocks of 32 × 8 threads, four tile rows each.
constexpr int TRANSPOSE_TILE = 32;

template <typename T>
__device__ void swap_inner_axes(const T* x, T* y, int64_t middle, int64_t inner) {
    __shared__ T tile[TRANSPOSE_TILE][TRANSPOSE_TILE + 1];
    int64_t tiles_t = (inner + TRANSPOSE_TILE - 1) / TRANSPOSE_TILE;
    int64_t b0 = blockIdx.x / tiles_t * TRANSPOSE_TILE, t0 = blockIdx.x % tiles_t * TRANSPOSE_TILE;
    const T* from = x + (int64_t)blockIdx.y * middle * inner;
    T* to = y + (int64_t)blockIdx.y * middle * inner;
    for (int j = threadIdx.y; j < TRANSPOSE_TILE; j += blockDim.y) {
        int64_t b = b0 + j, t = t0 + threadIdx.x;
        if (b < middle && t < inner) tile[j][threadIdx.x] = from[b * inner + t];
    }
    __syncthreads();
    for (int j = threadIdx.y; j < TRANSPOSE_TILE; j += blockDim.y) {
        int64_t t = t0 + j, b = b0 + threadIdx.x;
        if (b < middle && t < inner) to[t * middle + b] = tile[threadIdx.x][j];
    }
}

// tokens[n][c] = volume[c][start + the place of token n in the box]: the channels-first volume
// transposed into token rows, a tile of 32 tokens (consecutive along x in one row of the box) ×
// 32 channels per block of 32 × 8 threads through shared memory, so that the reads run along x
// (one line per channel) and the writes along the channels. Grid: x = the box's rows × tiles
// along x, y = tiles of channels. The tile's row and place are worked out once per thread.
template <typename T>
__device__ void region_tokens(const T* volume, T* tokens, int64_t channels, Dims3 dims, Dims3 start, Dims3 box) {
    __shared__ T tile[TRANSPOSE_TILE][TRANSPOSE_TILE + 1];
    const int64_t tiles_x = (box.x + TRANSPOSE_TILE - 1) / TRANSPOSE_TILE, row = blockIdx.x / tiles_x;
    const int64_t x0 = blockIdx.x % tiles_x * TRANSPOSE_TILE, c0 = (int64_t)blockIdx.y * TRANSPOSE_TILE;
    const T* source = volume + ((start.z + row / box.y) * dims.y + start.y + row % box.y) * dims.x + start.x + x0;
    for (int j = threadIdx.y; j < TRANSPOSE_TILE; j += blockDim.y)
        if (c0 + j < channels && x0 + threadIdx.x < box.x) tile[j][threadIdx.x] = source[(c0 + j) * dims.count() + threadIdx.x];
    __syncthreads();
    T* out = tokens + (row * box.x + x0) * channels + c0;
    for (int j = threadIdx.y; j < TRANSPOSE_TILE; j += blockDim.y)
        if (c0 + threadIdx.x < channels && x0 + j < box.x) out[j * channels + threadIdx.x] = tile[threadIdx.x][j];
}

#define VOLUME_KERNELS(T, S)                                                                                         \
    extern "C" __global__ void swap_inner_axes_##S(const T* x, T* y, int64_t m, int64_t i) {                        \
        swap_inner_axes<T>(x, y, m, i);                                                                              \
    }                                                                                                                \
    extern "C" __global__ void crop_##S(const T* x, T* y, int64_t c, Dims3 d, Dims3 s, Dims3 b) {                   \
        crop<T>(x, y, c, d, s, b);                                                                                   \
    }                                                                                                                \
    extern "C" __global__ void flip_##S(const T* x, T* y, int64_t c, Dims3 d, int fz, int fy, int fx) {             \
        flip<T>(x, y, c, d, fz, fy, fx);                                                                             \
    }                                                                                                                \
    extern "C" __global__ void add_assign_##S(T* acc, const T* x, int64_t n) { add_assign<T>(acc, x, n); }          \
    extern "C" __global__ void scale_##S(T* x, int64_t n, float f) { scale<T>(x, n, f); }                           \
    extern "C" __global__ void accumulate_weighted_##S(float* acc, const T* tile, const T* w, int64_t c, Dims3 d,   \
                                                       Dims3 s, Dims3 b) {                                           \
        accumulate_weighted<T>(acc, tile, w, c, d, s, b);                                                            \
    }                                                                                                                \
    extern "C" __global__ void divide_by_weights_##S(const float* acc, const float* w, T* y, int64_t c, int64_t v) { \
        divide_by_weights<T>(acc, w, y, c, v);                                                                       \
    }                                                                                                                \
    extern "C" __global__ void softmax_channels_##S(const T* x, T* y, int64_t c, int64_t v) {                       \
        softmax_channels<T>(x, y, c, v);                                                                             \
    }                                                                                                                \
    extern "C" __global__ void argmax_channels_##S(const T* x, uint16_t* l, int64_t c, int64_t v) {                 \
        argmax_channels<T>(x, l, c, v);                                                                              \
    }                                                                                                                \
    extern "C" __global__ void argmax_rows_##S(const T* x, uint16_t* l, int64_t c, int64_t r) {                     \
        argmax_rows<T>(x, l, c, r);                                                                                  \
    }                                                                                                                \
    extern "C" __global__ void region_tokens_##S(const T* v, T* t, int64_t c, Dims3 d, Dims3 s, Dims3 b) {          \
        region_tokens<T>(v, t, c, d, s, b);                                                                          \
    }                                                                                                                \
    extern "C" __global__ void gather_rows_##S(const T* x, const int64_t* r, T* y, int64_t n, int64_t w) {          \
        gather_rows<T>(x, r, y, n, w);                                                                               \
    }                                                                                                                \
    extern "C" __global__ void add_positional_encoding_##S(T* x, const T* g, int64_t w, Dims3 gd, Dims3 shape) {    \
        add_positional_encoding<T>(x, g, w, gd, shape);                                                              \
    }

FOR_EACH_STORAGE(VOLUME_KERNELS)

// y[r][c] = x[r][c] for c < inner, 0 for inner ≤ c < padded: rows widened with zeros, a thread a
// row. The f16 convolutions' channel counts must come in eights; a first layer of 1 to 7
// channels runs on the implicit GEMM with its channels-last input and packed weights padded so
// (the zero channels multiply nothing). f16 only: the f32 convolutions read channels-first.
extern "C" __global__ void pad_inner_axis_f16(const __half* x, __half* y, int64_t rows, int64_t inner,
                                              int64_t padded) {
    GRID_LOOP(r, rows) {
        for (int64_t c = 0; c < padded; ++c) y[r * padded + c] = c < inner ? x[r * inner + c] : __float2half(0.f);
    }
}
