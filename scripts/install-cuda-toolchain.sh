#!/usr/bin/env bash
# Installs the pinned CUDA compiler (CUDA 13.0, matching the GPU machines' driver 580) from PyPI
# into .cuda-toolkit/ and prints the path of nvcc. No GPU is needed to compile kernels.
# 13.1 and later emit PTX that driver 580 cannot JIT, so the pin matters.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="$root/.cuda-toolkit"
nvcc="$target/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$target" \
        "cuda-toolkit[nvcc,nvvm,crt,cudart,cccl]==13.0.2" >&2
fi
"$nvcc" --version >&2
echo "$nvcc"
