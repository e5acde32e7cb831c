#!/usr/bin/env python3
"""The VAE-decode anchor: diffusers' `AutoencoderKL.decode` on one GPU, on the same VAE folder
that `pcpp-cli decode-bench --model DIR` times.

    python3 bench/diffusers_vae_decode.py DIR [--sizes 2048 4096] [--make-config CONFIG_DIR]

DIR is a pipeline folder whose `vae/` holds the decoder. With --make-config and no DIR/vae yet,
it first writes DIR/vae with seeded random fp16 weights from that config (the SDXL-base VAE config
in models/sdxl-base-1.0-configs/vae), so both engines read identical weights.

For each size it times (median of CUDA-event timings, after two untimed calls):
  - f32: the decode diffusers' SDXL pipelines run (`force_upcast`: the VAE in f32; PyTorch's
    default allows TF32 in convolutions, as pcpp does for an upcast VAE);
  - bf16: the whole VAE in bf16;
  - f32 tiled: `enable_tiling()` (diffusers' answer to the decode's memory at high resolution);
with the peak of `torch.cuda.max_memory_allocated()` (weights included). Prints one JSON line
per measurement.
"""
import argparse
import json
import os

import torch
from diffusers import AutoencoderKL

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096])
ap.add_argument("--make-config")
ap.add_argument("--iters", type=int, default=3)
ap.add_argument("--skip-f32-above", type=int, default=4096,
                help="skip the untiled f32 decode above this size (it needs ~80 GiB at 4096²)")
a = ap.parse_args()

vae_dir = os.path.join(a.model, "vae")
if not os.path.isdir(vae_dir):
    if not a.make_config:
        raise SystemExit(f"{vae_dir} does not exist (pass --make-config CONFIG_DIR to make it)")
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(a.make_config))
    vae.to(torch.float16).save_pretrained(vae_dir)
    del vae


def timeit(fn, iters):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


torch.manual_seed(1)
with torch.no_grad():
    vae = AutoencoderKL.from_pretrained(vae_dir).cuda().eval()
    for px in a.sizes:
        z = torch.randn(1, vae.config.latent_channels, px // 8, px // 8, device="cuda")
        runs = [("f32", torch.float32, False), ("bf16", torch.bfloat16, False), ("f32_tiled", torch.float32, True)]
        for name, dt, tiled in runs:
            if name == "f32" and px > a.skip_f32_above:
                continue
            vae.to(dt)
            if tiled:
                vae.enable_tiling()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            rec = {"bench": "diffusers_vae_decode", "size": px, "mode": name}
            try:
                rec["decode_ms"] = round(timeit(lambda: vae.decode(z.to(dt)), a.iters), 2)
                rec["peak_bytes"] = torch.cuda.max_memory_allocated()
            except torch.OutOfMemoryError:
                rec["decode_ms"] = None
                rec["error"] = "out of memory"
            vae.disable_tiling()
            print(json.dumps(rec), flush=True)
