#!/usr/bin/env python3
"""Summarises a pm_sampler CSV as Markdown: mean / median / max of each metric over busy samples.

    python3 bench/pm-sampler/summarize.py FILE.csv [--from NS] [--to NS] [--relative]
    python3 bench/pm-sampler/summarize.py FILE.csv --phases PHASES.txt

A sample belongs to the window [--from, --to] when its midpoint does (timestamps as in the CSV;
with --relative, in ns from the first sample's start). It is busy when the busy metric exceeds
the threshold: by default the SM-active column (sm__cycles_active.*), above 5 when it is a
percentage and above 0.05 otherwise; --busy-metric / --busy-threshold change that and --all
keeps idle samples too. The first sample of the file is left out (CUPTI documents that it may
hold outliers) unless --keep-first is given.

--phases reads lines `pm_phase name=NAME realtime_ns=A,B monotonic_ns=C,D ...` (pm_burn prints
them; any program may) and prints one table per phase. The clock whose phase windows fall inside
the CSV's time range is used, and named; if none does, the CSV's timestamps are on none of the
clocks given and the windows must be passed by hand.

Derived rows, when their inputs were sampled:
  occupancy of active SMs (%)  = warps active / (warps active + idle warp slots on active SMs)
  issue while SM active (%)    = issue-slot use / SM-active share, both over elapsed cycles
"""
import argparse
import csv
import math
import statistics
import sys

WARPS = "tpc__warps_active_realtime.avg.pct_of_peak_sustained_elapsed"
IDLE_SLOTS_ACTIVE_SM = "tpc__warps_inactive_sm_active_realtime.avg.pct_of_peak_sustained_elapsed"
SLOTS_IDLE_SM = "tpc__warps_inactive_sm_idle_realtime.avg.pct_of_peak_sustained_elapsed"
SM_ACTIVE = "sm__cycles_active.avg.pct_of_peak_sustained_elapsed"
ISSUE = "sm__inst_executed_realtime.avg.pct_of_peak_sustained_elapsed"


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["sample_start_ns", "sample_end_ns"]:
        sys.exit(f"{path}: not a pm_sampler CSV (header must start sample_start_ns,sample_end_ns)")
    names = rows[0][2:]
    samples = []
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(rows[0]):
            sys.exit(f"{path}:{n}: {len(r)} fields, header has {len(rows[0])}")
        samples.append((int(r[0]), int(r[1]), [float(x) for x in r[2:]]))
    return names, samples


def derived(names, samples):
    """Adds the derived columns whose inputs are present; returns the new names and samples."""
    col = {n: i for i, n in enumerate(names)}
    extra = []
    if WARPS in col and IDLE_SLOTS_ACTIVE_SM in col:
        w, ia = col[WARPS], col[IDLE_SLOTS_ACTIVE_SM]
        extra.append(("derived: occupancy of active SMs (%)",
                      lambda v: 100 * v[w] / (v[w] + v[ia]) if v[w] + v[ia] > 0 else math.nan))
    elif IDLE_SLOTS_ACTIVE_SM in col and SLOTS_IDLE_SM in col:
        ia, ii = col[IDLE_SLOTS_ACTIVE_SM], col[SLOTS_IDLE_SM]
        extra.append(("derived: occupancy of active SMs (%)",
                      lambda v: 100 * (100 - v[ia] - v[ii]) / (100 - v[ii])
                      if v[ii] < 100 else math.nan))
    if ISSUE in col and SM_ACTIVE in col:
        i, a = col[ISSUE], col[SM_ACTIVE]
        extra.append(("derived: issue while SM active (%)",
                      lambda v: 100 * v[i] / v[a] if v[a] > 0 else math.nan))
    if not extra:
        return names, samples
    out = [(s, e, v + [f(v) for _, f in extra]) for s, e, v in samples]
    return names + [n for n, _ in extra], out


def fmt(x):
    if x is None or math.isnan(x):
        return "–"
    a = abs(x)
    if a >= 1e5:
        return f"{x:.4g}"
    if a >= 100:
        return f"{x:.1f}"
    return f"{x:.3g}"


def busy_column(names, wanted):
    if wanted:
        if wanted not in names:
            sys.exit(f"--busy-metric {wanted}: not a column of the CSV")
        return names.index(wanted)
    for i, n in enumerate(names):
        if n.startswith("sm__cycles_active."):
            return i
    return None


def table(title, names, samples, busy_idx, threshold, keep_idle):
    total = len(samples)
    if busy_idx is not None and not keep_idle:
        chosen = [s for s in samples if s[2][busy_idx] > threshold]
        rule = f"{names[busy_idx]} > {threshold:g}"
    else:
        chosen, rule = samples, "all samples"
    note = ""
    if not chosen and samples:
        chosen, note = samples, " No sample is busy: the table covers all of them."
    print(f"### {title}\n")
    if not chosen:
        print("No samples in this window.\n")
        return
    span = (chosen[-1][1] - chosen[0][0]) / 1e9
    mean_len = statistics.fmean(e - s for s, e, _ in chosen)
    print(f"{total} samples in the window, {len(chosen)} selected ({rule}), spanning {span:.3f} s;"
          f" mean sample {mean_len / 1e3:.1f} µs.{note}\n")
    print("| metric | mean | median | max |")
    print("|---|---:|---:|---:|")
    for j, n in enumerate(names):
        vals = [v[j] for _, _, v in chosen if not math.isnan(v[j])]
        if vals:
            print(f"| {n} | {fmt(statistics.fmean(vals))} | {fmt(statistics.median(vals))} "
                  f"| {fmt(max(vals))} |")
        else:
            print(f"| {n} | – | – | – |")
    print()


def in_window(samples, lo, hi):
    return [s for s in samples if lo <= (s[0] + s[1]) / 2 <= hi]


def read_phases(path):
    phases = []
    with open(path) as f:
        for line in f:
            if not line.startswith("pm_phase "):
                continue
            fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            clocks = {}
            for k, v in fields.items():
                if k.endswith("_ns") and "," in v:
                    a, b = v.split(",", 1)
                    clocks[k] = (int(a), int(b))
            phases.append((fields.get("name", f"phase {len(phases)}"), clocks))
    if not phases:
        sys.exit(f"{path}: no 'pm_phase name=... <clock>_ns=START,END' lines")
    return phases


def pick_clock(phases, first, last, slack=1_000_000_000):
    """The clock whose every phase window lies within the CSV's time range (± slack)."""
    keys = set.intersection(*(set(c) for _, c in phases))
    for k in sorted(keys):
        if all(first - slack <= c[k][0] and c[k][1] <= last + slack for _, c in phases):
            return k
    ranges = ", ".join(f"{k} {phases[0][1][k][0]}..{phases[-1][1][k][1]}" for k in sorted(keys))
    sys.exit(f"the CSV covers {first}..{last} ns, and no clock of the phase file falls inside it "
             f"({ranges}): the sample timestamps are on another clock; use --from/--to")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--from", dest="lo", type=int, help="window start, ns")
    ap.add_argument("--to", dest="hi", type=int, help="window end, ns")
    ap.add_argument("--relative", action="store_true",
                    help="--from/--to count from the first sample's start")
    ap.add_argument("--phases", help="file with pm_phase lines: one table per phase")
    ap.add_argument("--busy-metric", help="column deciding whether a sample is busy")
    ap.add_argument("--busy-threshold", type=float, help="busy when the column exceeds this")
    ap.add_argument("--all", action="store_true", help="keep idle samples")
    ap.add_argument("--keep-first", action="store_true", help="keep the file's first sample")
    a = ap.parse_args()

    names, samples = load(a.csv)
    if not samples:
        sys.exit(f"{a.csv}: no samples")
    first, last = samples[0][0], samples[-1][1]
    if not a.keep_first:
        samples = samples[1:]
    names, samples = derived(names, samples)
    busy_idx = busy_column(names, a.busy_metric)
    if a.busy_threshold is not None:
        threshold = a.busy_threshold
    elif busy_idx is not None:
        threshold = 5.0 if "pct" in names[busy_idx] else 0.05
    else:
        threshold = 0.0
    if busy_idx is None and not a.all:
        print("(no sm__cycles_active column and no --busy-metric: all samples count as busy)\n")

    print(f"## {a.csv}\n")
    print(f"{len(samples)} samples, {first} .. {last} ns ({(last - first) / 1e9:.3f} s).\n")
    if a.phases:
        phases = read_phases(a.phases)
        key = pick_clock(phases, first, last)
        print(f"Phases from {a.phases} placed by their {key} stamps.\n")
        for name, clocks in phases:
            lo, hi = clocks[key]
            table(f"{name} ({(hi - lo) / 1e9:.3f} s)", names, in_window(samples, lo, hi),
                  busy_idx, threshold, a.all)
        return
    base = first if a.relative else 0
    lo = base + a.lo if a.lo is not None else first
    hi = base + a.hi if a.hi is not None else last
    window = "whole file" if a.lo is None and a.hi is None else f"{lo} .. {hi} ns"
    table(window, names, in_window(samples, lo, hi), busy_idx, threshold, a.all)


if __name__ == "__main__":
    main()
