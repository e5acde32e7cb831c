#!/usr/bin/env python3
"""Modelled multi-GPU VAE decode and end-to-end image latency from one-GPU measurements.

Inputs (JSON lines):
  --decode    `pcpp-cli decode-bench --json` lines: the serial decode (ranks = 1) and every rank's
              part of the patch-parallel decode measured alone (solo transport), with its bytes,
              its peak memory and its count of synchronous exchanges;
  --diffusers bench/diffusers_vae_decode.py lines (AutoencoderKL.decode f32, bf16, tiled), optional;
  --band      `pcpp-cli bench --device cuda --json` lines (scripts/band-bench.sh): the serial UNet
              step (ranks = 1) and the steady pcpp step of every rank, optional;
  --encode-s  seconds of the text encoders (from a `generate --report`), for the end-to-end table.

Model of the decode on N GPUs (one synchronous pass, nothing hidden):
  T_dec = max over ranks of the rank's decode + max over ranks of max(sent, received) bytes / link
          + exchanges * latency;
  the image gather to rank 0 adds the image's bytes from the other ranks / link.
Model of one image on N GPUs (PCPP §7.4 for the steps, as scripts/model-speedup.py):
  T_img = T_encode + steps * (max(T_comp, T_stale) + T_sync) + T_dec.
"""
import argparse
import json
from collections import defaultdict


def load(path):
    if not path:
        return []
    return [json.loads(l) for l in open(path) if l.strip().startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode", required=True)
    ap.add_argument("--diffusers")
    ap.add_argument("--band")
    ap.add_argument("--encode-s", type=float)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--link-gbps", type=float, default=450.0)
    ap.add_argument("--latency-us", type=float, default=20.0)
    a = ap.parse_args()
    bw = a.link_gbps * 1e9
    lat = a.latency_us * 1e-6
    gib = 2.0**30

    dec = defaultdict(list)
    for r in load(a.decode):
        dec[(r["image_hw"][0], r["ranks"])].append(r)
    diff = {(r["size"], r["mode"]): r for r in load(a.diffusers)}
    out = []
    dec_model = {}
    out.append(f"Decode, modelled on N GPUs at {a.link_gbps:g} GB/s per direction and {a.latency_us:g} µs per synchronous exchange.\n")
    out.append("| size | N | latent rows per rank | rank decode, max (ms) | peak per rank, max (GiB) | MB per rank, max | modelled decode (ms) | speed-up vs 1 GPU |")
    out.append("|---|---|---|---|---|---|---|---|")
    for (size, n) in sorted(dec):
        rs = dec[(size, n)]
        tmax = max(r["decode_ms"] for r in rs)
        peak = max((r["peak_bytes"] or 0) for r in rs) / gib
        mb = max(max(r["sent_bytes"], r["recvd_bytes"]) for r in rs)
        gather = 0.0
        if n > 1:
            # The other ranks' RGB rows (f32, 3 channels) reach rank 0.
            gather = 3 * 4 * size * size * (n - 1) / n / bw * 1e3
        t = tmax + (mb / bw + rs[0]["exchanges"] * lat) * 1e3 * (n > 1) + gather
        dec_model[(size, n)] = t
        serial = dec_model.get((size, 1))
        sp = f"{serial / t:.2f}×" if serial else "–"
        rows = "–".join(sorted({str(r["latent_rows"]) for r in rs}, key=int))
        out.append(f"| {size}² | {n} | {rows} | {tmax:.1f} | {peak:.2f} | {mb / 1e6:.1f} | {t:.1f} | {sp} |")
    if diff:
        out.append("\nThe same VAE in diffusers (`AutoencoderKL.decode`) on the same GPU, beside pcpp's serial decode:\n")
        out.append("| size | diffusers f32 (ms, GiB) | bf16 (ms, GiB) | f32 tiled (ms, GiB) | pcpp 1 GPU (ms, GiB) | pcpp / diffusers f32 | pcpp 8 GPUs modelled (ms) |")
        out.append("|---|---|---|---|---|---|---|")
        for size in sorted({s for s, _ in diff}):
            def cell(mode):
                r = diff.get((size, mode))
                if not r or r.get("decode_ms") is None:
                    return "–" if not r else r.get("error", "–")
                return f"{r['decode_ms']:.0f}, {r['peak_bytes'] / gib:.1f}"
            p = dec.get((size, 1))
            pc = f"{p[0]['decode_ms']:.0f}, {(p[0]['peak_bytes'] or 0) / gib:.1f}" if p else "–"
            f32 = diff.get((size, "f32"), {}).get("decode_ms")
            ratio = f"{p[0]['decode_ms'] / f32:.2f}×" if p and f32 else "–"
            m8 = f"{dec_model[(size, 8)]:.0f}" if (size, 8) in dec_model else "–"
            out.append(f"| {size}² | {cell('f32')} | {cell('bf16')} | {cell('f32_tiled')} | {pc} | {ratio} | {m8} |")

    band = load(a.band)
    if band and a.encode_s is not None:
        full, ranks = {}, defaultdict(list)
        for r in band:
            size = r["latent_hw"][0] * 8
            t = r["steady_step_graph_ms"] if r.get("steady_step_graph_ms") is not None else r["steady_step_ms"]
            r["_t"] = t
            if r["ranks"] == 1:
                full[size] = t
            elif r["mode"] == "pcpp":
                ranks[(size, r["ranks"])].append(r)

        def stale(t):
            return sum(t.get(k, 0) for k in ("halo", "attention", "group_norm"))

        out.append(f"\nOne image end to end ({a.steps} steps, text encoders {a.encode_s:.2f} s), 1 GPU against 8 GPUs modelled (pcpp, CFG split):\n")
        out.append("| size | 1 GPU: step (ms) | 1 GPU: decode (ms) | 1 GPU: image (s) | 8 GPUs: step (ms) | 8 GPUs: decode (ms) | 8 GPUs: image (s) | speed-up |")
        out.append("|---|---|---|---|---|---|---|---|")
        for (size, n), rs in sorted(ranks.items()):
            if n != 8 or size not in full or (size, 1) not in dec_model or (size, 8) not in dec_model:
                continue
            tc = max(r["_t"] for r in rs)
            sb = max(max(stale(r["steady_traffic"]["sent"]), stale(r["steady_traffic"]["recvd"])) for r in rs)
            gb = max(max(r["steady_traffic"]["sent"].get("gather", 0), r["steady_traffic"]["recvd"].get("gather", 0)) for r in rs)
            step = max(tc, 1e3 * sb / bw) + 1e3 * gb / bw
            one = a.encode_s + (a.steps * full[size] + dec_model[(size, 1)]) / 1e3
            eight = a.encode_s + (a.steps * step + dec_model[(size, 8)]) / 1e3
            out.append(f"| {size}² | {full[size]:.1f} | {dec_model[(size, 1)]:.0f} | {one:.2f} | {step:.1f} | {dec_model[(size, 8)]:.0f} | {eight:.2f} | {one / eight:.2f}× |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
