#!/usr/bin/env python3
"""Per-kernel breakdown of one steady step from an Nsight Compute CSV (docs/benchmarks.md, "Where
the UNet step's time goes"). `bench/gpu-profile.sh` writes the CSV with

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw ...

over a few eager steps. The last step is found as the repeating tail of the kernel sequence (the
smallest period p with the last p kernel names equal to the p before them); its kernels are
summed per op kind (by kernel name) and per kernel name. Where the CSV also has
`dram__bytes.sum` (bytes: ncu's `--print-units base`), the kernel table adds each kernel's DRAM
traffic and bandwidth, and `--shapes N` breaks the N largest kernels down by launch shape (grid
and block), which tells the calls of one kernel at different sizes apart.

    scripts/kernel-profile.py NCU_CSV [--top N] [--shapes N]
"""
import argparse
import collections
import csv
import re
import sys

# Op kinds by kernel name, first match wins.
KINDS = [
    ("attention", r"flash_|fmha|attn"),
    ("conv (cuDNN)", r"conv|fprop|dgrad|implicit|winograd|nchwToNhwc|nhwcToNchw|cudnn|xmma_.*_nhwc"),
    ("GEMM (cuBLASLt)", r"gemm|nvjet|cutlass|cublas|splitK|sm90_xmma"),
    ("layer norm", r"layer_norm|rms_norm"),
    ("group norm", r"group_norm|gn_"),
    ("copies", r"cat|narrow|copy|permute|pack|unpack|pad|slice|scatter|gather|cast|tokens"),
    ("element-wise", r".*"),
]


def load(path):
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if not r.get("ID", "").isdigit():
            continue
        t = r.get("gpu__time_duration.sum", "").replace(",", "")
        try:
            ns = float(t)
        except ValueError:
            continue
        try:
            dram = float(r.get("dram__bytes.sum", "").replace(",", ""))
        except ValueError:
            dram = None
        rows.append((r["Kernel Name"], ns, r.get("Grid Size", ""), r.get("Block Size", ""), dram))
    return rows


def traffic(ns, dram):
    """` | GB | TB/s` cells for `dram` bytes moved in `ns` nanoseconds (blank without bytes)."""
    if dram is None:
        return " | | "
    return f" | {dram / 1e9:.3f} | {dram / ns / 1e3:.2f}"


def last_step(rows, min_period=200):
    names = [r[0] for r in rows]
    n = len(names)
    for p in range(min_period, n // 2 + 1):
        if names[n - p:] == names[n - 2 * p:n - p]:
            return rows[n - p:]
    sys.exit(f"no repeating step of at least {min_period} kernels among {n}")


def kind(name):
    for k, pat in KINDS:
        if re.search(pat, name, re.I):
            return k
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--shapes", type=int, default=0)
    a = ap.parse_args()
    step = last_step(load(a.csv))
    total = sum(r[1] for r in step) / 1e6
    print(f"{a.csv}: one step = {len(step)} kernels, {total:.3f} ms of kernel time")
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    # name -> [calls, ms, DRAM bytes or None]; (name, grid, block) -> the same
    by_name = collections.defaultdict(lambda: [0, 0.0, 0.0])
    by_shape = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for name, ns, grid, block, dram in step:
        by_kind[kind(name)][0] += 1
        by_kind[kind(name)][1] += ns / 1e6
        short = re.sub(r"\(.*", "", name)[:90]
        for entry in (by_name[short], by_shape[(short, grid, block)]):
            entry[0] += 1
            entry[1] += ns / 1e6
            entry[2] = None if dram is None or entry[2] is None else entry[2] + dram
    print("| op kind | kernels | ms | share |\n|---|---|---|---|")
    for k, (c, ms) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"| {k} | {c} | {ms:.3f} | {100 * ms / total:.0f} % |")
    print(f"\n| kernel (top {a.top}) | calls | ms | mean µs | GB | TB/s |")
    print("|---|---|---|---|---|---|")
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[: a.top]
    for k, (c, ms, dram) in top:
        print(f"| `{k}` | {c} | {ms:.3f} | {1000 * ms / c:.1f}{traffic(ms * 1e6, dram)} |")
    if a.shapes:
        print("\n| kernel | grid | block | calls | ms | mean µs | GB | TB/s |")
        print("|---|---|---|---|---|---|---|---|")
        names = {k for k, _ in top[: a.shapes]}
        for (k, grid, block), (c, ms, dram) in sorted(by_shape.items(), key=lambda kv: -kv[1][1]):
            if k in names:
                cells = f"{c} | {ms:.3f} | {1000 * ms / c:.1f}{traffic(ms * 1e6, dram)}"
                print(f"| `{k}` | {grid} | {block} | {cells} |")
    short = [r for r in step if r[1] < 5000]
    print(f"\nkernels under 5 µs: {len(short)}, {sum(r[1] for r in short) / 1e6:.3f} ms")


if __name__ == "__main__":
    main()
