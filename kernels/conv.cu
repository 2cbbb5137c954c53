// The nnU-Net network's convolutions, direct form: one thread per output value.
//
// conv3d: out[co, o] = b[co] + Σ_ci Σ_k x[ci, o·stride + k − pad] · w[co, ci, k], zero outside
// the input. Threads of a warp share `co` and neighbouring x positions, so weight loads are
// warp-uniform broadcasts and input loads coalesce along x. This is the correctness baseline
// for every shape nnU-Net plans use (kernels 3³, 1×3×3, 1³; strides 1, 2, 1×2×2); the
// tensor-core implicit GEMM replaces it on the fast path.
//
// conv_transpose3d with kernel = stride (no overlap): out[co, i·s + a] = b[co] +
// Σ_ci x[ci, i] · w[ci, co, a], one thread per output value.
#include "common.cuh"

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
