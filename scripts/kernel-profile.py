#!/usr/bin/env python3
"""Per-kernel breakdown of one steady step from an Nsight Compute CSV (docs/benchmarks.md, "Where
the UNet step's time goes"). `bench/gpu-profile.sh` writes the CSV with

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw ...

over a few eager steps. The last step is found as the repeating tail of the kernel sequence (the
smallest period p with the last p kernel names equal to the p before them); its kernels are
summed per op kind (by kernel name) and per kernel name.

    scripts/kernel-profile.py NCU_CSV [--top N] [--markdown]
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
        rows.append((r["Kernel Name"], ns, r.get("Grid Size", ""), r.get("Block Size", "")))
    return rows


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
    a = ap.parse_args()
    step = last_step(load(a.csv))
    total = sum(r[1] for r in step) / 1e6
    print(f"{a.csv}: one step = {len(step)} kernels, {total:.3f} ms of kernel time")
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, ns, _, _ in step:
        by_kind[kind(name)][0] += 1
        by_kind[kind(name)][1] += ns / 1e6
        short = re.sub(r"\(.*", "", name)[:90]
        by_name[short][0] += 1
        by_name[short][1] += ns / 1e6
    print("| op kind | kernels | ms | share |\n|---|---|---|---|")
    for k, (c, ms) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"| {k} | {c} | {ms:.3f} | {100 * ms / total:.0f} % |")
    print(f"\n| kernel (top {a.top}) | calls | ms | mean µs |\n|---|---|---|---|")
    for k, (c, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"| `{k}` | {c} | {ms:.3f} | {1000 * ms / c:.1f} |")
    short = [r for r in step if r[1] < 5000]
    print(f"\nkernels under 5 µs: {len(short)}, {sum(r[1] for r in short) / 1e6:.3f} ms")


if __name__ == "__main__":
    main()
