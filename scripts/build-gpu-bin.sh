#!/usr/bin/env bash
# Builds, on the CPU machine, what scripts/gpu-check.sh runs on the GPU machine (which has no
# Rust toolchain and no package index): the release `tis` binary and the CUDA test executable,
# with every kernel compiled by the pinned nvcc, and the Python wheels its issue-7 benchmarks
# need, into gpu-bin/ (git-ignored; carry it to the GPU machine: `carry: ["gpu-bin"]`).
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

# The packages the GPU machine's python3 lacks for python/bench_tile.py (PyTorch's nnU-Net
# network) and python/bench_predictor.py (nnUNetPredictor), at python/requirements.txt's pins:
# all pure Python, about 4 MB (acvl-utils is built from its sdist). nnunetv2's binary imports
# on that path (SimpleITK 53 MB and imagecodecs 26 MB as wheels, blosc2, connected-components-3d)
# would not fit the 64 MiB that travels with the working tree; bench_predictor.py stands in for
# them (they are not called there) and nnU-Net reads and writes images with nibabel.
wheels="dynamic-network-architectures nnunetv2 acvl-utils batchgenerators batchgeneratorsv2 nibabel"
pins=()
for name in $wheels; do
    pin=$(grep -iE "^$name==" python/requirements.txt) || { echo "no pin for $name in python/requirements.txt" >&2; exit 1; }
    pins+=("$pin")
done
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir gpu-bin/wheels "${pins[@]}"
if ls gpu-bin/wheels | grep -v -- '-none-any\.whl$'; then
    echo "the wheels above are not pure Python: they would not run on the GPU machine's Python 3.12" >&2
    exit 1
fi
ls -la gpu-bin gpu-bin/wheels
du -sh gpu-bin
