#!/usr/bin/env bash
# Builds, on the CPU machine, what scripts/gpu-check.sh runs on the GPU machine (which has no
# Rust toolchain): the release `tis` binary and the CUDA test executable, with every kernel
# compiled by the pinned nvcc, into gpu-bin/ (git-ignored; carry it to the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export NVCC="$(scripts/install-cuda-toolchain.sh)" TIS_REQUIRE_KERNELS=1
cargo build --release --bin tis
tests=$(cargo test --release --test cuda_backend --no-run --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_backend":
        print(m["executable"])')
rm -rf gpu-bin && mkdir gpu-bin
cp target/release/tis gpu-bin/tis
cp "$tests" gpu-bin/cuda_backend
ls -la gpu-bin
