#!/usr/bin/env python3
"""Prints the benchmark tables of scripts/gpu-check.sh from the JSON files of one run:
  - per click (issue 3): `tis bench --json` results beside python/bench_head.py's PyTorch modes,
    with ratios and the compute floor;
  - one nnU-Net tile forward (issue 7, --tile): python/bench_tile.py --device cuda, tis f16 and
    each PyTorch mode, ratio PyTorch / tis, and per step tis beside the first eager mode;
  - whole-volume segmentation (issue 7, --predictor): python/bench_predictor.py --device cuda,
    seconds per phase of both engines and the ratio nnU-Net / tis.
A file that is missing or unreadable (its step failed or timed out) is named, and the rest print.

Usage: bench_table.py [--tile TILE_JSON] [--predictor PREDICTOR_JSON] [TIS_JSON ... TORCH_JSON]
(standard library only)
"""

import json
import sys

# Measured on the H100 by engine.md: dense bf16 GEMM rate and copy bandwidth.
PEAK_TFLOPS = 798.0
BANDWIDTH_TBS = 3.0
# Kernels of tis's per-kernel profile that the tables show (the JSON has them all).
KERNEL_ROWS = 8


def load(path):
    """The JSON at path, or None after saying why there is none."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        print(f"no result in {path} (its step failed or timed out): {type(error).__name__}: {error}")
        return None


def head_table(tis_paths, torch_path):
    tis = [t for t in map(load, tis_paths) if t is not None]
    torch = load(torch_path)
    if not tis and torch is None:
        return
    rows = [(f"tis {t['precision']}", t["median_ms"], t["p10_ms"], t["p90_ms"]) for t in tis]
    flop = None
    if torch is not None:
        flop = torch["flops_per_click"]["total"]
        roi = torch["roi"]
        tokens = roi[0] * roi[1] * roi[2]
        d, layers = torch["config"]["d_model"], torch["config"]["n_layers"]
        # X in 16-bit, read twice and written once per layer (the fused design of engine.md).
        bytes_floor = tokens * d * 2 * 3 * layers
        print(f"\nper-click latency, TIS-B, ROI {roi[0]}×{roi[1]}×{roi[2]}, {len(torch['clicks'])} clicks, {torch['device']}")
        print(f"floors: compute {flop / (PEAK_TFLOPS * 1e12) * 1e3:.2f} ms ({flop / 1e12:.2f} TFLOP at {PEAK_TFLOPS:.0f} TFLOP/s), "
              f"memory {bytes_floor / (BANDWIDTH_TBS * 1e12) * 1e3:.2f} ms ({bytes_floor / 1e9:.1f} GB at {BANDWIDTH_TBS} TB/s)")
        rows += [(f"torch {mode}", m["median_ms"], m["p10_ms"], m["p90_ms"])
                 for mode, m in torch["modes"].items() if "median_ms" in m]
    else:
        print("\nper-click latency, TIS-B (no PyTorch result: no FLOP count)")
    best_tis = min((t["median_ms"] for t in tis), default=None)
    print(f"{'engine':<22}{'median ms':>11}{'p10':>9}{'p90':>9}{'TFLOP/s':>9}{'× tis':>8}")
    for name, median, p10, p90 in rows:
        rate = f"{flop / median / 1e9:>9.1f}" if flop else f"{'-':>9}"
        ratio = f"{median / best_tis:>8.2f}" if best_tis else f"{'-':>8}"
        print(f"{name:<22}{median:>11.2f}{p10:>9.2f}{p90:>9.2f}{rate}{ratio}")
    if torch is not None:
        for mode, m in torch["modes"].items():
            if "median_ms" not in m:
                print(f"torch {mode}: {m.get('error', 'no result')}")
    for t in tis:
        kernel_table(t.get("kernels"), f"tis {t['precision']}, per click")


def kernel_table(profile, what):
    """The kernels of a `tis bench` report that took the most device time (events around each
    launch), and the time of the median run outside them (gaps between launches, copies, host)."""
    if not profile:
        return
    kernels = profile["by_kernel"]
    total = profile["device_ms"]
    print(f"  {what}: device time by kernel (sum {total:.2f} ms)")
    for k in kernels[:KERNEL_ROWS]:
        print(f"    {k['kernel']:<36}{k['launches']:>7.1f} launches{k['ms']:>10.3f} ms{100 * k['ms'] / total:>6.1f} %")
    rest = kernels[KERNEL_ROWS:]
    if rest:
        print(f"    ({len(rest)} more: {sum(k['ms'] for k in rest):.3f} ms)")
    outside = profile["outside_kernels_ms"]
    print(f"    outside the kernels: {outside:.3f} ms of the median {total + outside:.3f} ms (launch gaps, copies, host work)")


def tile_table(path):
    report = load(path)
    if report is None:
        return
    print(f"\none nnU-Net tile forward (issue 7), {report['device']}, torch {report['torch']}, "
          f"cuDNN {report.get('cudnn')}; ratio = PyTorch ms / tis ms (below 1: PyTorch faster)")
    modes = []
    for plan in report["plans"].values():
        modes += [m for m in plan["pytorch"] if m not in modes]
    print(f"{'plan':<12}{'patch':>12}{'GFLOP':>8}{'tis f16 ms':>12}" + "".join(f"{m:>15}" for m in modes))
    for name, plan in report["plans"].items():
        tis = plan.get("tis", {}).get("median_ms")
        lead = f"{name:<12}{'×'.join(map(str, plan['patch'])):>12}{plan['gflop_per_tile']:>8.1f}"
        ms = [plan["pytorch"].get(m, {}).get("median_ms") for m in modes]
        print(lead + (f"{tis:>12.2f}" if tis else f"{'-':>12}")
              + "".join(f"{v:>15.2f}" if v else f"{'-':>15}" for v in ms))
        ratios = [f"{v / tis:>14.3f}×" if v and tis else f"{'-':>15}" for v in ms]
        print(f"{'  PyTorch/tis':<32}{'':>12}" + "".join(ratios))
        rates = [plan["pytorch"].get(m, {}).get("gflop_per_s") for m in modes]
        tis_rate = plan.get("tis", {}).get("gflop_per_s")
        print(f"{'  TFLOP/s':<32}" + (f"{tis_rate / 1e3:>12.1f}" if tis_rate else f"{'-':>12}")
              + "".join(f"{r / 1e3:>15.1f}" if r else f"{'-':>15}" for r in rates))
        failures = [("tis", plan["tis"])] if "error" in plan.get("tis", {}) else []
        failures += [(f"torch {m}", r) for m, r in plan["pytorch"].items() if "error" in r]
        for engine, r in failures:
            print(f"  {engine}: {r['error']}")
        missing = [m for m in modes if m not in plan["pytorch"]]
        if missing:
            print(f"  not run (step stopped first?): {', '.join(missing)}")
        step_table(plan)
        kernel_table(plan.get("tis", {}).get("kernels"), "tis f16, per tile")


def step_table(plan):
    """tis's per-step profile of a tile forward beside the first eager PyTorch mode's."""
    steps = plan.get("tis", {}).get("steps")
    if not steps:
        return
    mode, torch_steps = next(((m, r["steps"]) for m, r in plan["pytorch"].items() if "steps" in r), (None, []))
    torch_ms = {step["step"]: step["median_ms"] for step in torch_steps}
    print("  per step, synchronised after each (medians)")
    print(f"    {'step':<12}{'GFLOP':>8}{'tis ms':>9}{'TFLOP/s':>9}"
          + (f"{mode + ' ms':>18}{'PyTorch/tis':>13}" if mode else ""))
    for step in steps:
        name, ms = step["step"], step["median_ms"]
        other = torch_ms.get(name)
        cells = f"{other:>18.2f}{other / ms:>12.2f}×" if other else ""
        print(f"    {name:<12}{step['gflop']:>8.1f}{ms:>9.2f}{step['gflop'] / ms:>9.1f}{cells}")
    total = sum(step["median_ms"] for step in steps)
    other = sum(torch_ms.values())
    print(f"    {'sum':<12}{'':>8}{total:>9.2f}{'':>9}" + (f"{other:>18.2f}{other / total:>12.2f}×" if other else ""))


def predictor_table(path):
    report = load(path)
    if report is None:
        return
    runs = report.get("nnunet_runs", [])
    tis = report.get("tis_seconds")
    mirroring = "with" if report.get("mirroring") else "no"
    print(f"\nwhole-volume segmentation (issue 7), {report['image']} {'×'.join(map(str, report['image_shape']))}"
          f" → grid {report.get('grid')}, {report['device']}, {mirroring} test-time mirroring")
    columns = [("tis", tis)] + [(f"nnU-Net run {i + 1}", run) for i, run in enumerate(runs)]
    print(f"{'seconds':<16}" + "".join(f"{name:>15}" for name, _ in columns))
    for phase in ["preprocessing", "sliding window", "export", "total"]:
        cells = [f"{t[phase]:.2f}" if t and phase in t else "-" for _, t in columns]
        print(f"{phase:<16}" + "".join(f"{cell:>15}" for cell in cells))
    if tis:
        print(f"{'tis process':<16}{tis['process']:>15.2f}   (the command's wall time: model, image, output file included)")
    engines = report.get("engines", {})
    for engine, status in engines.items():
        if status != "ok":
            print(f"{engine}: {status}")
    if tis and runs:
        nnunet = runs[-1]
        agreement = report.get("agreement")
        print(f"ratio nnU-Net / tis (last nnU-Net run, totals): {nnunet['total'] / tis['total']:.2f}; "
              f"process: {nnunet['total'] / tis['process']:.2f}; voxel agreement "
              + ("not measured" if agreement is None else f"{agreement:.5f}"))


def main(argv):
    named = {"--tile": None, "--predictor": None}
    positional = []
    args = iter(argv)
    for arg in args:
        if arg in named:
            named[arg] = next(args, None)
            if named[arg] is None:
                sys.exit(__doc__)
        else:
            positional.append(arg)
    if len(positional) == 1 or not (positional or named["--tile"] or named["--predictor"]):
        sys.exit(__doc__)
    if positional:
        head_table(positional[:-1], positional[-1])
    if named["--tile"]:
        tile_table(named["--tile"])
    if named["--predictor"]:
        predictor_table(named["--predictor"])


if __name__ == "__main__":
    main(sys.argv[1:])
