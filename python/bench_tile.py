"""One nnU-Net tile forward: `tis bench --tile` against PyTorch, same weights, in one run, on the
CPU (same thread count) or a GPU (--device cuda); median time, GFLOP/s and peak memory of each.

For each plan the script writes a random-weight bundle (timing does not need trained weights),
then times the network's forward pass over one random patch in two child processes, one after
the other, so that each reports its own peak resident memory:
  - PyTorch: the reference network of python/tis_reference.py (dynamic-network-architectures'
    PlainConvUNet) in eager float32 under torch.no_grad(), torch.set_num_threads(threads);
  - tis: `tis bench --tile -m BUNDLE --json`, RAYON_NUM_THREADS=threads.
FLOPs are counted as in shared/design/nnunet-inference.md §5.2 (`NetworkPlan::macs` in tis,
checked against that table by a unit test), so both GFLOP/s use the same count.

Plans (bench_predictor.PLANS): "small" (features 16…128, 3³ kernels, patch 48×96×96),
"pancreas" (MSD Task07 3d_fullres: features 32…320, [1,3,3] then 3³, patch 40×224×224) and
"generic128" (features 32…320, 3³ kernels, strides 1 then 2, patch 128×128×128). On the CPU
small and pancreas by default (issue 8), on cuda pancreas and generic128 (issue 7).

With --device cuda, in one process on the GPU: PyTorch (cudnn.benchmark on, as nnU-Net sets it)
in the modes of CUDA_MODES, all under torch.inference_mode(): eager under f16 and bf16 autocast,
each also with the network and the tile in channels_last_3d ("-cl"), and torch.compile (default
mode) under bf16 autocast; the median, p10 and p90 over --iters forwards after --warmup, each
started on an idle GPU and timed by CUDA events, and torch.cuda.max_memory_allocated per mode.
The tis side is `tis bench --tile --device cuda --precision f16` (its own --tis-iters and
--tis-warmup, stopped after --tis-timeout seconds). Per plan tis runs first, then the eager
modes; the compiled mode of every plan comes last, and --json is rewritten after each result, so
a run stopped early keeps what finished. A mode or a tis run that fails is reported and the rest
go on. FLOPs: tis's count when it ran, else the same count taken from the forward's shapes.
The profile: each eager mode and tis run up to STEP_FORWARDS more forwards with the GPU
synchronised after each step (encoder stage, transposed convolution, decoder stage, seg layer),
and report each step's median (scripts/bench_table.py --tile sets them side by side).

    python python/bench_tile.py --threads 2 --json out/bench_tile.json
    python python/bench_tile.py --plans small --iters 10 --warmup 2
    python3 python/bench_tile.py --device cuda --tis gpu-bin/tis --iters 20 --warmup 3 \\
        --tis-iters 3 --tis-warmup 1 --tis-timeout 60 --json "$OUT/tile.json"
"""

import argparse
import copy
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    from bench_predictor import PLANS, bench_spec  # noqa: E402
    from bench_support import Clock, device_name, time_calls  # noqa: E402
    from make_fixtures import make_model, write_bundle  # noqa: E402
    from tis_reference import load_bundle  # noqa: E402
except ModuleNotFoundError as error:  # the GPU machine has no dynamic_network_architectures
    sys.exit(f"{Path(sys.argv[0]).name} needs the Python package {error.name!r}: on the GPU machine, install the wheels "
             "that scripts/build-gpu-bin.sh gathers in gpu-bin/wheels (scripts/gpu-check.sh does)")

DEFAULT_PLANS = {"cpu": ["small", "pancreas"], "cuda": ["pancreas", "generic128"]}
# mode: (autocast dtype, channels_last_3d, torch.compile)
CUDA_MODES = {
    "eager-f16": (torch.float16, False, False),
    "eager-bf16": (torch.bfloat16, False, False),
    "eager-f16-cl": (torch.float16, True, False),
    "eager-bf16-cl": (torch.bfloat16, True, False),
    "compile-bf16": (torch.bfloat16, False, True),
}
# Most eager forwards run again for a per-step profile (as `tis bench --tile`'s PROFILED_RUNS).
STEP_FORWARDS = 5
# What --json holds for a run in progress: what a run stopped from outside leaves behind.
UNFINISHED = {"error": "started, did not finish (stopped by the caller's timeout?)"}


def torch_child(bundle, threads, iters, warmup):
    """Runs in a child process: times the PyTorch forward, prints one JSON line."""
    torch.set_num_threads(threads)
    net, _, metadata = load_bundle(bundle)
    net.eval()
    patch = json.loads(metadata["plans"])["configurations"][metadata["configuration"]]["patch_size"]
    tile = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(1))
    seconds = []
    with torch.no_grad():
        for i in range(warmup + iters):
            start = time.perf_counter()
            net(tile)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def vector_extensions():
    """The CPU's SIMD extensions that matter for f32/bf16 GEMMs (Linux /proc/cpuinfo)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in flags if f.startswith(("avx", "fma", "amx"))]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--plans", nargs="+", choices=sorted(PLANS),
                        help="default: small pancreas on cpu, pancreas generic128 on cuda")
    parser.add_argument("--tis", default="target/release/tis")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path)
    cuda = parser.add_argument_group("--device cuda only")
    cuda.add_argument("--modes", help=f"comma list of {', '.join(CUDA_MODES)} (default: all)")
    cuda.add_argument("--tis-iters", type=int, help="timed tis forwards (default: --iters)")
    cuda.add_argument("--tis-warmup", type=int, help="untimed tis forwards first (default: --warmup)")
    cuda.add_argument("--tis-timeout", type=float, help="seconds before a `tis bench --tile` is stopped")
    parser.add_argument("--torch-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.plans = args.plans or DEFAULT_PLANS[args.device]
    args.modes = args.modes.split(",") if args.modes else list(CUDA_MODES)
    unknown = sorted(set(args.modes) - set(CUDA_MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(CUDA_MODES)}")
    args.tis_iters = args.iters if args.tis_iters is None else args.tis_iters
    args.tis_warmup = args.warmup if args.tis_warmup is None else args.tis_warmup
    if min(args.iters, args.tis_iters) < 1:
        parser.error("--iters and --tis-iters must be at least 1")
    return args


def main():
    args = parse_args()
    if args.torch_child:
        return torch_child(args.torch_child, args.threads, args.iters, args.warmup)
    if args.device == "cuda":
        return main_cuda(args)
    return main_cpu(args)


def main_cpu(args):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    report = {"cpu": cpu, "vector_extensions": vector_extensions(), "threads": args.threads,
              "torch": torch.__version__, "plans": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.plans:
            bundle = Path(tmp) / f"{name}.safetensors"
            spec = bench_spec(seed=0, **PLANS[name])
            write_bundle(bundle, *make_model(spec), spec)
            child = subprocess.run(
                [sys.executable, __file__, "--torch-child", str(bundle), "--threads", str(args.threads),
                 "--iters", str(args.iters), "--warmup", str(args.warmup)],
                check=True, capture_output=True, text=True)
            pytorch = json.loads(child.stdout.strip().splitlines()[-1])
            tis_json = Path(tmp) / f"{name}.json"
            subprocess.run(
                [args.tis, "bench", "--tile", "-m", str(bundle), "--iters", str(args.iters),
                 "--warmup", str(args.warmup), "--json", str(tis_json)],
                check=True, capture_output=True, env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)))
            tis = json.loads(tis_json.read_text())
            gflop = tis["gflop_per_tile"]
            report["plans"][name] = {
                "features": PLANS[name]["features"], "patch": PLANS[name]["patch"], "gflop_per_tile": gflop,
                "tis": {"median_s": tis["median_s"], "gflop_per_s": gflop / tis["median_s"],
                        "peak_rss_mb": tis["peak_rss_mb"]},
                "pytorch": {"median_s": float(np.median(pytorch["seconds"])), "seconds": pytorch["seconds"],
                            "gflop_per_s": gflop / float(np.median(pytorch["seconds"])),
                            "peak_rss_mb": pytorch["peak_rss_mb"]},
            }

    print(f"{report['cpu']}, {args.threads} threads, torch {torch.__version__}, {args.iters} timed forwards "
          f"after {args.warmup}; vector extensions: {' '.join(report['vector_extensions'])}")
    print(f"{'plan':<10}{'patch':>13}{'GFLOP':>8}{'tis':>10}{'GFLOP/s':>9}{'peak MB':>9}"
          f"{'PyTorch':>10}{'GFLOP/s':>9}{'peak MB':>9}{'PyTorch/tis':>13}")
    for name, r in report["plans"].items():
        t, p = r["tis"], r["pytorch"]
        print(f"{name:<10}{'×'.join(map(str, r['patch'])):>13}{r['gflop_per_tile']:>8.1f}"
              f"{t['median_s']:>9.3f}s{t['gflop_per_s']:>9.0f}{t['peak_rss_mb']:>9.0f}"
              f"{p['median_s']:>9.3f}s{p['gflop_per_s']:>9.0f}{p['peak_rss_mb']:>9.0f}"
              f"{p['median_s'] / t['median_s']:>12.2f}×")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------------------------
# --device cuda
# ----------------------------------------------------------------------------------------------


def conv_gflop(net, patch):
    """GFLOP (2 per multiply-accumulate) of one forward's convolutions, transposed ones included,
    from the shapes a forward on the meta device produces, padding ignored: the count of
    nnunet-inference.md §5.2 that tis's NetworkPlan::macs makes."""
    meta = copy.deepcopy(net).to("meta")
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        taps = math.prod(module.kernel_size)
        if isinstance(module, torch.nn.ConvTranspose3d):
            macs += inputs[0].numel() * module.out_channels * taps
        else:
            macs += output.numel() * module.in_channels // module.groups * taps

    for module in meta.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            module.register_forward_hook(count)
    with torch.no_grad():
        meta(torch.empty(1, meta.encoder.stages[0][0].convs[0].conv.in_channels, *patch, device="meta"))
    return 2 * macs / 1e9


def step_times(model, tile, clock, forwards):
    """Per-step medians (ms) over `forwards` eager forwards, the device synchronised after each
    step, the steps and their names as `tis bench --tile` reports them: encoder stages, each
    decoder stage's transposed convolution and conv blocks (the concatenation included), the
    seg layer."""
    steps = [(f"encoder {s}", stage) for s, stage in enumerate(model.encoder.stages)]
    for j, (up, stage) in enumerate(zip(model.decoder.transpconvs, model.decoder.stages)):
        steps += [(f"upsample {j}", up), (f"decoder {j}", stage)]
    steps.append(("seg layer", model.decoder.seg_layers[-1]))
    times = {name: [] for name, _ in steps}
    last = 0.0

    def finished(name):
        def hook(module, inputs, output):
            nonlocal last
            clock.synchronize()
            now = time.perf_counter()
            times[name].append(now - last)
            last = now
        return hook

    handles = [module.register_forward_hook(finished(name)) for name, module in steps]
    try:
        for _ in range(forwards):
            clock.synchronize()
            last = time.perf_counter()
            model(tile)
    finally:
        for handle in handles:
            handle.remove()
    return [{"step": name, "median_ms": float(np.median(t)) * 1e3} for name, t in times.items()]


def time_torch_cuda(net, patch, mode, args, gflop, device=torch.device("cuda")):
    """One PyTorch mode on the GPU: its times, GFLOP/s and peak memory, or {"error": ...}. (On
    device cpu it runs the same code without the memory figure: a check of this function.)"""
    dtype, channels_last, compiled = CUDA_MODES[mode]
    cuda, clock = device.type == "cuda", Clock(device)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    result = {}
    try:
        model = copy.deepcopy(net).to(device, memory_format=memory_format)
        tile = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(1))
        tile = tile.to(device).contiguous(memory_format=memory_format)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
            if compiled:
                model = torch.compile(model)
                start = time.perf_counter()
                model(tile)
                clock.synchronize()
                result["compile_s"] = time.perf_counter() - start
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.warmup):
                model(tile)
            times, output = time_calls(lambda: model(tile), clock, args.iters)
            if not compiled:
                result["steps"] = step_times(model, tile, clock, min(args.iters, STEP_FORWARDS))
        if cuda:
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["output_dtype"] = str(output.dtype).removeprefix("torch.")
    except Exception as error:  # out of memory, a compiler missing: the other modes still run
        return {**result, "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"}
    finally:
        model = tile = output = None
        if cuda:
            torch.cuda.empty_cache()
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return {**result, "median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90),
            "gflop_per_s": gflop / median * 1e3, "times_ms": times}


def time_tis_cuda(bundle, args, tmp):
    """`tis bench --tile --device cuda --precision f16` on the bundle: its report, or {"error": ...}."""
    out = Path(tmp) / f"{bundle.stem}-tis.json"
    command = [args.tis, "bench", "--tile", "--device", "cuda", "--precision", "f16", "-m", str(bundle),
               "--iters", str(args.tis_iters), "--warmup", str(args.tis_warmup), "--json", str(out)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=args.tis_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.tis_timeout:.0f} s (--tis-timeout)"}
    except subprocess.CalledProcessError as error:
        lines = (error.stderr or "").strip().splitlines()
        return {"error": f"exit {error.returncode}: {lines[-1] if lines else 'no message'}"}
    except OSError as error:
        return {"error": f"{type(error).__name__}: {error}"}
    tis = json.loads(out.read_text())
    return {"precision": tis["precision"], "device": tis["device"], "median_ms": tis["median_s"] * 1e3,
            "p10_ms": tis["p10_s"] * 1e3, "p90_ms": tis["p90_s"] * 1e3, "gflop_per_tile": tis["gflop_per_tile"],
            "gflop_per_s": tis["gflop_per_tile"] / tis["median_s"], "peak_rss_mb": tis["peak_rss_mb"],
            "iters": tis["iters"], "steps": tis["steps"], "kernels": tis.get("kernels")}


def print_cuda_report(report):
    print(f"\n{report['device']}, torch {report['torch']}, cuDNN {report['cudnn']}, cudnn.benchmark on; "
          f"PyTorch {report['iters']} timed forwards after {report['warmup']}, "
          f"tis {report['tis_iters']} after {report['tis_warmup']}")
    print(f"{'plan':<12}{'patch':>12}{'GFLOP':>8}  {'engine':<22}{'median ms':>10}{'p10':>9}{'p90':>9}"
          f"{'TFLOP/s':>9}{'peak MiB':>10}{'PyTorch/tis':>13}")
    for name, r in report["plans"].items():
        tis = r.get("tis", {})
        rows = [("tis f16 (cuda)", tis)] + [(f"torch {mode}", m) for mode, m in r["pytorch"].items()]
        first = f"{name:<12}{'×'.join(map(str, r['patch'])):>12}{r['gflop_per_tile']:>8.1f}  "
        for i, (engine, m) in enumerate(rows):
            lead = first if i == 0 else " " * len(first)
            if "median_ms" not in m:
                print(f"{lead}{engine:<22}{m.get('error', 'not run')}")
                continue
            peak = m.get("peak_memory_mb", m.get("peak_rss_mb"))
            ratio = (f"{m['median_ms'] / tis['median_ms']:>12.3f}×"
                     if engine.startswith("torch") and "median_ms" in tis else "")
            print(f"{lead}{engine:<22}{m['median_ms']:>10.2f}{m['p10_ms']:>9.2f}{m['p90_ms']:>9.2f}"
                  f"{m['gflop_per_s'] / 1e3:>9.1f}{peak:>10.0f}{ratio}")
    print("peak MiB: torch.cuda.max_memory_allocated per mode; tis: the process's peak RSS (host memory)")


def main_cuda(args):
    if not torch.cuda.is_available():
        sys.exit("bench_tile.py --device cuda: no CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True  # as nnU-Net's predictor sets it on a GPU
    device = torch.device("cuda")
    report = {"device": device_name(device), "device_type": "cuda", "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": True, "iters": args.iters,
              "warmup": args.warmup, "tis_iters": args.tis_iters, "tis_warmup": args.tis_warmup,
              "peak_memory": "torch.cuda.max_memory_allocated per mode; tis: peak RSS of its process",
              "plans": {}}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))

    def log(name, engine, result):
        status = f"median {result['median_ms']:.2f} ms" if "median_ms" in result else result["error"]
        print(f"{name} {engine}: {status}", flush=True)

    nets = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.plans:
            bundle = Path(tmp) / f"{name}.safetensors"
            spec = bench_spec(seed=0, **PLANS[name])
            write_bundle(bundle, *make_model(spec), spec)
            net, _, _ = load_bundle(bundle)
            nets[name] = net.eval()
            patch = PLANS[name]["patch"]
            entry = report["plans"][name] = {
                "features": PLANS[name]["features"], "patch": patch, "gflop_per_tile": conv_gflop(net, patch),
                "tis": dict(UNFINISHED), "pytorch": {},
            }
            save()
            entry["tis"] = time_tis_cuda(bundle, args, tmp)
            log(name, "tis f16", entry["tis"])
            if "gflop_per_tile" in entry["tis"]:
                counted, ours = entry["gflop_per_tile"], entry["tis"]["gflop_per_tile"]
                if abs(counted - ours) > 1e-9 * ours:
                    print(f"{name}: FLOP counts differ: tis {ours:.3f} GFLOP, this script {counted:.3f}")
                entry["gflop_per_tile"] = ours
            save()
            for mode in (m for m in args.modes if not CUDA_MODES[m][2]):
                entry["pytorch"][mode] = dict(UNFINISHED)
                save()
                entry["pytorch"][mode] = time_torch_cuda(net, patch, mode, args, entry["gflop_per_tile"])
                log(name, mode, entry["pytorch"][mode])
                save()
        for mode in (m for m in args.modes if CUDA_MODES[m][2]):  # compiling takes longest: last
            for name in args.plans:
                entry = report["plans"][name]
                entry["pytorch"][mode] = dict(UNFINISHED)
                save()
                entry["pytorch"][mode] = time_torch_cuda(nets[name], entry["patch"], mode, args,
                                                         entry["gflop_per_tile"])
                log(name, mode, entry["pytorch"][mode])
                save()
    print_cuda_report(report)


if __name__ == "__main__":
    main()
