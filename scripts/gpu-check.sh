#!/usr/bin/env bash
# The one prepared GPU check, run on the GPU machine from the repository root with the binaries
# and wheels of scripts/build-gpu-bin.sh in gpu-bin/ (carried there: `carry: ["gpu-bin"]`). In
# one call, inside GPU_CHECK_BUDGET_S seconds (default 420; a device call may run 600):
#   1. the CUDA backend against the CPU oracle (every op, f32 and f16; the head; a session);
#   2. compute-sanitizer memcheck over the f16 and f32 tests (the OOM and eval tests aside),
#      racecheck over the op tests (the kernels with shared memory);
#   3. the per-click benchmark (tis f16 and f32) beside PyTorch eager and torch.compile;
#   4. issue 7: one nnU-Net tile forward (MSD Pancreas 40×224×224, generic 128³), `tis bench
#      --tile --device cuda --precision f16` against PyTorch (cuDNN, f16/bf16 autocast, ±
#      channels_last_3d, torch.compile bf16) — python/bench_tile.py;
#   5. issue 7: whole-volume segmentation of a synthetic 96×512×512 CT (Pancreas plan), `tis
#      segment --device cuda` against nnUNetPredictor on the GPU, end to end, no test-time
#      mirroring for either (the bench model allows none) — python/bench_predictor.py;
#      then the mma.sync paths on this card (TIS_CUDA_WGMMA=0): the implicit GEMM's and the
#      head FFN's parity, a click and a Pancreas tile forward per path, back to back (paths.log);
#   6. with the time left, Nsight Compute over the network's and the click's kernels
#      (scripts/ncu_summary.py prints a line per kernel);
# then the tables. Full logs and JSON go to $OUT (or out/gpu-check); where OUT is set (the device
# machine, which brings back at most 8 files from it) the logs end up in $OUT/logs.tar.gz. The
# exit status is 1 when parity (either path), memcheck or racecheck fails (the benchmarks' exits
# are reported, as before).
#
# Time: every step runs under `timeout`, its cap below, cut shorter where needed so that the
# steps after it keep their minimum (RESERVE_*) and the script ends by the deadline; a step with
# under 10 s left is skipped. A step that fails or times out does not stop the ones after it.
#   caps: parity 240, memcheck 240, racecheck 120, tis head f16 60 + f32 60, PyTorch head 300,
#         tile 180 (tis: 60 a plan), predictor 180 (tis segment: the step's time less 75 s)
#   kept for issue 7 until it starts: tile 60 + predictor 110 + summary 10 = 180 s, so steps
#   1-3 share at most 240 s of the default budget before they are cut; installing the wheels
#   (seconds; at most 60) comes out of the tile step's time.
# Where the session can afford it, GPU_CHECK_BUDGET_S=540 gives the last steps more room.
# GPU_CHECK_HEAD_ONLY=1 runs steps 1-3 and the click's profile alone (for work that touched the
# head and not the network, or a lease with about 5 minutes left): the checks then leave the
# benchmarks 90 s and the profile 40 s, racecheck takes the token ops alone, and PyTorch's head
# runs 20 timed clicks a mode.
# The tis sides run bounded work (their speed on a card is unmeasured so far): 1 warm-up + 3
# timed tile forwards, one `tis segment`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu-check}"
mkdir -p "$out"
# The tests find the fixtures, the data and the tis binary through these at run time.
export CARGO_MANIFEST_DIR="$PWD" TIS_BIN="$PWD/gpu-bin/tis" LD_LIBRARY_PATH="/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}" PYTHONUNBUFFERED=1
status=0
budget="${GPU_CHECK_BUDGET_S:-420}"
deadline=$((SECONDS + budget))
RESERVE_TILE=60 RESERVE_PREDICTOR=110 RESERVE_SUMMARY=10
exec 3>&1 # the terminal, for messages from steps whose output goes to a log
step() { echo; echo "== $1 (at ${SECONDS} s of ${budget})"; }
# within CAP RESERVE: CAP seconds, or fewer (down to 0) so that RESERVE seconds are left before
# the deadline.
within() {
    local left=$((deadline - SECONDS - $2))
    left=$((left < 0 ? 0 : left))
    echo $((left < $1 ? left : $1))
}
# bounded SECONDS COMMAND...: COMMAND under timeout (and its children, killed 10 s after), or
# skipped with exit 124 when fewer than 10 s are left.
bounded() {
    local limit=$1
    shift
    if [ "$limit" -lt 10 ]; then
        echo "skipped: ${limit} s left of the ${budget} s budget" >&3
        return 124
    fi
    echo "(timeout ${limit} s)" >&3
    timeout -k 10 "$limit" "$@"
}
head_only="${GPU_CHECK_HEAD_ONLY:-0}"
if [ "$head_only" = 1 ]; then
    reserve_checks=$((90 + 40 + RESERVE_SUMMARY)) reserve_bench=$((40 + RESERVE_SUMMARY)) torch_iters=(--iters 20 --warmup 3)
    race_tests=(token_ops_match_cpu_f16)
else
    reserve_checks=$((RESERVE_TILE + RESERVE_PREDICTOR + RESERVE_SUMMARY)) reserve_bench=$reserve_checks torch_iters=()
    race_tests=(token_ops_match_cpu_f16 network_ops_match_cpu_f16)
fi
tile=124 predictor=124 paths=124

step "GPU"
timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"

step "parity: CUDA backend against the CPU engine"
bounded "$(within 240 $reserve_checks)" gpu-bin/cuda_backend --ignored --test-threads 1 --nocapture > "$out/parity.log" 2>&1
parity=$?
grep -E "^test |relative L2|agreement|test result" "$out/parity.log" | tail -60
[ $parity -eq 0 ] || status=1

step "compute-sanitizer memcheck (f16 and f32 tests: all but the OOM and eval tests)"
bounded "$(within 240 $reserve_checks)" compute-sanitizer --tool memcheck --error-exitcode 3 gpu-bin/cuda_backend --ignored --test-threads 1 \
    _f16 _f32 > "$out/memcheck.log" 2>&1
memcheck=$?
tail -5 "$out/memcheck.log"
[ $memcheck -eq 0 ] || status=1

step "compute-sanitizer racecheck (f16 op tests)"
bounded "$(within 120 $reserve_checks)" compute-sanitizer --tool racecheck --error-exitcode 3 gpu-bin/cuda_backend --ignored --test-threads 1 \
    "${race_tests[@]}" > "$out/racecheck.log" 2>&1
racecheck=$?
tail -5 "$out/racecheck.log"
[ $racecheck -eq 0 ] || status=1

step "benchmark"
bounded "$(within 60 $reserve_bench)" gpu-bin/tis bench --device cuda --precision f16 --json "$out/tis-f16.json" | tee "$out/bench.log"
bounded "$(within 60 $reserve_bench)" gpu-bin/tis bench --device cuda --precision f32 --iters 20 --json "$out/tis-f32.json" | tee -a "$out/bench.log"
bounded "$(within 300 $reserve_bench)" python3 python/bench_head.py --device cuda "${torch_iters[@]}" --json "$out/torch.json" 2>&1 \
    | tee -a "$out/bench.log"

if [ "$head_only" != 1 ]; then
    step "issue 7: Python packages for PyTorch's nnU-Net network and nnUNetPredictor"
    # gpu-bin/wheels: dynamic-network-architectures, nnunetv2 and the pure-Python packages it
    # imports on this path (scripts/build-gpu-bin.sh); nnunetv2's binary imports (SimpleITK,
    # blosc2, imagecodecs, cc3d) get stand-ins in bench_predictor.py.
    site=/tmp/site
    if ls gpu-bin/wheels/*.whl > /dev/null 2>&1 &&
        timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" gpu-bin/wheels/*.whl > "$out/wheels.log" 2>&1; then
        echo "installed to $site: $(cd gpu-bin/wheels && ls *.whl | tr '\n' ' ')"
    else
        echo "no wheels installed (gpu-bin/wheels missing or pip failed, see wheels.log): the PyTorch tile and nnU-Net sides will say what is missing"
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

    step "issue 7: one nnU-Net tile forward, tis f16 against PyTorch (cuDNN)"
    bounded "$(within 180 $((RESERVE_PREDICTOR + RESERVE_SUMMARY)))" python3 python/bench_tile.py --device cuda \
        --plans pancreas generic128 --tis gpu-bin/tis --iters 20 --warmup 3 --tis-iters 3 --tis-warmup 1 \
        --tis-timeout 60 --json "$out/tile.json" 2>&1 | tee "$out/tile.log"
    tile=$?

    step "issue 7: whole-volume segmentation 96×512×512, tis segment against nnUNetPredictor (GPU)"
    limit=$(within 180 $RESERVE_SUMMARY)
    bounded "$limit" python3 python/bench_predictor.py --device cuda --synthetic 96 512 512 --plan pancreas \
        --make-bundle /tmp/bench-pancreas.safetensors --tis gpu-bin/tis --repeats 2 \
        --tis-timeout $((limit > 105 ? limit - 75 : 30)) --json "$out/predictor.json" 2>&1 | tee "$out/predictor.log"
    predictor=$?

    step "issues 3 and 7: the kernels' two paths on this card (TIS_CUDA_WGMMA=0: mma.sync on an H100)"
    # The mma.sync paths' parity on this card (the implicit GEMM's, and the head's FFN at TIS-B's
    # width), a click per path (TIS-B, 10 clicks each, the per-kernel table names the FFN's
    # path), then one Pancreas tile forward per path, back to back (tis alone; the wgmma paths
    # are the default above). On a GPU without wgmma (not compute capability 9.0) both runs of
    # each take mma.sync.
    TIS_CUDA_WGMMA=0 bounded "$(within 60 $((RESERVE_SUMMARY + 40)))" gpu-bin/cuda_backend --ignored \
        --test-threads 1 network_ops_match_cpu_f16 tile_forward_matches_cpu_f16 token_ops_match_cpu_f16 \
        > "$out/paths.log" 2>&1
    paths=$?
    grep -E "^test |test result" "$out/paths.log" | tail -4
    [ $paths -eq 0 ] || status=1
    for wgmma in 1 0; do
        echo "TIS_CUDA_WGMMA=$wgmma (click)" >> "$out/paths.log"
        TIS_CUDA_WGMMA=$wgmma bounded "$(within 20 $((RESERVE_SUMMARY + 40)))" gpu-bin/tis bench --device cuda \
            --precision f16 --iters 10 --warmup 2 >> "$out/paths.log" 2>&1
        echo "TIS_CUDA_WGMMA=$wgmma: $(grep -E '^per click|feed_forward' "$out/paths.log" | tail -2 | tr -s ' ' | tr '\n' ';')"
    done
    if [ -f /tmp/bench-pancreas.safetensors ]; then
        for wgmma in 1 0; do
            echo "TIS_CUDA_WGMMA=$wgmma" >> "$out/paths.log"
            TIS_CUDA_WGMMA=$wgmma bounded "$(within 30 $((RESERVE_SUMMARY + 40)))" gpu-bin/tis bench --tile \
                --device cuda --precision f16 -m /tmp/bench-pancreas.safetensors --iters 5 --warmup 1 \
                >> "$out/paths.log" 2>&1
            echo "TIS_CUDA_WGMMA=$wgmma: $(grep -E '^per tile' "$out/paths.log" | tail -1)"
        done
    else
        echo "no Pancreas bundle (the predictor step did not get to write it): no tile comparison"
    fi
fi

step "profile: Nsight Compute on the Pancreas plan's network kernels and the per-click kernels"
# Whatever time is left (at most 60 + 20 + 40 s): where the kernels stand against the card's peaks, at
# the clocks the card runs at (--clock-control none: ncu would otherwise lock them to base).
# The Pancreas bundle is the one step 5 wrote; the full reports stay in the logs.
# ComputeWorkloadAnalysis: the issue slots' use beside the busiest pipe's (tensor cores, FMA,
# special functions), which says whether a kernel waits on its instruction stream or on a unit;
# MemoryWorkloadAnalysis: the busiest memory unit's share of its peak, shared memory's included
# (wgmma reads its operands from there: performance.md's design arithmetic has the implicit
# GEMM's 128 × 64 tile wanting more than shared memory gives).
sections=(--clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis)
if [ "$head_only" = 1 ]; then
    echo "head only: no tile profile"
elif [ -f /tmp/bench-pancreas.safetensors ]; then
    bounded "$(within 60 $((RESERVE_SUMMARY + 40)))" ncu "${sections[@]}" --launch-count 34 \
        --kernel-name regex:'conv3d_igemm|conv3d_split_sum|conv3d_direct|conv_transpose3d_mma' \
        gpu-bin/tis bench --tile --device cuda --precision f16 -m /tmp/bench-pancreas.safetensors --iters 1 \
        --warmup 0 > "$out/ncu-tile.log" 2>&1
    echo "ncu (tile) exit $?"
    # The first stage's normalisation (finalize and apply of its first two conv blocks: 1 GB
    # read and written a tile at that stage), separately so that the convolutions above keep
    # their launch count.
    bounded "$(within 20 $((RESERVE_SUMMARY + 40)))" ncu "${sections[@]}" --launch-count 4 \
        --kernel-name regex:'instance_norm_finalize|instance_norm_apply' \
        gpu-bin/tis bench --tile --device cuda --precision f16 -m /tmp/bench-pancreas.safetensors --iters 1 \
        --warmup 0 > "$out/ncu-norm.log" 2>&1
    echo "ncu (norm) exit $?"
else
    echo "no Pancreas bundle (step 5 did not get to write it): no tile profile"
fi
# The click's first 20 matching launches: its tokens (`input_tokens`, one pass at f16 and TIS-B's
# width, and `label_mlp_mma`, Va) and its first layers: the cross-attention over the voxels and
# its merge, the click side's block (`click_update`), the clicks' fragments, the label
# assignment and the FFN (either path: `assign_fused`/`assign_wgmma`, `feed_forward_mma`/
# `feed_forward_wgmma`). (The clicks' small query launches are in `tis bench`'s per-kernel table.)
bounded "$(within 40 $RESERVE_SUMMARY)" ncu "${sections[@]}" --launch-count 20 \
    --kernel-name regex:'input_tokens|label_mlp|cross_partial|cross_merge|click_update|pack_click|assign_|feed_forward_|layer_norm_project' \
    gpu-bin/tis bench --device cuda --precision f16 --iters 1 --warmup 0 > "$out/ncu-click.log" 2>&1
echo "ncu (click) exit $?"
timeout 10 python3 scripts/ncu_summary.py "$out"/ncu-*.log

step "summary"
echo "parity exit $parity, memcheck exit $memcheck, racecheck exit $racecheck, tile exit $tile, predictor exit $predictor, mma.sync path parity exit $paths (124: timed out or skipped)"
network=()
[ "$head_only" = 1 ] || network=(--tile "$out/tile.json" --predictor "$out/predictor.json")
timeout 30 python3 scripts/bench_table.py "$out/tis-f16.json" "$out/tis-f32.json" "$out/torch.json" "${network[@]}"
if [ -n "${OUT:-}" ]; then
    # The device tool brings back at most 8 files from $OUT: the JSON results stay as they are,
    # the logs travel as one archive.
    (cd "$out" && tar -czf logs.tar.gz -- *.log gpu.txt && rm -f -- *.log gpu.txt)
    echo "logs: logs.tar.gz; results: $(cd "$out" && ls *.json 2>/dev/null | tr '\n' ' ')"
fi
echo "done at ${SECONDS} s of ${budget}"
exit $status
