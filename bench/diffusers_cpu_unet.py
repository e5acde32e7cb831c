#!/usr/bin/env python3
"""CPU baseline: one forward of the tiny SDXL UNet in diffusers (torch, float32).

  python bench/diffusers_cpu_unet.py [--threads N] [--model models/tiny-sdxl]
                                     [--inputs tests/data/refs-tiny-sdxl/unet_forward.safetensors]
                                     [--warmup 5] [--iters 50] [--pipeline]

Inputs are the stored reference inputs (batch 2, 4x32x24 latent, 77 tokens). Prints one JSON line
{"diffusers_cpu_unet_ms": median, "threads": N, "torch": version, ...}. With --pipeline it also times the full
tiny SDXL pipeline as in pipeline_euler (prompt 1, guidance 5.0, seed 0, 64x64, 4 Euler steps, output_type
"np", text encoding and VAE decode included) and prints a second JSON line.
Needs the packages of scripts/requirements-reference.txt.
"""
import argparse
import json
import os
import statistics
import time

import torch
from safetensors.torch import load_file


def median_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--model", default="models/tiny-sdxl")
    ap.add_argument("--inputs", default="tests/data/refs-tiny-sdxl/unet_forward.safetensors")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--pipeline", action="store_true", help="also time the full pipeline_euler run")
    ap.add_argument("--pipeline-iters", type=int, default=10)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"), torch_dtype=torch.float32).eval()
    # clone: safetensors' mmap leaves tensors only 8-byte aligned, which moves torch's CPU results by ~1e-6
    # (the references were computed from 64-byte-aligned tensors)
    d = {k: v.clone() for k, v in load_file(a.inputs).items()}
    added = {"text_embeds": d["text_embeds"], "time_ids": d["time_ids"]}

    def fwd():
        with torch.no_grad():
            return unet(d["sample"], d["timestep"], encoder_hidden_states=d["encoder_hidden_states"],
                        added_cond_kwargs=added).sample

    out = fwd()
    check = (out - d["out"]).abs().max().item() if "out" in d else None
    med, best = median_ms(fwd, a.warmup, a.iters)
    print(json.dumps({"diffusers_cpu_unet_ms": round(med, 3), "min_ms": round(best, 3), "threads": a.threads,
                      "torch": torch.__version__, "batch": int(d["sample"].shape[0]),
                      "latent_hw": list(d["sample"].shape[2:]), "warmup": a.warmup, "iters": a.iters,
                      "max_abs_diff_vs_ref": check}), flush=True)

    if a.pipeline:
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(a.model, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        prompt = "A painting of a squirrel eating a burger"

        def run():
            with torch.no_grad():
                return pipe(prompt, guidance_scale=5.0, num_inference_steps=4, height=64, width=64,
                            generator=torch.Generator("cpu").manual_seed(0), output_type="np").images

        pmed, pbest = median_ms(run, 2, a.pipeline_iters)
        print(json.dumps({"diffusers_cpu_pipeline_euler_ms": round(pmed, 3), "min_ms": round(pbest, 3),
                          "threads": a.threads, "torch": torch.__version__, "steps": 4, "size": [64, 64],
                          "cfg_batch": 2, "iters": a.pipeline_iters}), flush=True)


if __name__ == "__main__":
    main()
