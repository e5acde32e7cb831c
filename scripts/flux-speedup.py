#!/usr/bin/env python3
"""Modelled multi-GPU Flux transformer step and speed-up from one-GPU measurements
(bench/gpu-flux.sh): the JSON lines of `pcpp-cli flux-bench` (the serial step, and one rank's
steady step per mode and rank count, measured alone with the solo transport, with the bytes it
posts) and of bench/diffusers_flux_step.py (the diffusers anchor).

Model of one steady step on N GPUs (PCPP §7.4), as scripts/model-speedup.py for the UNet:
  T_comp  = the measured rank's step (CUDA graph when measured, else eager); bands differ by at
            most one token row, so every rank is taken to take as long;
  T_stale = max(sent, received) stale K/V bytes / link bandwidth: posted while the step runs and
            used at the next step, so hidden behind the computation unless it takes longer;
  T_sync  = the output gather's bytes / link bandwidth, which every step waits for;
  T_step  = max(T_comp, T_stale) + T_sync.
Speed-up = T_serial / T_step (pcpp's own serial step) and T_diffusers / T_step.
"""
import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pcpp_jsonl")
    ap.add_argument("diffusers_jsonl", nargs="?")
    ap.add_argument("--link-gbps", type=float, default=450.0)
    a = ap.parse_args()
    bw = a.link_gbps * 1e9
    rows = [json.loads(l) for l in open(a.pcpp_jsonl) if l.strip()]
    ref = {}
    if a.diffusers_jsonl:
        for l in open(a.diffusers_jsonl):
            if l.strip():
                r = json.loads(l)
                ref[r["height"]] = r
    t = lambda r: r["steady_step_graph_ms"] if r.get("steady_step_graph_ms") is not None else r["steady_step_ms"]
    serial = {}
    for r in rows:
        if r["ranks"] == 1:
            serial[r["height"]] = min(serial.get(r["height"], float("inf")), t(r))
    variants = [r for r in rows if r["ranks"] == 1 and r.get("variant")]
    if variants:
        print("Serial step by kernel variant (`flux-bench --variants`; the fastest is the serial step below):\n")
        print("| size | variant | eager (ms) | CUDA graph (ms) | vs diffusers (graph) |")
        print("|---|---|---|---|---|")
        for r in variants:
            d = ref.get(r["height"])
            g = r.get("steady_step_graph_ms")
            vs = f"{g / d['graph_ms']:.3f}×" if d and g is not None else "n/a"
            gt = f"{g:.2f}" if g is not None else "n/a"
            print(f"| {r['height']}² | {r['variant']} | {r['steady_step_ms']:.2f} | {gt} | {vs} |")
        print()
    print(f"Link model: {a.link_gbps:.0f} GB/s per GPU.\n")
    for size in sorted(serial):
        d = ref.get(size)
        dtxt = f"; diffusers {d['graph_ms']:.2f} ms (CUDA graph), {d['eager_ms']:.2f} ms eager" if d else ""
        print(f"Flux transformer at {size}²: pcpp serial step {serial[size]:.2f} ms{dtxt}.\n")
        print("| mode | GPUs | band rows | rank step (ms) | stale MB | T_stale (ms) | gather MB | T_sync (ms) | modelled step (ms) | speed-up vs pcpp serial | speed-up vs diffusers |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted((r for r in rows if r["height"] == size and r["ranks"] > 1), key=lambda r: (r["mode"], r["ranks"])):
            tr = r["steady_traffic"]
            stale = max(tr["sent"]["attention"], tr["recvd"]["attention"])
            gather = max(tr["sent"]["gather"], tr["recvd"]["gather"])
            ts, tg = stale / bw * 1e3, gather / bw * 1e3
            step = max(t(r), ts) + tg
            vs_d = f"{d['graph_ms'] / step:.2f}×" if d else "n/a"
            print(f"| {r['mode']} | {r['ranks']} | {r['band_rows']} | {t(r):.2f} | {stale / 1e6:.1f} | {ts:.3f} | {gather / 1e6:.1f} | {tg:.3f} | {step:.2f} | {serial[size] / step:.2f}× | {vs_d} |")
        print()


if __name__ == "__main__":
    main()
