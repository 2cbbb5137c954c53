// The CUDA C++ device surface that kernels/*.cu use, for compiling them as host C++ in the CUDA
// emulator (force-included before each kernel file; see emulator.cpp for how a launch runs).
//
// Each CUDA thread of a block is a fiber on one host thread; `threadIdx` and friends are that
// host thread's current values, switched with the fiber. `__shared__` variables are
// thread_local statics: one copy per host thread, which runs one block at a time, so every
// fiber of a block sees the same copy. __syncthreads and warp shuffles suspend the fiber until
// the block's (or warp's) other threads arrive.
#pragma once

#include <math.h>
#include <stdint.h>

#include <array>
#include <type_traits>

#include <cuda_fp16.h>

struct uint3 {
    unsigned x, y, z;
};
// CUDA's 16-byte vectors: their alignment makes the host compiler use aligned vector moves, which
// fault on a misaligned address as the GPU's 16-byte loads do.
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(16))) double2 {
    double x, y;
};

namespace emu {
extern thread_local uint3 thread_idx, block_idx, block_dim, grid_dim;
void sync_threads();
void sync_warp();
float shuffle_xor(float value, int lane_mask);
bool any_lane(bool predicate);
void* dynamic_shared();
// The warp-collective tensor-core instructions that kernels/mma.cuh issues through inline PTX on
// a GPU (ldmatrix.x4 and its .trans, mma.sync m16n8k16 with f32 accumulators), in the PTX ISA's layouts.
std::array<uint32_t, 4> ldmatrix_x4(const void* row, bool transposed);
std::array<float, 4> mma_m16n8k16(const std::array<float, 4>& c, const uint32_t (&a)[4], const uint32_t (&b)[2]);
// sm_90a's wgmma (kernels/mma.cuh): a shared-memory operand, its descriptor and the start the
// kernel means it to describe (the emulator reads the operand where the descriptor says, and
// checks its address bits against that start).
struct WgmmaOperand {
    const void* start;
    uint64_t descriptor;
};
void wgmma_ss(float* d, int n, WgmmaOperand a, WgmmaOperand b, bool accumulate);
// The same with A in registers: the calling lane's four, as mma.sync's A fragment of its warp's rows.
void wgmma_rs(float* d, int n, const uint32_t (&a)[4], WgmmaOperand b, bool accumulate);
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int groups);
}  // namespace emu

// kernels/*.cuh take the emulator's ldmatrix and mma.sync, and host arithmetic, instead of inline PTX.
#define TIS_CUDA_EMULATOR 1

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() emu::sync_threads()

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) { return emu::shuffle_xor(value, lane_mask); }
inline int __any_sync(unsigned, int predicate) { return emu::any_lane(predicate != 0); }
// Every lane of the warp (the only mask the kernels use).
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
// A shared-memory address as the kernels encode it in wgmma descriptors (the emulator checks
// the encoding against the pointer the kernel names beside it).
inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)(uintptr_t)p; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }

// CUDA's integer min/max take mixed argument types, as built-in arithmetic would.
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
