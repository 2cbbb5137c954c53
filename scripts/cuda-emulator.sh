#!/usr/bin/env bash
# Runs the CUDA backend's tests (tests/cuda_backend.rs, the ones marked "needs a CUDA GPU") on
# the CPU, against the CUDA emulator of tests/cuda-emulator/: kernels/*.cu compiled as host C++
# behind a stand-in libcuda.so that cudarc loads instead of NVIDIA's driver. It checks the
# backend's launches and the kernels' arithmetic; it is not a GPU run (see emulator.cpp for what
# it does not check). Extra arguments go to the test binary (a test name filter, --nocapture).
set -euo pipefail
cd "$(dirname "$0")/.."
src=tests/cuda-emulator
build=target/cuda-emulator
rm -rf "$build" && mkdir -p "$build/kernels"

# CUDA's `extern __shared__ T name[];` (the launch's dynamic shared memory) has no host C++
# spelling: it becomes a pointer to the emulated block's buffer.
for file in kernels/*.cu kernels/*.cuh; do
    sed -E 's/extern __shared__ ([A-Za-z_0-9]+) ([A-Za-z_0-9]+)\[\];/\1* \2 = (\1*)emu::dynamic_shared();/' \
        "$file" > "$build/kernels/$(basename "$file")"
done

# -fno-strict-aliasing: kernels move 8 halves as one uint4, which CUDA allows and host C++ does
# not without it.
flags=(-std=c++17 -O3 -fno-strict-aliasing -march=x86-64-v3 -g -fPIC -Wall -Wno-sign-compare -Wno-unknown-pragmas -Wno-unused-function -I "$src/include" -I "$build/kernels")
objects=()
for file in "$build"/kernels/*.cu; do
    stem=$(basename "$file" .cu)
    unit="$build/register_$stem.cpp"
    {
        echo "#include <cuda_emulation.h>"
        echo "#include \"$stem.cu\""
        echo "#include \"$PWD/$src/kernel_registry.h\""
        echo "static const emu::Registration registered[] = {"
        g++ "${flags[@]}" -x c++ -include cuda_emulation.h -E -P "$file" \
            | grep -oE 'extern "C" +void +[A-Za-z_0-9]+' | awk '{print "    {\"" $NF "\", &" $NF "},"}'
        echo "};"
    } > "$unit"
    g++ "${flags[@]}" -c "$unit" -o "$build/$stem.o"
    objects+=("$build/$stem.o")
done
g++ "${flags[@]}" -shared -o "$build/libcuda.so" "$src/emulator.cpp" "${objects[@]}" -lpthread
echo "CUDA emulator: $build/libcuda.so ($(grep -c '&' "$build"/register_*.cpp | awk -F: '{n += $2} END {print n}') kernels)"

NVCC="$(scripts/install-cuda-toolchain.sh)"
export NVCC TIS_REQUIRE_KERNELS=1
# One test at a time, as on the GPU: the out-of-memory test fills the device. Twice: posing as
# an H100 (compute capability 9.0: the kernels' wgmma paths, as in the sm_90a cubins), with the
# asynchronous copies and wgmma products carried out when the thread waits for them (a slab or
# an accumulator read before its wait shows); then posing as a GPU of compute capability 8.6 (no
# wgmma: the mma.sync paths of the sm_80 cubins; 99 KB of shared memory a block: the fused label
# assignment takes 64-token blocks at width 128), with the copies landing at once (a copy into a
# buffer that other threads still read shows).
tests=(cargo test --release --test cuda_backend -- --ignored --test-threads 1 "$@")
LD_LIBRARY_PATH="$PWD/$build" "${tests[@]}"
echo "CUDA emulator again: compute capability 8.6 (no wgmma), 99 KB of shared memory a block, asynchronous copies landing at once"
LD_LIBRARY_PATH="$PWD/$build" TIS_CUDA_EMULATOR_EARLY_COPIES=1 TIS_CUDA_EMULATOR_SHARED_OPTIN=101376 \
    TIS_CUDA_EMULATOR_CAPABILITY=86 "${tests[@]}"
