#!/usr/bin/env python3
"""Modelled steady step of PCPP and DistriFusion on N GPUs over an InfiniBand-class link beside
NVLink (issue #21, docs/clusters.md): whether each scheme's stale traffic hides behind its step.

Model of one steady step (PCPP §7.4, as scripts/model-speedup.py):
  T_comp  = the slowest rank's measured step (CUDA graph), from `pcpp-cli bench` lines
            (docs/data-band-bench.jsonl: H100, SDXL-base, fp16, CFG split); at sizes not measured,
            extrapolated per scheme as T = c + a * P (P = pixels) through the two largest measured
            sizes. Attention grows as P^2, so this underestimates large steps: the sizes at which
            traffic hides are upper bounds.
  T_stale = the largest per-rank stale traffic of a steady step (halo, K/V, group-norm statistics;
            max of sent and received, from `pcpp-cli plan --json`) / link bandwidth per direction:
            posted when produced and used one step later, so it hides unless it takes longer
            than the step;
  T_sync  = the same for the output gather, which every step waits for;
  T_step  = max(T_comp, T_stale) + T_sync.
Every rank is assumed to have its own link of the given bandwidth (one NIC per GPU).

Usage: scripts/link-model.py --cli BIN/pcpp-cli [--bench docs/data-band-bench.jsonl]
       [--ranks 8] [--gbps 450,50,12.5] [--sizes 1024,1536,...]
"""
import argparse
import json
import subprocess
import sys
from collections import defaultdict

STALE = ("halo", "attention", "group_norm")


def plan(cli, config, size, ranks, mode, portion):
    out = subprocess.run(
        [cli, "plan", "--config", config, "--height", str(size), "--width", str(size),
         "--ranks", str(ranks), "--parallel", mode, "--portion", portion, "--json"],
        check=True, capture_output=True, text=True).stdout
    p = json.loads(out)
    stale = max(max(sum(r["steady"][d].get(k, 0) for k in STALE) for d in ("sent", "recvd"))
                for r in p["ranks"])
    gather = max(max(r["steady"][d].get("gather", 0) for d in ("sent", "recvd")) for r in p["ranks"])
    return stale, gather


def measured(path, ranks):
    best = defaultdict(float)
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        if r["ranks"] != ranks:
            continue
        size = r["latent_hw"][0] * 8
        t = r.get("steady_step_graph_ms") or r["steady_step_ms"]
        best[(r["mode"], size)] = max(best[(r["mode"], size)], t)
    return best


def comp_model(best, mode):
    pts = sorted((s, t) for (m, s), t in best.items() if m == mode)
    if not pts:
        return None
    if len(pts) == 1:
        (s0, t0), = pts
        return lambda s: t0 * (s * s) / (s0 * s0)
    (s1, t1), (s2, t2) = pts[-2], pts[-1]
    a = (t2 - t1) / (s2 * s2 - s1 * s1)
    c = t1 - a * s1 * s1
    return lambda s: c + a * s * s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", required=True)
    ap.add_argument("--bench", default="docs/data-band-bench.jsonl")
    ap.add_argument("--config", default="models/sdxl-base-1.0-configs/unet/config.json")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--gbps", default="450,50,12.5")
    ap.add_argument("--portion", default="0.3")
    ap.add_argument("--sizes", default="1024,1536,2048,2560,3072,3584,3840,4096")
    a = ap.parse_args()
    bws = [float(x) for x in a.gbps.split(",")]
    sizes = [int(x) for x in a.sizes.split(",")]
    best = measured(a.bench, a.ranks)
    print(f"## Modelled steady step on {a.ranks} GPUs (SDXL-base, fp16, CFG split, portion {a.portion})\n")
    print("T_comp measured (H100) at the sizes marked *, else extrapolated; T_stale / T_sync per link "
          "bandwidth per direction; hidden: T_stale <= T_comp.\n")
    head = "| size | mode | T_comp (ms) | stale MB per rank |"
    rule = "|---|---|---|---|"
    for bw in bws:
        head += f" T_stale @{bw:g} GB/s | step @{bw:g} GB/s | hidden @{bw:g} |"
        rule += "---|---|---|"
    print(head)
    print(rule)
    exposed = defaultdict(list)
    for size in sizes:
        for mode in ("pcpp", "distrifusion"):
            f = comp_model(best, mode)
            if f is None:
                continue
            tc = best.get((mode, size)) or f(size)
            mark = "*" if (mode, size) in best else ""
            stale, gather = plan(a.cli, a.config, size, a.ranks, mode, a.portion)
            row = f"| {size}² | {mode} | {tc:.1f}{mark} | {stale / 1e6:.0f} |"
            for bw in bws:
                ts, tg = stale / (bw * 1e6), gather / (bw * 1e6)
                hidden = ts <= tc
                if not hidden:
                    exposed[(mode, bw)].append(f"{size}²")
                row += f" {ts:.1f} | {max(tc, ts) + tg:.1f} | {'yes' if hidden else 'no'} |"
            print(row)
    print()
    for bw in bws:
        for mode in ("pcpp", "distrifusion"):
            e = exposed.get((mode, bw))
            what = f"exposed at {', '.join(e)}" if e else "hidden at every size"
            print(f"- {mode} at {bw:g} GB/s: stale traffic {what}")


if __name__ == "__main__":
    sys.exit(main())
