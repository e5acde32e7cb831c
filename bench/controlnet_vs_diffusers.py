# ControlNet on one GPU: `pcpp-cli generate --controlnet` against diffusers'
# StableDiffusionXLControlNetPipeline, same model, ControlNet, control image and noise.
#
#   python3 bench/controlnet_vs_diffusers.py --bin PCPP_CLI --model MODEL_DIR --out OUT_DIR \
#       [--size 1024] [--steps 50] [--ranks 2] [--prompt TEXT]
#
# 1. MODEL_DIR is the full-size random-weight SDXL folder of bench/diffusers_sdxl_pipeline.py (built
#    with it when missing). OUT_DIR/controlnet is made once: ControlNetModel.from_unet(that UNet)
#    (seed 11), every zero convolution given seeded random weights (std 0.5/sqrt(fan_in), so the
#    net changes the image and stays finite in fp16), saved in fp16 with save_pretrained.
#    OUT_DIR/control.png: a size x size pattern of lines and discs (a stand-in for an edge map).
# 2. diffusers: from_pretrained(MODEL_DIR, controlnet=...) in fp16 on the GPU, Euler, CFG 5,
#    controlnet_conditioning_scale 0.8, from the seed-7 noise of diffusers_sdxl_pipeline.py; one
#    warm-up call, then 3 timed calls (median); per-step time from a step-end callback (median of
#    the step intervals, synchronised), peak memory.
# 3. pcpp: `generate --device cuda --controlnet OUT_DIR/controlnet --control-image ... --control-scale
#    0.8` from the same noise, with --report (denoise seconds / steps = per-step cost) and the same
#    without --controlnet (the ControlNet's share of a step); with --ranks N also N local ranks
#    sharing the GPU (image PSNR against one rank).
# Image and latents PSNR of pcpp against diffusers. Writes OUT_DIR/controlnet_summary.json and prints it.
import argparse, json, os, subprocess, sys, time

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.numpy import load_file

ap = argparse.ArgumentParser()
ap.add_argument("--bin", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--size", type=int, default=1024)
ap.add_argument("--steps", type=int, default=50)
ap.add_argument("--ranks", type=int, default=0)
ap.add_argument("--scale", type=float, default=0.8)
ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
a = ap.parse_args()
os.makedirs(a.out, exist_ok=True)
here = os.path.dirname(os.path.abspath(__file__))
S, N = a.size, a.steps
tag = f"{S}x{S}"


def psnr(x, y, peak):
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def image_psnr(p, q):
    return psnr(np.asarray(Image.open(p).convert("RGB")), np.asarray(Image.open(q).convert("RGB")), 255.0)


def run(cmd, log):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    open(log, "w").write(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t


# 1. model, ControlNet, control image, noise
if not os.path.exists(os.path.join(a.model, "model_index.json")):
    subprocess.run([sys.executable, f"{here}/diffusers_sdxl_pipeline.py", a.model, a.out, "--size", "512", "512",
                    "--steps", "2"], check=True)
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

cn_dir = os.path.join(a.out, "controlnet")
if not os.path.exists(os.path.join(cn_dir, "config.json")):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"), torch_dtype=torch.float32)
    torch.manual_seed(11)
    net = ControlNetModel.from_unet(unet)
    g = torch.Generator("cpu").manual_seed(12)
    names = [f"controlnet_down_blocks.{i}" for i in range(len(net.controlnet_down_blocks))]
    with torch.no_grad():
        for name in names + ["controlnet_mid_block", "controlnet_cond_embedding.conv_out"]:
            conv = net.get_submodule(name)
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5 / conv.weight[0].numel() ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.05)
    net.to(torch.float16).save_pretrained(cn_dir, safe_serialization=True)
    del unet, net
control = os.path.join(a.out, f"control_{tag}.png")
img = Image.new("RGB", (S, S), "black")
d = ImageDraw.Draw(img)
rng = np.random.default_rng(3)
for _ in range(40):
    x0, y0, x1, y1 = (int(v) for v in rng.integers(0, S, 4))
    d.line((x0, y0, x1, y1), fill="white", width=max(2, S // 256))
for _ in range(12):
    x, y, r = int(rng.integers(0, S)), int(rng.integers(0, S)), int(rng.integers(S // 32, S // 8))
    d.ellipse((x - r, y - r, x + r, y + r), outline="white", width=max(2, S // 256))
img.save(control)
noise = torch.randn(1, 4, S // 8, S // 8, generator=torch.Generator("cpu").manual_seed(7))
noise_file = os.path.join(a.out, f"cn_noise_{tag}.safetensors")
save_file({"initial_noise": noise.contiguous()}, noise_file)

# 2. diffusers
res = {"size": S, "steps": N, "scale": a.scale}
torch.cuda.synchronize()
t = time.perf_counter()
cn = ControlNetModel.from_pretrained(cn_dir, torch_dtype=torch.float16)
pipe = StableDiffusionXLControlNetPipeline.from_pretrained(a.model, controlnet=cn, torch_dtype=torch.float16).to("cuda")
torch.cuda.synchronize()
res["diffusers_load_s"] = time.perf_counter() - t
pipe.set_progress_bar_config(disable=True)
marks = []


def on_step(_pipe, _i, _t, kw):
    torch.cuda.synchronize()
    marks.append(time.perf_counter())
    return kw


def call(kind):
    marks.clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    marks.append(t0)
    r = pipe(prompt=a.prompt, image=Image.open(control), num_inference_steps=N, guidance_scale=5.0, height=S,
             width=S, controlnet_conditioning_scale=a.scale, latents=noise.to("cuda", torch.float16),
             output_type=kind, callback_on_step_end=on_step)
    torch.cuda.synchronize()
    steps = np.diff(marks)
    return time.perf_counter() - t0, float(np.median(steps)), r.images


call("latent")
torch.cuda.reset_peak_memory_stats()
runs = [call("pil") for _ in range(3)]
runs.sort(key=lambda x: x[0])
res["diffusers_image_s"], res["diffusers_step_s"], imgs = runs[1]
res["diffusers_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
d_png = os.path.join(a.out, f"diffusers_cn_{tag}.png")
imgs[0].save(d_png)
_, _, lat = call("latent")
d_lat = os.path.join(a.out, f"diffusers_cn_latents_{tag}.safetensors")
save_file({"latents": lat.float().cpu().contiguous()}, d_lat)
del pipe, cn
torch.cuda.empty_cache()

# 3. pcpp
base = [a.bin, "generate", "--device", "cuda", "--model", a.model, "--steps", str(N), "--guidance", "5",
        "--scheduler", "euler", "--height", str(S), "--width", str(S), "--prompt", a.prompt,
        "--init-noise", noise_file, "-v"]
cnf = ["--controlnet", cn_dir, "--control-image", control, "--control-scale", str(a.scale)]


def pcpp(name, extra):
    png, lat, rep = (os.path.join(a.out, f"{name}.{e}") for e in ("png", "safetensors", "json"))
    wall = run(base + extra + ["--output", png, "--save-latents", lat, "--report", rep],
               os.path.join(a.out, f"{name}.log"))
    r = json.loads(open(rep).read())
    return png, lat, {"process_s": wall, "load_s": r["load_seconds"], "image_s": r["image_seconds"],
                      "denoise_s": r["denoise_seconds"], "step_s": r["denoise_seconds"] / N,
                      "peak_GiB": (r["peak_gpu_allocated_bytes"] or 0) / 2**30}


png, lat, res["pcpp"] = pcpp(f"pcpp_cn_{tag}", cnf)
_, _, res["pcpp_without_controlnet"] = pcpp(f"pcpp_nocn_{tag}", [])
res["image_psnr_db"] = image_psnr(png, d_png)
x, y = load_file(lat)["latents"], load_file(d_lat)["latents"]
res["latents_psnr_db"] = psnr(x, y, float(np.abs(y).max()))
res["ratio_step"] = res["pcpp"]["step_s"] / res["diffusers_step_s"]
res["ratio_image"] = res["pcpp"]["image_s"] / res["diffusers_image_s"]
res["pcpp_controlnet_step_share"] = 1 - res["pcpp_without_controlnet"]["step_s"] / res["pcpp"]["step_s"]
if a.ranks > 1:
    png_r, _, res["pcpp_ranks"] = pcpp(f"pcpp_cn_{tag}_ranks{a.ranks}",
                                       cnf + ["--transport", "local", "--ranks", str(a.ranks)])
    res["pcpp_ranks"]["ranks"] = a.ranks
    res["pcpp_ranks"]["image_psnr_vs_one_rank_db"] = image_psnr(png_r, png)
open(os.path.join(a.out, "controlnet_summary.json"), "w").write(json.dumps(res, indent=1))
print(json.dumps(res))
