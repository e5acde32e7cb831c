#!/usr/bin/env python3
"""Modelled multi-GPU step time and patch efficiency from one-GPU per-rank measurements.

Input: the JSON lines of `pcpp-cli bench --device cuda ... --json` (scripts/band-bench.sh): the
serial step of the whole image (ranks = 1) and, per mode and rank count, every rank's steady step
measured alone, with the bytes that step posts.

Model of one steady step on N GPUs (PCPP §7.4):
  T_comp  = max over ranks of the rank's measured step (CUDA graph when measured, else eager);
  T_stale = max over ranks of max(sent, received) stale bytes (halo, K/V, group-norm statistics)
            / link bandwidth: posted while the step runs, used at the next step, so it is hidden
            behind the computation unless it takes longer;
  T_sync  = the same for the output gather, which every step waits for;
  T_step  = max(T_comp, T_stale) + T_sync.
Patch efficiency = T_full / (N * T_step); speed-up = T_full / T_step.
"""
import argparse
import json
import sys
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--link-gbps", type=float, default=450.0)
    a = ap.parse_args()
    bw = a.link_gbps * 1e9
    rows = [json.loads(l) for l in open(a.jsonl) if l.strip()]
    full = {}
    cases = defaultdict(list)
    for r in rows:
        size = r["latent_hw"][0] * 8
        t = r["steady_step_graph_ms"] if r.get("steady_step_graph_ms") is not None else r["steady_step_ms"]
        r["_t"] = t
        if r["ranks"] == 1:
            full[size] = (t, r["steady_step_ms"])
        else:
            cases[(size, r["mode"], r["ranks"])].append(r)

    def stale(t):
        return sum(t.get(k, 0) for k in ("halo", "attention", "group_norm"))

    order = {"pcpp": 0, "distrifusion": 1, "naive-patch": 2}
    out = []
    for size in sorted(full):
        tf, tfe = full[size]
        out.append(f"\nSerial step at {size}² (batch 2): {tf:.2f} ms as a CUDA graph, {tfe:.2f} ms eager.\n")
        out.append("| size | mode | GPUs | bands per branch | band rows | rank step, graph (ms) | rank step, eager (ms) | stale MB per rank | T_stale (ms) | T_sync (ms) | modelled step (ms) | speed-up | patch efficiency |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (s, mode, n), rs in sorted(cases.items(), key=lambda kv: (kv[0][0], kv[0][2], order.get(kv[0][1], 9))):
            if s != size:
                continue
            tc = max(r["_t"] for r in rs)
            te = max(r["steady_step_ms"] for r in rs)
            sb = max(max(stale(r["steady_traffic"]["sent"]), stale(r["steady_traffic"]["recvd"])) for r in rs)
            gb = max(max(r["steady_traffic"]["sent"].get("gather", 0), r["steady_traffic"]["recvd"].get("gather", 0)) for r in rs)
            ts, tg = 1e3 * sb / bw, 1e3 * gb / bw
            step = max(tc, ts) + tg
            rows_ = "–".join(sorted({str(r["band_rows"]) for r in rs}, key=int))
            missing = "" if len(rs) == n else f" ({len(rs)} of {n} ranks measured)"
            out.append(f"| {size}² | {mode}{missing} | {n} | {rs[0]['group_size']} | {rows_} | {tc:.2f} | {te:.2f} | {sb / 1e6:.1f} | {ts:.3f} | {tg:.3f} | {step:.2f} | {tf / step:.2f}× | {tf / (n * step):.2f} |")
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
