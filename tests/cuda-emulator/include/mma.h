// nvcuda::wmma for kernels compiled as host C++ by the CUDA emulator.
//
// A real fragment spreads its tile over the 32 lanes of a warp in an unspecified layout; here
// every lane holds the whole tile (row-major, f32), and every lane's load, multiply and store do
// the whole tile's work. Kernels that use the API as specified (collectively per warp, without
// assuming which lane holds which element) compute the same values; the products are exact in
// f32, the accumulation order may differ from the tensor cores'.
#pragma once

#include <cuda_fp16.h>

namespace emu {
// Fails the launch unless `pointer` is 256-bit aligned and `ldm` a multiple of 16 bytes, as
// the WMMA loads and stores require.
void check_fragment_memory(const void* pointer, unsigned ldm, unsigned element_bytes);
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
    for (int i = 0; i < F::num_elements; ++i) f.x[i] = widen(value);
}

template <typename F, typename P> inline void load_tile(F& f, const P* p, unsigned ldm, bool col_major) {
    emu::check_fragment_memory(p, ldm, sizeof(P));
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
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
    float out[M * N];
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float acc = c.x[i * N + j];
            for (int k = 0; k < K; ++k) acc += a.x[i * K + k] * b.x[k * N + j];
            out[i * N + j] = acc;
        }
    for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
