#!/usr/bin/env python3
"""The whole-image Flux.1 anchor (issue 19): diffusers' `FluxPipeline` on one GPU, on a FLUX.1-dev
folder with seeded random weights, timed the way a user runs it; bench/gpu-flux-generate.sh runs
it and then `pcpp-cli generate` on the same folder, noise and prompt.

  diffusers_flux_pipeline.py MODEL_DIR OUT_DIR [--size H W] [--steps N] [--guidance G] [--seed S]
                             [--config-dir DIR] [--tokenizers DIR] [--max-shard-size SIZE]

MODEL_DIR is built first when it has no `model_index.json`: every component from the configs in
--config-dir (default: this repository's `pcpp-flux/configs/flux1-dev`, the full-size FLUX.1-dev
configs: 11.9 B-parameter transformer, T5-XXL encoder, CLIP-L, the 16-channel VAE; about 34 GB)
with seeded random weights, built on the GPU in bf16 (seconds), every parameter that starts
constant (zero biases, unit norm weights) given small seeded noise so that a wrong one shows in
the comparison; saved in bf16 as the released repositories are, the transformer and the T5 encoder
in shards of --max-shard-size (default 5GB, `*.safetensors.index.json`). The tokenizers are copied
file for file from --tokenizers (default: this repository's `models/tiny-flux-dev`: the real CLIP
vocabulary and a small T5 Unigram tokenizer, since no T5 tokenizer can be downloaded).

Then: `FluxPipeline.from_pretrained(MODEL_DIR, torch_dtype=bfloat16).to("cuda")` (without CUDA:
the CPU in float32, for a smoke test on tiny configs); the initial noise [1, 16, H/8, W/8] f32
from a CPU generator seeded with --seed, written as tensor `initial_noise` to
OUT_DIR/noise.safetensors (what `pcpp-cli generate --init-noise` reads) and passed packed as
`latents=`; `output_type="latent"` runs (one warm-up, then the median of 3, synchronised), the VAE
decode of the final latents timed apart; the final latents unpacked [1, 16, H/8, W/8] f32 (before
the VAE's scale and shift, as `pcpp-cli generate --save-latents` writes them) to
OUT_DIR/diffusers_latents.safetensors (tensor `latents`) and the image to OUT_DIR/diffusers.png.
Prints one JSON line: {"impl": "diffusers", "height", "width", "steps", "seconds" (encode and
denoise, median), "decode_seconds", "image_seconds" (the two together), "peak_gib", "load_seconds",
"warmup_seconds" (the first call, like pcpp's one image per process), ...}, also written to
OUT_DIR/diffusers.json. --build-only stops after building MODEL_DIR (to split a slow first run).
"""
import argparse
import gc
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of an astronaut riding a horse on mars"
PERTURB_SCALE = 0.1


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="FluxPipeline folder (built with random weights if it has no model_index.json)")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--size", nargs=2, type=int, default=[1024, 1024], metavar=("H", "W"))
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial noise (CPU generator)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (median)")
    ap.add_argument("--config-dir", default=str(REPO / "pcpp-flux/configs/flux1-dev"))
    ap.add_argument("--tokenizers", default=str(REPO / "models/tiny-flux-dev"),
                    help="folder whose tokenizer/ and tokenizer_2/ are copied into a new MODEL_DIR")
    ap.add_argument("--max-shard-size", default="5GB", help="shard size of the saved weights")
    ap.add_argument("--weight-seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--build-only", action="store_true", help="build MODEL_DIR if missing, then stop")
    return ap.parse_args()


def perturb_constant_params(module, seed):
    """Add seeded noise to every parameter whose values are all equal (zero biases, unit norm weights)."""
    n = 0
    with torch.no_grad():
        for _, p in module.named_parameters():
            flat = p.reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                g = torch.Generator(device=p.device).manual_seed(seed + n)
                p.add_(PERTURB_SCALE * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype))
                n += 1
    return n


def copy_real(src, dst):
    """Copy the folder `src` to `dst` with the files behind any symbolic links, not the links."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(os.path.realpath(src), dst, symlinks=False)


def build_model(a, device):
    """Write a FluxPipeline folder with seeded random bf16 weights from --config-dir."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    c = Path(a.config_dir)
    for sub in ("transformer/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "scheduler/scheduler_config.json"):
        if not (c / sub).is_file():
            raise SystemExit(f"--config-dir {c}: {sub} is missing")
    tok = Path(a.tokenizers)
    for sub in ("tokenizer", "tokenizer_2"):
        if not (tok / sub).is_dir():
            raise SystemExit(f"--tokenizers {tok}: {sub}/ is missing")
    t = time.perf_counter()
    torch.manual_seed(a.weight_seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(c / "transformer"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(c / "vae"))
            clip = CLIPTextModel(CLIPTextConfig.from_pretrained(c / "text_encoder"))
            t5 = T5EncoderModel(T5Config.from_pretrained(c / "text_encoder_2"))
    finally:
        torch.set_default_dtype(torch.float32)
    counts = {}
    for i, (name, m) in enumerate((("transformer", transformer), ("vae", vae), ("text_encoder", clip),
                                   ("text_encoder_2", t5))):
        m.to(torch.bfloat16).eval()
        perturbed = perturb_constant_params(m, 1000 * (i + 1))
        counts[name] = {"parameters": sum(p.numel() for p in m.parameters()), "perturbed": perturbed}
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            FlowMatchEulerDiscreteScheduler.load_config(c / "scheduler")),
        vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(tok / "tokenizer"),
        text_encoder_2=t5, tokenizer_2=T5TokenizerFast.from_pretrained(tok / "tokenizer_2"),
        transformer=transformer)
    built = time.perf_counter() - t
    tmp = Path(str(a.model).rstrip("/") + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=a.max_shard_size)
    for sub in ("tokenizer", "tokenizer_2"):
        copy_real(tok / sub, tmp / sub)
    with open(tmp / "random_weights.json", "w") as f:
        json.dump({"config_dir": Path(a.config_dir).name, "weight_seed": a.weight_seed,
                   "perturb_scale": PERTURB_SCALE, "components": counts}, f, indent=1)
    shutil.rmtree(a.model, ignore_errors=True)
    os.replace(tmp, a.model)  # model_index.json appears only once every file is written
    del pipe, transformer, vae, clip, t5
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"build_seconds": built, "save_seconds": time.perf_counter() - t - built, "components": counts}


def main():
    a = parse_args()
    h, w = a.size
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    os.makedirs(a.out, exist_ok=True)
    res = {"impl": "diffusers", "height": h, "width": w, "steps": a.steps, "guidance": a.guidance,
           "device": device, "dtype": str(dtype).removeprefix("torch.")}
    if not os.path.isfile(os.path.join(a.model, "model_index.json")):
        res["built"] = build_model(a, device)
    if a.build_only:
        print(json.dumps(res), flush=True)
        return

    from diffusers import FluxPipeline

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    t = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(a.model, torch_dtype=dtype).to(device)
    sync()
    res["load_seconds"] = time.perf_counter() - t
    pipe.set_progress_bar_config(disable=True)
    f = pipe.vae_scale_factor
    c = pipe.transformer.config.in_channels // 4
    if h % (2 * f) or w % (2 * f):
        raise SystemExit(f"--size {h} {w}: both must be multiples of {2 * f} (2 x the VAE scale factor)")
    lh, lw = h // f, w // f
    noise = torch.randn(1, c, lh, lw, generator=torch.Generator("cpu").manual_seed(a.seed), dtype=torch.float32)
    save_file({"initial_noise": noise.contiguous()}, os.path.join(a.out, "noise.safetensors"))
    packed = FluxPipeline._pack_latents(noise, 1, c, lh, lw).to(device, dtype)

    def run():
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = pipe(prompt=a.prompt, height=h, width=w, num_inference_steps=a.steps,
                       guidance_scale=a.guidance, latents=packed, output_type="latent").images
        sync()
        return time.perf_counter() - t, out

    def decode(packed_latents):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            z = FluxPipeline._unpack_latents(packed_latents, h, w, f)
            z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type="pil")[0]
        sync()
        return time.perf_counter() - t, image

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res["warmup_seconds"], lat = run()
    decode(lat)
    times = []
    for _ in range(a.runs):
        dt, lat = run()
        times.append(dt)
    res["seconds"] = statistics.median(times)
    res["all_seconds"] = times
    res["decode_seconds"], image = decode(lat)
    res["image_seconds"] = res["seconds"] + res["decode_seconds"]
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    unpacked = FluxPipeline._unpack_latents(lat, h, w, f).float().cpu().contiguous()
    save_file({"latents": unpacked}, os.path.join(a.out, "diffusers_latents.safetensors"))
    image.save(os.path.join(a.out, "diffusers.png"))
    res["nonfinite_latents"] = int((~torch.isfinite(unpacked)).sum())
    line = json.dumps(res)
    with open(os.path.join(a.out, "diffusers.json"), "w") as fh:
        fh.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
