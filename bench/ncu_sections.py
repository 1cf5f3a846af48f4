#!/usr/bin/env python3
"""Chosen metrics of each profiled kernel from Nsight Compute's details page as CSV (`ncu --section
SpeedOfLight --section WarpStateStats ... --csv --page details`), one table row per launch: time,
issue slots busy, instructions, IPC, warps eligible and active per scheduler, occupancy, registers
and DRAM throughput. Lines before the CSV header (the profiled program's output) are skipped.
Usage: bench/ncu_sections.py DETAILS.csv [DETAILS.csv ...]"""
import csv
import sys

COLUMNS = [
    ("Duration", "us", 1e-3),
    ("Issue Slots Busy", "issue %", 1),
    ("Executed Instructions", "M instr", 1e-6),
    ("Executed Ipc Active", "IPC", 1),
    ("Eligible Warps Per Scheduler", "eligible", 1),
    ("Active Warps Per Scheduler", "active", 1),
    ("Theoretical Occupancy", "occ. %", 1),
    ("Registers Per Thread", "regs", 1),
    ("DRAM Throughput", "DRAM %", 1),
]


def num(x):
    try:
        return float(x.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def launches(path):
    lines = open(path).read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    rows = list(csv.reader(lines[start:]))
    head = rows[0]
    col = {name: head.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Value")}
    out = {}
    for r in rows[1:]:
        k = out.setdefault(r[col["ID"]], {"kernel": r[col["Kernel Name"]]})
        k.setdefault(r[col["Metric Name"]], r[col["Metric Value"]])
    return out.values()


def main():
    print("| kernel | " + " | ".join(label for _, label, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for path in sys.argv[1:]:
        for k in launches(path):
            cells = []
            for metric, _, mul in COLUMNS:
                v = num(k.get(metric))
                cells.append("" if v is None else f"{v * mul:,.{1 if v * mul < 100 else 0}f}")
            print(f"| {k['kernel']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
