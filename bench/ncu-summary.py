#!/usr/bin/env python3
"""Summarises an Nsight Compute profile of `bench-cuda --profile` as a Markdown table.

On the GPU machine:

    ncu --profile-from-start off --clock-control none \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section ComputeWorkloadAnalysis \\
        --section MemoryWorkloadAnalysis --section SchedulerStats \\
        -o prof bench-cuda --profile > cases.txt
    ncu -i prof.ncu-rep --csv --page raw > raw.csv

Here: `python3 bench/ncu-summary.py raw.csv cases.txt`. The profiled kernels come in the order of
the `profile N | ...` lines that `bench-cuda --profile` prints, one launch each. Columns: time
under the profiler (clocks not locked), registers per thread, theoretical / achieved occupancy,
SM (instruction) and DRAM throughput as % of peak, DRAM bytes moved, issue-slot use, warp
instructions executed per token, and the three largest warp stall reasons (cycles per issued
instruction).
"""
import csv
import sys


def main(raw_path: str, cases_path: str) -> None:
    rows = list(csv.reader(open(raw_path)))
    hdr, data = rows[0], rows[2:]
    col = {h: i for i, h in enumerate(hdr)}
    cases = [
        line.split("|", 1)[1].strip()
        for line in open(cases_path)
        if line.startswith("profile ")
    ]
    if len(cases) != len(data):
        sys.exit(f"{len(cases)} cases but {len(data)} profiled kernels: not one launch per case")

    def num(r, k):
        try:
            return float(r[col[k]].replace(",", ""))
        except (KeyError, ValueError):
            return float("nan")

    stalls = [
        h
        for h in hdr
        if h.startswith("smsp__average_warps_issue_stalled_")
        and h.endswith("_per_issue_active.ratio")
        and "_selected_" not in h
    ]
    print(
        "| case | kernel | µs | regs | occupancy theor. / achieved | SM % | DRAM % | DRAM MB "
        "| issue active % | warp inst. / token | top stalls (cycles per issue) |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for r, case in zip(data, cases):
        parts = [p.strip() for p in case.split("|")]
        t = int(parts[4])
        us = num(r, "gpu__time_duration.sum")
        dram_mb = num(r, "dram__bytes.sum.per_second") * us  # TB/s × µs = MB
        top = sorted(
            (
                (num(r, h), h[len("smsp__average_warps_issue_stalled_") : -len("_per_issue_active.ratio")])
                for h in stalls
            ),
            reverse=True,
        )[:3]
        print(
            f"| {' '.join(parts[:5])} | {r[col['Kernel Name']]} | {us:.1f} "
            f"| {r[col['launch__registers_per_thread']]} "
            f"| {num(r, 'sm__maximum_warps_per_active_cycle_pct'):.0f}% / "
            f"{num(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'):.0f}% "
            f"| {num(r, 'sm__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} "
            f"| {num(r, 'gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed'):.0f} "
            f"| {dram_mb:.0f} "
            f"| {num(r, 'smsp__issue_active.avg.pct_of_peak_sustained_active'):.0f} "
            f"| {num(r, 'smsp__inst_executed.sum' if 'smsp__inst_executed.sum' in col else 'inst_executed') / t:.0f} "
            f"| {', '.join(f'{n} {v:.1f}' for v, n in top)} |"
        )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
