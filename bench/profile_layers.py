#!/usr/bin/env python3
"""One decoder block's kernels, launch by launch, from an Nsight Compute raw CSV of a training step
(`ncu --csv --page raw --metrics gpu__time_duration.sum,launch__grid_size,dram__bytes_read.sum,
dram__bytes_write.sum ...`): the forward between two flash forward launches and the backward
between two flash dk/dv launches of block N, each kernel with its time, grid, registers and DRAM
traffic, then the step's time summed by kernel name.
Usage: bench/profile_layers.py NCU.csv [BLOCK]"""
import collections
import csv
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except (AttributeError, ValueError):
        return 0.0


def main():
    path, block = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10
    rows = list(csv.DictReader(l for l in open(path) if l.startswith('"')))[1:]  # the second row holds units
    seq = [(r["Kernel Name"].split("(")[0][:64], num(r["gpu__time_duration.sum"]) / 1e3, r.get("launch__grid_size", ""),
            r.get("launch__registers_per_thread", ""), num(r.get("dram__bytes_read.sum")) / 1e6,
            num(r.get("dram__bytes_write.sum")) / 1e6) for r in rows]
    total = sum(s[1] for s in seq)
    print(f"total kernel time {total / 1e3:.2f} ms over {len(seq)} launches")
    fwd = [i for i, s in enumerate(seq) if s[0].startswith("flash_fwd")]
    dkv = [i for i, s in enumerate(seq) if s[0].startswith("flash_dkv")]

    def show(title, a, b):
        print(f"\n{title}")
        print(f"{'us':>8} {'grid':>7} {'regs':>4} {'read MB':>8} {'write MB':>8}  kernel")
        for name, us, grid, regs, rd, wr in seq[a:b]:
            print(f"{us:8.1f} {grid:>7} {regs:>4} {rd:8.1f} {wr:8.1f}  {name}")
        print(f"{sum(s[1] for s in seq[a:b]):8.1f} us in all")

    if len(fwd) > block + 1:
        # the forward of a block starts with its attention norm, a few launches before its flash kernel
        start = max(i for i in range(fwd[block - 1] + 1, fwd[block]) if seq[i][0].startswith("rms_norm_fwd") and i < fwd[block] - 3)
        end = max(i for i in range(fwd[block] + 1, fwd[block + 1]) if seq[i][0].startswith("rms_norm_fwd") and i < fwd[block + 1] - 3)
        show(f"forward of block {block} (from its attention norm)", start, end)
    if len(dkv) > block + 1:
        show(f"backward of a block (from one flash dk/dv launch to the next)", dkv[block], dkv[block + 1])
    by = collections.Counter()
    n = collections.Counter()
    for s in seq:
        by[s[0]] += s[1]
        n[s[0]] += 1
    print("\nby kernel")
    for k, t in by.most_common(30):
        print(f"{t / 1e3:9.2f} ms {100 * t / total:5.1f}% {n[k]:6d}x  {k}")


if __name__ == "__main__":
    main()
