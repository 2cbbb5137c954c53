"""PyTorch side of the per-click latency benchmark of the TIS refinement head (TIS-B).

Runs TisHead.forward (python/tis_reference.py) on one ROI with random, seeded weights and inputs
(C_f = 32 feature channels, K = 3 classes, the TIS-B configuration of shared/design/tis-model.md)
and times one click = one forward over the whole ROI with all the clicks, in up to three modes:
eager float32, eager bf16 autocast and torch.compile under bf16 autocast. Eager modes are also
broken down into stages. FLOPs are counted as in shared/design/engine.md ("Per-click budget of
TIS-B"), so GFLOP/s compare with the Rust engine's. It prints a results table last; --json writes
everything. Needs only torch and numpy.

Usage (from the repository root):
    python python/bench_head.py                                   # cuda if available, TIS-B ROI
    python python/bench_head.py --device cpu --roi 16 32 32 --iters 5 --warmup 1
"""

import argparse
import json
import math
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

TIS_B = {
    "d_model": 128,
    "n_heads": 8,
    "ffn_dim": 512,
    "n_layers": 6,
    "pe_grid": [8, 8, 8],
    "roi_margin": [8, 16, 16],
    "roi_min": [32, 64, 64],
    "roi_max": [96, 128, 128],
}
FEATURE_CHANNELS = 32
NUM_CLASSES = 3
MODES = ("eager-f32", "eager-bf16", "compile-bf16")
STAGES = ("tokenize", "click encoding", "label assignment", "assign FFN", "output head")
STAGE_CHECK_MAX_ERROR = 1e-6

# ----------------------------------------------------------------------------------------------
# Importing the reference without its nnU-Net and bundle dependencies
# ----------------------------------------------------------------------------------------------

# tis_reference imports these for the nnU-Net network and the bundle, which this script does not
# use; the GPU machine's python3 has only torch and numpy.
UNUSED_PACKAGES = ("dynamic_network_architectures", "safetensors")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support import Clock, device_name, stand_ins, time_calls  # noqa: E402

with stand_ins(*UNUSED_PACKAGES):  # only tis_reference's own imports are stood in for
    from tis_reference import TisHead, relative_l2_error

# ----------------------------------------------------------------------------------------------
# Model, inputs and FLOP count
# ----------------------------------------------------------------------------------------------


def random_head(generator):
    """TisHead (TIS-B) with every parameter drawn from generator, in eval mode, on the CPU."""
    head = TisHead.from_config(TIS_B, FEATURE_CHANNELS, NUM_CLASSES)
    with torch.no_grad():
        for name, param in head.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name == "pos_grid":
                param.copy_(0.5 * noise)
            elif name.endswith("assign_alpha"):
                param.copy_(noise)
            elif name.endswith("bias"):  # Linear, attention and LayerNorm biases
                param.copy_(0.1 * noise)
            elif param.ndim == 1:  # LayerNorm weights
                param.copy_(1 + 0.1 * noise)
            else:  # Linear and attention weights [out, in]
                param.copy_(noise / math.sqrt(param.shape[1]))
    return head.eval()


def spread_clicks(roi, n_clicks):
    """Clicks [n, 4] (z, y, x, class) inside the ROI, classes cycling 0, 1, .., K−1.

    Click i sits at fraction ((s·i mod n) + 0.5)/n of each axis with s = 1, 3, 7 for z, y, x:
    n distinct positions spread over the ROI whenever n is coprime with 3 and 7 (n = 10).
    """
    rows = []
    for i in range(n_clicks):
        position = [
            int(((step * i) % n_clicks + 0.5) / n_clicks * extent)
            for step, extent in zip((1, 3, 7), roi)
        ]
        rows.append(position + [i % NUM_CLASSES])
    return torch.tensor(rows, dtype=torch.int64)


def random_inputs(generator, roi, n_clicks):
    """(features [C_f, *roi] ~ N(0,1), probs [K, *roi] = softmax of N(0, 2²) logits, clicks)."""
    features = torch.randn(FEATURE_CHANNELS, *roi, generator=generator)
    probs = torch.softmax(2 * torch.randn(NUM_CLASSES, *roi, generator=generator), dim=0)
    return features, probs, spread_clicks(roi, n_clicks)


def flops_per_click(roi, n_clicks):
    """FLOPs (2 per multiply-accumulate) of one click, by part, counted like engine.md.

    Per token and layer: the click cross-attention with its key/value projections folded into
    the click queries (scores and weighted sum of LN(X), every head), label assignment (Q
    projection, scores + copy, output projection) and the FFN; per token once: the input
    projection and label_mlp(P) (Va, the same in every layer: tis_reference.py computes it once,
    as tis does). Work on the click tokens alone is left out.
    """
    d, h, f = TIS_B["d_model"], TIS_B["n_heads"], TIS_B["ffn_dim"]
    tokens = math.prod(roi)
    mac_per_token_layer = {
        "click cross-attention": 2 * n_clicks * h * d,
        "label assignment": d * d + 2 * n_clicks * d + d * d,
        "FFN": 2 * d * f,
    }
    n_layers = TIS_B["n_layers"]
    flops = {part: 2 * mac * tokens * n_layers for part, mac in mac_per_token_layer.items()}
    flops["input projection"] = 2 * FEATURE_CHANNELS * d * tokens
    flops["label_mlp(P)"] = 2 * (NUM_CLASSES * d + d * d) * tokens
    return flops


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@contextmanager
def stage_marks(head, clock):
    """Collects (stage, timestamp) as TisHead.forward enters each stage; yields the list.

    Forward pre-hooks on the first submodule each stage calls take the timestamps (and a forward
    hook on the head the final one), so the forward and its arithmetic are TisHead's own.
    """
    starts = [(head, "tokenize")]
    for layer in head.layers:
        starts += [
            (layer, "click encoding"),
            (layer.assign_norm_q, "label assignment"),
            (layer.assign_ffn_norm, "assign FFN"),
        ]
    starts.append((head.out_norm, "output head"))

    marks = []

    def pre_hook(stage):
        return lambda module, args: marks.append((stage, clock.mark()))

    handles = [module.register_forward_pre_hook(pre_hook(stage)) for module, stage in starts]
    handles.append(
        head.register_forward_hook(lambda module, args, output: marks.append((None, clock.mark())))
    )
    try:
        yield marks
    finally:
        for handle in handles:
            handle.remove()


def time_stages(head, run, clock, n, expected):
    """Median per-stage times (ms) of n instrumented clicks, and their median click time.

    The first instrumented click must reproduce `expected`, TisHead.forward's output.
    """
    per_click = []
    with stage_marks(head, clock) as marks:
        for i in range(n):
            marks.clear()
            clock.synchronize()
            output = run()
            clock.synchronize()
            if i == 0:
                error = relative_l2_error(output.float(), expected.float())
                assert error <= STAGE_CHECK_MAX_ERROR, f"instrumented click differs by {error:.2e}"
            totals = dict.fromkeys(STAGES, 0.0)
            for (stage, start), (_, end) in zip(marks, marks[1:]):
                totals[stage] += clock.elapsed_ms(start, end)
            per_click.append(totals)
    stages = {stage: float(np.median([click[stage] for click in per_click])) for stage in STAGES}
    return stages, float(np.median([sum(click.values()) for click in per_click]))


def peak_memory_bytes(device):
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on cpu."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench_mode(mode, head, inputs, device, clock, args, reference, total_flops):
    """One mode's results: times, percentiles, GFLOP/s, peak memory, error vs f32, compile time
    and stages; or {"error": ...} when torch.compile fails (the other modes still run)."""
    bf16 = mode.endswith("bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    result = {}
    with torch.inference_mode(), autocast:
        model = head
        if mode.startswith("compile"):
            model = torch.compile(head)
            clock.synchronize()
            start = time.perf_counter()
            try:
                model(*inputs)
            except Exception as error:  # e.g. inductor finding no C compiler
                return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"}
            clock.synchronize()
            result["compile_s"] = time.perf_counter() - start

        def run():
            return model(*inputs)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            run()
        times, logits = time_calls(run, clock, args.iters)
        result["peak_memory_bytes"] = peak_memory_bytes(device)
        if mode.startswith("eager"):
            result["stages_ms"], result["instrumented_median_ms"] = time_stages(
                head, run, clock, args.iters, logits
            )

    p10, median, p90 = np.percentile(times, [10, 50, 90])
    result.update(
        median_ms=float(median),
        p10_ms=float(p10),
        p90_ms=float(p90),
        gflops_per_s=total_flops / median / 1e6,
        rel_l2_vs_f32=relative_l2_error(logits.float(), reference),
        times_ms=times,
    )
    return result


# ----------------------------------------------------------------------------------------------
# Command line and report
# ----------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--roi", type=int, nargs=3, metavar=("Z", "Y", "X"), default=[96, 128, 128])
    add("--clicks", type=int, default=10)
    add("--iters", type=int, default=50, help="timed clicks per mode (median over them)")
    add("--warmup", type=int, default=5, help="untimed clicks per mode before them")
    add(
        "--modes",
        help=f"comma list of {', '.join(MODES)} (default: all on cuda, eager-f32 on cpu)",
    )
    add("--threads", type=int, help="CPU threads (default: torch's)")
    add("--seed", type=int, default=0)
    add("--json", type=Path, help="write all results to this file")
    add("--tf32", action="store_true", help="allow TF32 in f32 matmuls and convolutions")
    args = parser.parse_args()

    default_modes = MODES if args.device == "cuda" else MODES[:1]
    args.modes = args.modes.split(",") if args.modes else list(default_modes)
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if args.iters < 1 or args.clicks < 1:
        parser.error("--iters and --clicks must be at least 1")
    return args


def print_report(results, device):
    memory = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"\n{'mode':<14}{'median ms':>11}{'p10 ms':>10}{'p90 ms':>10}{'GFLOP/s':>10}"
          f"{memory:>15}{'rel.L2 vs f32':>15}{'compile s':>11}")
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:<14}failed: {r['error']}")
            continue
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        print(f"{mode:<14}{r['median_ms']:>11.2f}{r['p10_ms']:>10.2f}{r['p90_ms']:>10.2f}"
              f"{r['gflops_per_s']:>10.1f}{r['peak_memory_bytes'] / 2**20:>15.0f}"
              f"{r['rel_l2_vs_f32']:>15.1e}{compile_s:>11}")

    staged = {mode: r["stages_ms"] for mode, r in results.items() if "stages_ms" in r}
    if not staged:
        return
    print(f"\n{'stage (median ms per click)':<28}" + "".join(f"{mode:>20}" for mode in staged))
    totals = {mode: sum(stages.values()) for mode, stages in staged.items()}
    for stage in STAGES:
        cells = (
            f"{stages[stage]:.2f} ({100 * stages[stage] / totals[mode]:4.1f}%)"
            for mode, stages in staged.items()
        )
        print(f"{stage:<28}" + "".join(f"{cell:>20}" for cell in cells))
    print(f"{'sum of stages':<28}" + "".join(f"{totals[mode]:>20.2f}" for mode in staged))
    instrumented = (results[mode]["instrumented_median_ms"] for mode in staged)
    print(f"{'instrumented click':<28}" + "".join(f"{ms:>20.2f}" for ms in instrumented))


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32

    generator = torch.Generator().manual_seed(args.seed)
    head = random_head(generator).to(device)
    features, probs, clicks = random_inputs(generator, args.roi, args.clicks)
    inputs = (features.to(device), probs.to(device), clicks.to(device))
    flops = flops_per_click(args.roi, args.clicks)
    total_flops = sum(flops.values())

    print(f"device {device_name(device)} ({device.type}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, TF32 {'on' if args.tf32 else 'off'}")
    print(f"TIS-B {json.dumps(TIS_B)}, C_f {FEATURE_CHANNELS}, K {NUM_CLASSES}")
    print(f"ROI {'x'.join(map(str, args.roi))} = {math.prod(args.roi)} tokens, "
          f"{args.clicks} clicks, seed {args.seed}, "
          f"{args.warmup} warm-up + {args.iters} timed clicks per mode")
    print(f"FLOPs per click (engine.md count): {total_flops / 1e9:.1f} G = "
          + ", ".join(f"{part} {value / 1e9:.1f} G" for part, value in flops.items()), flush=True)

    clock = Clock(device)
    with torch.inference_mode():
        reference = head(*inputs).float()
    results = {}
    for mode in args.modes:
        result = bench_mode(mode, head, inputs, device, clock, args, reference, total_flops)
        failed = "error" in result
        status = f"failed: {result['error']}" if failed else f"median {result['median_ms']:.2f} ms"
        print(f"{mode}: {status}", flush=True)
        results[mode] = result

    print_report(results, device)
    if args.json:
        report = {
            "device": device_name(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "tf32": args.tf32,
            "config": TIS_B,
            "feature_channels": FEATURE_CHANNELS,
            "num_classes": NUM_CLASSES,
            "roi": args.roi,
            "clicks": clicks.tolist(),
            "seed": args.seed,
            "warmup": args.warmup,
            "iters": args.iters,
            "flops_per_click": {**flops, "total": total_flops},
            "peak_memory": (
                "torch.cuda.max_memory_allocated per mode"
                if device.type == "cuda"
                else "peak RSS of the process so far (cumulative over modes)"
            ),
            "modes": results,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
