// nvcuda::wmma for kernels compiled as host C++ by the CUDA emulator.
//
// A real fragment spreads its tile over the 32 lanes of a warp in an unspecified layout; here
// the warp's first lane holds the whole tile (row-major, f32) and does the whole tile's load,
// multiply and store, and the other lanes' calls only check their arguments' alignment. The
// operations are warp-collective with warp-uniform arguments, so kernels that use the API as
// specified (without assuming which lane holds which element) compute the same values; the
// products are exact in f32, the accumulation order may differ from the tensor cores'.
#pragma once

#include <cuda_fp16.h>
#include <string.h>

namespace emu {
// Fails the launch unless `pointer` is 256-bit aligned and `ldm` a multiple of 16 bytes, as
// the WMMA loads and stores require.
void check_fragment_memory(const void* pointer, unsigned ldm, unsigned element_bytes);

// Whether the calling thread is its warp's first lane, the one that does the warp's WMMA work.
inline bool warp_leader() {
    unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    return linear % 32 == 0;
}
}  // namespace emu

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct tile_shape;
template <int M, int N, int K> struct tile_shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct tile_shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct tile_shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    float x[num_elements];
};

inline float widen(float v) { return v; }
inline float widen(__half v) { return __half2float(v); }

template <typename F, typename V> inline void fill_fragment(F& f, V value) {
    if (!emu::warp_leader()) return;
    for (int i = 0; i < F::num_elements; ++i) f.x[i] = widen(value);
}

template <typename F, typename P> inline void load_tile(F& f, const P* p, unsigned ldm, bool col_major) {
    emu::check_fragment_memory(p, ldm, sizeof(P));
    if (!emu::warp_leader()) return;
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = widen(col_major ? p[c * ldm + r] : p[r * ldm + c]);
}

template <typename Use, int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const P* p, unsigned ldm) {
    load_tile(f, p, ldm, false);
}
template <typename Use, int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& f, const P* p, unsigned ldm) {
    load_tile(f, p, ldm, true);
}
template <int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const P* p, unsigned ldm, layout_t layout) {
    load_tile(f, p, ldm, layout == mem_col_major);
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
    emu::check_fragment_memory(p, ldm, sizeof(T));
    if (!emu::warp_leader()) return;
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
    if (!emu::warp_leader()) return;
    // Row by row, k outer and j inner: the inner loop is one vector multiply-add over a row of B.
    float out[M * N];
    memcpy(out, c.x, sizeof out);
    for (int i = 0; i < M; ++i)
        for (int k = 0; k < K; ++k) {
            float aik = a.x[i * K + k];
            const float* bk = b.x + k * N;
            float* row = out + i * N;
            for (int j = 0; j < N; ++j) row[j] += aik * bk[j];
        }
    memcpy(d.x, out, sizeof out);
}

}  // namespace wmma
}  // namespace nvcuda
