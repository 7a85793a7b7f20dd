#!/usr/bin/env python3
"""Time series of a pm_sampler CSV in fixed bins, and the limiting resource of its last busy phase.

    python3 bench/pm-sampler/series.py FILE.csv [--bin-ms 20] [--busy 50]

Prints one line per bin where the SMs were active (ms from the first sample, samples, SM active %,
issue slots used %, warp occupancy of the active SMs %, DRAM %, L2 sectors %), then the means over
the last contiguous run of bins with SM active above --busy: in a `bench-wgpu` run of one case
that is the timed kernel (the same-run copy and the input upload come first). GR active (the
compute front end busy) is printed too: at decode sizes it is busy while the SMs are idle.
"""
import argparse
import csv

SM = "sm__cycles_active.avg.pct_of_peak_sustained_elapsed"
ISSUE = "sm__inst_executed_realtime.avg.pct_of_peak_sustained_elapsed"
IDLE_SLOTS = "tpc__warps_inactive_sm_active_realtime.avg.pct_of_peak_sustained_elapsed"
DRAM = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
L2 = "lts__t_sectors.avg.pct_of_peak_sustained_elapsed"
GR = "gr__cycles_active.sum.pct_of_peak_sustained_elapsed"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--bin-ms", type=float, default=20.0, help="bin width in ms (default 20)")
    ap.add_argument("--busy", type=float, default=50.0, help="SM active %% above which a bin is busy")
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        rows = list(csv.reader(f))
    head = rows[0]
    col = {n: i for i, n in enumerate(head)}
    missing = [n for n in (SM, ISSUE, IDLE_SLOTS, DRAM, L2, GR) if n not in col]
    if missing:
        raise SystemExit(f"{a.csv}: columns missing: {', '.join(missing)}")
    # The first sample can be an outlier (CUPTI's documentation): skip it.
    samples = [[float(x) for x in r] for r in rows[2:] if r]
    if not samples:
        raise SystemExit(f"{a.csv}: no samples")
    t0 = samples[0][0]
    bins = {}
    for s in samples:
        bins.setdefault(int((s[0] - t0) / 1e6 / a.bin_ms), []).append(s)
    lines = []
    for k in sorted(bins):
        v = bins[k]
        n = len(v)
        m = {name: sum(s[col[name]] for s in v) / n for name in (SM, ISSUE, IDLE_SLOTS, DRAM, L2, GR)}
        occ = (m[SM] - m[IDLE_SLOTS]) / m[SM] * 100 if m[SM] > 0 else 0.0
        lines.append((k * a.bin_ms, n, m[SM], m[ISSUE], occ, m[DRAM], m[L2], m[GR]))
    print("| ms | samples | SM active % | issue % | occupancy of active SMs % | DRAM % | L2 % | GR active % |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ln in lines:
        if ln[2] >= 1.0 or ln[7] >= 1.0:
            print(f"| {ln[0]:.0f} | {ln[1]} | {ln[2]:.1f} | {ln[3]:.1f} | {ln[4]:.1f} | {ln[5]:.1f} | {ln[6]:.1f} | {ln[7]:.1f} |")
    busy = [i for i, ln in enumerate(lines) if ln[2] > a.busy]
    if not busy:
        print(f"\nno bin with SM active above {a.busy}%")
        return
    end = busy[-1]
    start = end
    while start > 0 and lines[start - 1][2] > a.busy:
        start -= 1
    phase = lines[start : end + 1]
    w = sum(ln[1] for ln in phase)
    mean = [sum(ln[i] * ln[1] for ln in phase) / w for i in range(2, 8)]
    print(
        f"\nlast busy phase: {phase[0][0]:.0f}-{phase[-1][0] + a.bin_ms:.0f} ms, {w} samples: SM active {mean[0]:.1f}%,"
        f" issue {mean[1]:.1f}%, occupancy of active SMs {mean[2]:.1f}%, DRAM {mean[3]:.1f}%, L2 {mean[4]:.1f}%,"
        f" GR active {mean[5]:.1f}%"
    )


if __name__ == "__main__":
    main()
