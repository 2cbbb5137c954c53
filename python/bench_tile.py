"""One nnU-Net tile forward on the CPU: `tis bench --tile` against PyTorch, same weights, same
thread count, in one run; median seconds, GFLOP/s and peak memory of each.

For each plan the script writes a random-weight bundle (timing does not need trained weights),
then times the network's forward pass over one random patch in two child processes, one after
the other, so that each reports its own peak resident memory:
  - PyTorch: the reference network of python/tis_reference.py (dynamic-network-architectures'
    PlainConvUNet) in eager float32 under torch.no_grad(), torch.set_num_threads(threads);
  - tis: `tis bench --tile -m BUNDLE --json`, RAYON_NUM_THREADS=threads.
FLOPs are counted as in shared/design/nnunet-inference.md §5.2 (`NetworkPlan::macs` in tis,
checked against that table by a unit test), so both GFLOP/s use the same count.

Plans (issue 8): "small" (features 16…128, 3³ kernels, patch 48×96×96) and "pancreas"
(MSD Task07 3d_fullres: features 32…320, [1,3,3] then 3³, patch 40×224×224).

    python python/bench_tile.py --threads 2 --json out/bench_tile.json
    python python/bench_tile.py --plans small --iters 10 --warmup 2
"""

import argparse
import json
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
from bench_predictor import bench_spec  # noqa: E402
from make_fixtures import make_model, write_bundle  # noqa: E402
from tis_reference import load_bundle  # noqa: E402

PLANS = {
    "small": dict(features=[16, 32, 64, 128], patch=[48, 96, 96], spacing=[3.0, 2.0, 2.0]),
    "pancreas": dict(
        features=[32, 64, 128, 256, 320, 320], patch=[40, 224, 224], spacing=[2.5, 0.80273, 0.80273],
        kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5,
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    ),
}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", nargs="+", choices=sorted(PLANS), default=["small", "pancreas"])
    parser.add_argument("--tis", default="target/release/tis")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--torch-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        return torch_child(args.torch_child, args.threads, args.iters, args.warmup)

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


if __name__ == "__main__":
    main()
