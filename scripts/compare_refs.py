#!/usr/bin/env python3
"""Compare two folders of reference safetensors key by key.

  python scripts/compare_refs.py tests/data/refs-tiny-sdxl /tmp/refs-new [--verbose]

Prints, per file, the keys missing on either side, shape/dtype mismatches, how many tensors are bitwise
equal, and the largest absolute and scale-normalised (|a-b|max / |a|max) differences. Exit status 1 when
keys, shapes or dtypes differ or a normalised difference exceeds --tol (default 1e-6).
"""
import argparse
import glob
import os
import sys

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("new")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--verbose", action="store_true", help="print every key that is not bitwise equal")
    a = ap.parse_args()
    bad = False
    for f in sorted(glob.glob(os.path.join(a.ref, "**", "*.safetensors"), recursive=True)):
        rel = os.path.relpath(f, a.ref)
        g = os.path.join(a.new, rel)
        if not os.path.exists(g):
            print(f"{rel}: MISSING in {a.new}")
            bad = True
            continue
        r, n = load_file(f), load_file(g)
        miss, extra = sorted(set(r) - set(n)), sorted(set(n) - set(r))
        eq, worst_abs, worst_rel, worst_key = 0, 0.0, 0.0, None
        for k in sorted(set(r) & set(n)):
            x, y = r[k], n[k]
            if x.shape != y.shape or x.dtype != y.dtype:
                print(f"{rel}:{k}: shape/dtype {list(x.shape)} {x.dtype} vs {list(y.shape)} {y.dtype}")
                bad = True
                continue
            if torch.equal(x, y):
                eq += 1
                continue
            d = (x.double() - y.double()).abs().max().item()
            s = x.double().abs().max().item()
            rd = d / s if s > 0 else d
            if a.verbose:
                print(f"  {rel}:{k}: max|d|={d:.3e} max|d|/max|ref|={rd:.3e}")
            if rd >= worst_rel:
                worst_abs, worst_rel, worst_key = d, rd, k
            if rd > a.tol:
                bad = True
        total = len(set(r) & set(n))
        line = f"{rel}: {eq}/{total} bitwise equal"
        if worst_key:
            line += f"; worst {worst_key}: max|d|={worst_abs:.3e}, normalised {worst_rel:.3e}"
        if miss or extra:
            line += f"; missing {miss} extra {extra}"
            bad = True
        print(line)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
