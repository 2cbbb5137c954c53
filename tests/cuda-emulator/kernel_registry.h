// How the CUDA emulator finds a kernel by name and calls it with cuLaunchKernel's argument
// array. scripts/cuda-emulator.sh generates one translation unit per kernels/*.cu that includes
// the kernel file and registers each of its `extern "C"` kernels here.
#pragma once

#include <stddef.h>

#include <type_traits>
#include <utility>

namespace emu {

// Calls `function` with the values that `params[i]` point to, typed as the kernel declares them
// (as the driver reads a launch's arguments).
using Invoke = void (*)(void* function, void** params);

struct Kernel {
    const char* name;
    void* function;
    Invoke invoke;
};

void register_kernel(Kernel kernel);

template <typename... Args> struct Caller {
    template <size_t... I> static void call(void* function, void** params, std::index_sequence<I...>) {
        reinterpret_cast<void (*)(Args...)>(function)(*static_cast<std::remove_cv_t<Args>*>(params[I])...);
    }
    static void invoke(void* function, void** params) {
        call(function, params, std::index_sequence_for<Args...>{});
    }
};

struct Registration {
    template <typename... Args> Registration(const char* name, void (*function)(Args...)) {
        register_kernel(Kernel{name, reinterpret_cast<void*>(function), &Caller<Args...>::invoke});
    }
};

}  // namespace emu
