// CUDA's asynchronous-copy primitives (cp.async on sm_80 and later) for kernels compiled as host
// C++ by the CUDA emulator: each copy is queued on the calling thread and carried out when
// __pipeline_wait_prior releases its group (emulator.cpp).
#pragma once

#include <stddef.h>

namespace emu {
void pipeline_copy(void* dst, const void* src, size_t bytes, size_t zero_fill);
void pipeline_commit();
void pipeline_wait_prior(size_t pending);
}  // namespace emu

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align, size_t zfill = 0) {
    emu::pipeline_copy(dst, src, size_and_align, zfill);
}
inline void __pipeline_commit() { emu::pipeline_commit(); }
inline void __pipeline_wait_prior(size_t pending) { emu::pipeline_wait_prior(pending); }
