// Normalisations: InstanceNorm + LeakyReLU over volumes, LayerNorm over token rows.
//
// InstanceNorm runs in three launches: `instance_norm_partials` gives each (channel, split)
// block a contiguous slice of a channels-first channel and reduces Σx and Σx² in f64 (no
// cancellation in the variance even over millions of voxels); `instance_norm_finalize`, one
// block per channel, adds up the channel's partials and turns them into an f32 scale and shift
// (γ/σ, β − μγ/σ); `instance_norm_apply` applies them with LeakyReLU in one memory-bound pass,
// over channels-first or channels-last values, a value a thread; the f16 network's channels-last
// activations, whose channels come in eights, take `instance_norm_apply_channels_last_f16`: 8
// channels of a voxel (16 bytes) a load and a store, with no division per value (the scalar
// kernel's 64-bit i % channels cost about 40 instructions for each 2-byte value, and a thread
// had only 2 bytes in flight). An f16 conv block skips the first launch: the
// convolution's epilogue (kernels/conv.cu) leaves the partials, one split per block of 64 or
// 128 voxels (tens of thousands of splits, hence a block per channel in finalize).
//
// LayerNorm: one warp per row (warp_layer_norm in common.cuh), two passes over the row (mean,
// then biased variance) from L1; rows are d_model wide (≤ a few hundred values), so the second
// pass hits cache. `layer_norm_project` fuses it with a projection to a few outputs.
#include "common.cuh"

constexpr int NORM_THREADS = 256;

// Σ over the block of each thread's (a, b), left in thread 0's; blockDim.x = NORM_THREADS.
__device__ __forceinline__ void block_sum_pair(double& a, double& b) {
    __shared__ double shared[2][NORM_THREADS];
    shared[0][threadIdx.x] = a;
    shared[1][threadIdx.x] = b;
    __syncthreads();
    for (int stride = NORM_THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            shared[0][threadIdx.x] += shared[0][threadIdx.x + stride];
            shared[1][threadIdx.x] += shared[1][threadIdx.x + stride];
        }
        __syncthreads();
    }
    a = shared[0][0];
    b = shared[1][0];
}

template <typename T>
__device__ void instance_norm_partials(const T* x, double* partials, int64_t voxels, int splits) {
    int64_t c = blockIdx.y, s = blockIdx.x;
    int64_t chunk = (voxels + splits - 1) / splits;
    int64_t begin = s * chunk, end = min(voxels, begin + chunk);
    const T* channel = x + c * voxels;
    double sum = 0.0, squares = 0.0;
    for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
        double value = to_f32(channel[v]);
        sum += value;
        squares += value * value;
    }
    block_sum_pair(sum, squares);
    if (threadIdx.x == 0) {
        partials[(c * splits + s) * 2] = sum;
        partials[(c * splits + s) * 2 + 1] = squares;
    }
}

// Block c: scale_shift[c] = (γ/σ, β − μ·γ/σ) from the channel's `splits` partial sums.
template <typename T>
__device__ void instance_norm_finalize(const double* partials, const T* gamma, const T* beta, float* scale_shift,
                                       int64_t voxels, int splits, float eps) {
    int64_t c = blockIdx.x;
    double sum = 0.0, squares = 0.0;
    // 8 of a thread's splits loaded at once, then added in order: a conv block's partials are one
    // split per 64 or 128 voxels (15,680 a channel at the Pancreas plan's first stage, 61 a
    // thread), and a loop of one load and two dependent adds waits on memory every time.
    const double* channel = partials + c * splits * 2;
    int s = threadIdx.x;
    for (; s + 7 * (int)blockDim.x < splits; s += 8 * blockDim.x) {
        double2 pair[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) pair[i] = *(const double2*)&channel[(s + i * blockDim.x) * 2];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            sum += pair[i].x;
            squares += pair[i].y;
        }
    }
    for (; s < splits; s += blockDim.x) {
        sum += channel[s * 2];
        squares += channel[s * 2 + 1];
    }
    block_sum_pair(sum, squares);
    if (threadIdx.x != 0) return;
    double mean = sum / voxels;
    double var = fmax(squares / voxels - mean * mean, 0.0);
    double inv_std = 1.0 / sqrt(var + eps);
    double g = to_f32(gamma[c]);
    scale_shift[2 * c] = (float)(g * inv_std);
    scale_shift[2 * c + 1] = (float)(to_f32(beta[c]) - mean * g * inv_std);
}

// LeakyReLU(v·scale + shift), with scale_shift the channel's (scale, shift) pair.
__device__ __forceinline__ float normalize_leaky(float v, const float* scale_shift, float slope) {
    const float y = v * scale_shift[0] + scale_shift[1];
    return y < 0.f ? y * slope : y;
}

// x channels-first, or channels-last (the f16 network's activations) where `channels_last`.
template <typename T>
__device__ void instance_norm_apply(T* x, const float* scale_shift, int64_t channels, int64_t voxels, float slope,
                                    int channels_last) {
    GRID_LOOP(i, channels * voxels) {
        int64_t c = channels_last ? i % channels : i / voxels;
        x[i] = from_f32<T>(normalize_leaky(to_f32(x[i]), scale_shift + 2 * c, slope));
    }
}

// instance_norm_apply over channels-last f16 values of `channels` (a multiple of 8) channels:
// group g of 8 channels of a voxel (value index 8g) a thread per step, one 16-byte load and
// store. The group's channels follow from step to step without division: the grid's stride
// modulo the channel groups is added and wrapped.
extern "C" __global__ void instance_norm_apply_channels_last_f16(__half* x, const float* scale_shift,
                                                                 int64_t channels, int64_t voxels, float slope) {
    const int groups = (int)(channels / 8);
    const int64_t total = groups * voxels, step = (int64_t)gridDim.x * blockDim.x;
    int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int group = (int)(g % groups);
    const int group_step = (int)(step % groups);
    for (; g < total; g += step) {
        __align__(16) __half values[8];
        *(uint4*)values = ((const uint4*)x)[g];
        const float* ss = scale_shift + 16 * group;  // (scale, shift) of channels 8·group…
#pragma unroll
        for (int i = 0; i < 8; ++i) values[i] = __float2half_rn(normalize_leaky(__half2float(values[i]), ss + 2 * i, slope));
        ((uint4*)x)[g] = *(const uint4*)values;
        group += group_step;
        if (group >= groups) group -= groups;
    }
}

// One warp per row; blockDim.x is a multiple of 32.
template <typename T>
__device__ void layer_norm(const T* x, T* y, const T* gamma, const T* beta, int64_t rows, int64_t width) {
    int lane = threadIdx.x % 32;
    WARP_LOOP(r, rows) {
        T* out = y + r * width;
        warp_layer_norm(x + r * width, gamma, beta, width, lane, [&](int64_t f, float v) { out[f] = from_f32<T>(v); });
    }
}

// y[r, k] = LN(x[r])·W[k]ᵀ + b[k] for a projection to few outputs (the head's logits over the
// classes): a warp per row, whose lanes keep the row (at most PROJECT_MAX_WIDTH values, 4 a
// lane) in registers, so x is read once and LN(x) never written; each output is a warp sum, W's
// few rows coming from L1. The LayerNorm is warp_layer_norm's arithmetic.
constexpr int PROJECT_MAX_WIDTH = 128;

template <typename T>
__device__ void layer_norm_project(const T* x, const T* gamma, const T* beta, const T* w, const T* bias, T* y,
                                   int64_t rows, int64_t width, int64_t outputs) {
    constexpr int V = PROJECT_MAX_WIDTH / 32;
    const int lane = threadIdx.x % 32;
    WARP_LOOP(r, rows) {
        float v[V], mean, inv_std;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            int64_t f = lane + 32 * i;
            v[i] = f < width ? to_f32(x[r * width + f]) : 0.f;
        }
        warp_row_moments(v, width, lane, mean, inv_std);
#pragma unroll
        for (int i = 0; i < V; ++i) {
            int64_t f = lane + 32 * i;
            v[i] = f < width ? (v[i] - mean) * inv_std * to_f32(gamma[f]) + to_f32(beta[f]) : 0.f;
        }
        for (int64_t k = 0; k < outputs; ++k) {
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < V; ++i)
                if (lane + 32 * i < width) dot += v[i] * to_f32(w[k * width + lane + 32 * i]);
            dot = warp_sum(dot);
            if (lane == 0) y[r * outputs + k] = from_f32<T>(dot + to_f32(bias[k]));
        }
    }
}

#define NORM_KERNELS(T, S)                                                                                          \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                                      \
        instance_norm_partials_##S(const T* x, double* p, int64_t v, int splits) {                                  \
        instance_norm_partials<T>(x, p, v, splits);                                                                 \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                                      \
        instance_norm_finalize_##S(const double* p, const T* g, const T* b, float* ss, int64_t v, int splits,       \
                                   float eps) {                                                                     \
        instance_norm_finalize<T>(p, g, b, ss, v, splits, eps);                                                     \
    }                                                                                                               \
    extern "C" __global__ void instance_norm_apply_##S(T* x, const float* ss, int64_t c, int64_t v, float slope,    \
                                                       int last) {                                                  \
        instance_norm_apply<T>(x, ss, c, v, slope, last);                                                           \
    }                                                                                                               \
    extern "C" __global__ void layer_norm_##S(const T* x, T* y, const T* g, const T* b, int64_t r, int64_t w) {    \
        layer_norm<T>(x, y, g, b, r, w);                                                                            \
    }                                                                                                               \
    extern "C" __global__ void layer_norm_project_##S(const T* x, const T* g, const T* b, const T* w,              \
                                                      const T* bias, T* y, int64_t r, int64_t width, int64_t o) {   \
        layer_norm_project<T>(x, g, b, w, bias, y, r, width, o);                                                    \
    }

FOR_EACH_STORAGE(NORM_KERNELS)
