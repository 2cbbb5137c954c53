#!/usr/bin/env python3
"""One line per profiled kernel from the text report of Nsight Compute (`ncu --section
SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section
ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis ...`), for the profile step of scripts/gpu-check.sh: the kernel and its
grid, duration, SM and memory throughput (% of peak), achieved occupancy, registers per thread,
warp cycles per issued instruction (high: the warps mostly wait, on memory or barriers), the
share of issue slots used and that of the busiest pipe (SM Busy: tensor cores, FMA, special
functions...): issue slots near full with the pipes below them is a kernel bound by its
instruction count; and the busiest memory unit's share of its peak (Max Bandwidth: DRAM, L2, L1
or shared memory, which wgmma's operands are read from). The full report stays in the log.

Usage: ncu_summary.py LOG...   (standard library only; a metric missing from a report prints -)
"""

import re
import sys

# Report label → column title; the first word of the value is taken, thousands separators dropped.
COLUMNS = {
    "Duration": "duration",
    "Compute (SM) Throughput": "SM %",
    "Memory Throughput": "memory %",
    "Achieved Occupancy": "occupancy %",
    "Registers Per Thread": "registers",
    "Warp Cycles Per Issued Instruction": "cycles/issue",
    "Issue Slots Busy": "issue %",
    "SM Busy": "pipe %",
    "Max Bandwidth": "mem unit %",
}
# A kernel's header line: "  name (gx, gy, gz)x(bx, by, bz), Context 1, Stream 7, ...".
HEADER = re.compile(r"^\s{0,4}(\S+) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)")
METRIC = re.compile(r"^\s+(.+?)\s{2,}(\S+)\s+([\d.,]+)\s*$")


def kernels(lines):
    """(name, grid, {label: (unit, value)}) per kernel report, in order."""
    current = None
    for line in lines:
        header = HEADER.match(line)
        if header:
            if current:
                yield current
            name, *dims = header.groups()
            current = (name, "×".join(dims[:3]), {})
            continue
        metric = METRIC.match(line)
        if current and metric and metric.group(1) in COLUMNS:
            label, unit, value = metric.groups()
            current[2].setdefault(label, (unit, value.replace(",", "")))
    if current:
        yield current


def main(paths):
    if not paths:
        sys.exit(__doc__)
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                reports = list(kernels(f))
        except OSError as error:
            print(f"{path}: {error}")
            continue
        print(f"\n{path}: {len(reports)} kernel(s) profiled")
        if not reports:
            continue
        print(f"{'kernel':<32}{'grid':>16}" + "".join(f"{title:>14}" for title in COLUMNS.values()))
        for name, grid, metrics in reports:
            cells = []
            for label in COLUMNS:
                unit, value = metrics.get(label, ("", "-"))
                cells.append(f"{value} {unit}" if label == "Duration" and value != "-" else value)
            print(f"{name[:31]:<32}{grid:>16}" + "".join(f"{cell:>14}" for cell in cells))


if __name__ == "__main__":
    main(sys.argv[1:])
