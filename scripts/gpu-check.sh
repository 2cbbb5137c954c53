#!/usr/bin/env bash
# The one prepared GPU check, run on the GPU machine from the repository root with the binaries
# of scripts/build-gpu-bin.sh in gpu-bin/ (carried there). In one call, well inside 10 minutes:
#   1. the CUDA backend against the CPU oracle (every op, f32 and f16; the head; a session);
#   2. compute-sanitizer memcheck over the f16 tests, racecheck over the op tests (the kernels
#      with shared memory);
#   3. the per-click benchmark (tis f16 and f32) beside PyTorch eager and torch.compile;
# then a short table. Full logs go to $OUT (or out/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu-check}"
mkdir -p "$out"
export CARGO_MANIFEST_DIR="$PWD" LD_LIBRARY_PATH="/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}" PYTHONUNBUFFERED=1
status=0
step() { echo; echo "== $1"; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"

step "parity: CUDA backend against the CPU engine"
timeout 240 gpu-bin/cuda_backend --ignored --test-threads 1 --nocapture > "$out/parity.log" 2>&1
parity=$?
grep -E "^test |relative L2|agreement|test result" "$out/parity.log" | tail -60
[ $parity -eq 0 ] || status=1

step "compute-sanitizer memcheck (f16 tests)"
timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 gpu-bin/cuda_backend --ignored --test-threads 1 \
    _f16 > "$out/memcheck.log" 2>&1
memcheck=$?
tail -5 "$out/memcheck.log"
[ $memcheck -eq 0 ] || status=1

step "compute-sanitizer racecheck (f16 op tests)"
timeout 120 compute-sanitizer --tool racecheck --error-exitcode 3 gpu-bin/cuda_backend --ignored --test-threads 1 \
    token_ops_match_cpu_f16 network_ops_match_cpu_f16 > "$out/racecheck.log" 2>&1
racecheck=$?
tail -5 "$out/racecheck.log"
[ $racecheck -eq 0 ] || status=1

step "benchmark"
gpu-bin/tis bench --device cuda --precision f16 --json "$out/tis-f16.json" | tee "$out/bench.log"
gpu-bin/tis bench --device cuda --precision f32 --iters 20 --json "$out/tis-f32.json" | tee -a "$out/bench.log"
timeout 300 python3 python/bench_head.py --device cuda --json "$out/torch.json" 2>&1 | tee -a "$out/bench.log"

step "summary"
echo "parity exit $parity, memcheck exit $memcheck, racecheck exit $racecheck"
python3 scripts/bench_table.py "$out/tis-f16.json" "$out/tis-f32.json" "$out/torch.json"
exit $status
