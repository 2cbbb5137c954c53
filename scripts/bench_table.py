#!/usr/bin/env python3
"""Prints the per-click benchmark table of scripts/gpu-check.sh: `tis bench --json` results beside
python/bench_head.py's PyTorch modes from the same run, with ratios and the compute floor.

Usage: bench_table.py TIS_JSON [TIS_JSON ...] TORCH_JSON   (standard library only)
"""

import json
import sys

# Measured on the H100 by engine.md: dense bf16 GEMM rate and copy bandwidth.
PEAK_TFLOPS = 798.0
BANDWIDTH_TBS = 3.0


def main(paths):
    *tis_paths, torch_path = paths
    tis = [json.load(open(p)) for p in tis_paths]
    torch = json.load(open(torch_path))
    flop = torch["flops_per_click"]["total"]
    roi = torch["roi"]
    tokens = roi[0] * roi[1] * roi[2]
    d, layers = torch["config"]["d_model"], torch["config"]["n_layers"]
    # X in 16-bit, read twice and written once per layer (the fused design of engine.md).
    bytes_floor = tokens * d * 2 * 3 * layers
    print(f"\nper-click latency, TIS-B, ROI {roi[0]}×{roi[1]}×{roi[2]}, {len(torch['clicks'])} clicks, {torch['device']}")
    print(f"floors: compute {flop / (PEAK_TFLOPS * 1e12) * 1e3:.2f} ms ({flop / 1e12:.2f} TFLOP at {PEAK_TFLOPS:.0f} TFLOP/s), "
          f"memory {bytes_floor / (BANDWIDTH_TBS * 1e12) * 1e3:.2f} ms ({bytes_floor / 1e9:.1f} GB at {BANDWIDTH_TBS} TB/s)")
    rows = [(f"tis {t['precision']}", t["median_ms"], t["p10_ms"], t["p90_ms"]) for t in tis]
    rows += [(f"torch {mode}", m["median_ms"], m["p10_ms"], m["p90_ms"])
             for mode, m in torch["modes"].items() if "median_ms" in m]
    best_tis = min(t["median_ms"] for t in tis)
    print(f"{'engine':<22}{'median ms':>11}{'p10':>9}{'p90':>9}{'TFLOP/s':>9}{'× tis':>8}")
    for name, median, p10, p90 in rows:
        print(f"{name:<22}{median:>11.2f}{p10:>9.2f}{p90:>9.2f}{flop / median / 1e9:>9.1f}{median / best_tis:>8.2f}")
    for mode, m in torch["modes"].items():
        if "median_ms" not in m:
            print(f"torch {mode}: {m.get('error', 'no result')}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
