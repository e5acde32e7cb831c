# The user's command against diffusers' pipeline, on one GPU, in one run.
#
#   python3 bench/generate_vs_diffusers.py --bin PCPP_CLI --model MODEL_DIR --out OUT_DIR \
#       [--case 1024:50 --case 2048:10 ...] [--ranks 2] [--prompt TEXT]
#
# For each case HEIGHT:STEPS (square images, Euler, CFG 5, fp16):
#   1. bench/diffusers_sdxl_pipeline.py builds MODEL_DIR if missing (full-size SDXL-base layout,
#      seeded random fp16 weights), times diffusers' from_pretrained and its whole pipeline call
#      (median of 3, after a warm-up call) and writes its initial noise, image and final latents;
#   2. `pcpp-cli generate --device cuda` from that noise, timed from process start to exit (the
#      whole process: loading, one image, writing the PNG), with its report (load time, per-stage
#      times, peak GPU memory) -- the image and latents are compared with diffusers' (PSNR);
#   3. `pcpp-cli generate --prompts` with three lines: one process, models loaded once, the time of
#      each image as `generate` prints it (the 2nd and 3rd are "models already loaded" images).
# With --ranks N, the first case also runs `--transport local --ranks N` (ranks sharing the GPU)
# and compares its image with the one-rank image.
# Writes OUT_DIR/summary.json and prints it.
import argparse, json, os, re, subprocess, sys, time

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

ap = argparse.ArgumentParser()
ap.add_argument("--bin", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--case", action="append", default=[])
ap.add_argument("--ranks", type=int, default=0)
ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for every pcpp-cli generate")
a = ap.parse_args()
cases = [tuple(int(x) for x in c.split(":")) for c in (a.case or ["1024:50"])]
os.makedirs(a.out, exist_ok=True)
here = os.path.dirname(os.path.abspath(__file__))


def psnr(x, y, peak):
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def image_psnr(p, q):
    return psnr(np.asarray(Image.open(p).convert("RGB")), np.asarray(Image.open(q).convert("RGB")), 255.0)


def latents_psnr(p, q):
    x, y = load_file(p)["latents"], load_file(q)["latents"]
    return psnr(x, y, float(np.abs(y).max()))


def run(cmd, log):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    open(log, "w").write(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")
    return dt, r.stderr


summary = {"cases": []}
for size, steps in cases:
    tag = f"{size}x{size}"
    d = subprocess.run([sys.executable, f"{here}/diffusers_sdxl_pipeline.py", a.model, a.out, "--size", str(size),
                        str(size), "--steps", str(steps), "--prompt", a.prompt], capture_output=True, text=True)
    if d.returncode != 0:
        sys.stderr.write(d.stdout + d.stderr)
        raise SystemExit("diffusers anchor failed")
    diff = json.loads(open(f"{a.out}/diffusers_{tag}.json").read())
    base = [a.bin, "generate", "--device", "cuda", "--model", a.model, "--steps", str(steps),
            "--guidance", "5", "--scheduler", "euler", "--height", str(size), "--width", str(size)] + a.extra
    one = base + ["--prompt", a.prompt]
    png, lat, rep = f"{a.out}/pcpp_{tag}.png", f"{a.out}/pcpp_latents_{tag}.safetensors", f"{a.out}/pcpp_{tag}.json"
    wall, err = run(one + ["--init-noise", f"{a.out}/noise_{tag}.safetensors", "--output", png, "--save-latents", lat,
                            "--report", rep, "-v"], f"{a.out}/pcpp_{tag}.log")
    report = json.loads(open(rep).read())
    prompts = f"{a.out}/prompts.txt"
    open(prompts, "w").write((a.prompt + "\n") * 3)
    wdir = f"{a.out}/warm_{tag}"
    subprocess.run(["rm", "-rf", wdir])
    wall3, err3 = run(base + ["--prompts", prompts, "--output-dir", wdir, "-v"], f"{a.out}/pcpp_warm_{tag}.log")
    per_image = [float(x) for x in re.findall(r"wrote \S+ in ([0-9.]+) s", err3)]
    warm = sorted(per_image[1:])[len(per_image[1:]) // 2] if len(per_image) > 1 else float("nan")
    c = {
        "size": size, "steps": steps,
        "diffusers": diff,
        "pcpp_process_s": wall, "pcpp_load_s": report["load_seconds"], "pcpp_first_image_s": report["image_seconds"],
        "pcpp_encode_s": report["encode_seconds"], "pcpp_denoise_s": report["denoise_seconds"],
        "pcpp_decode_s": report["decode_seconds"],
        "pcpp_peak_GiB": (report["peak_gpu_allocated_bytes"] or 0) / 2**30,
        "pcpp_peak_reserved_GiB": (report["peak_gpu_reserved_bytes"] or 0) / 2**30,
        "pcpp_images_s": per_image, "pcpp_warm_image_s": warm, "pcpp_three_images_process_s": wall3,
        "image_psnr_db": image_psnr(png, f"{a.out}/diffusers_{tag}.png"),
        "latents_psnr_db": latents_psnr(lat, f"{a.out}/diffusers_latents_{tag}.safetensors"),
    }
    c["ratio_image"] = warm / diff["image_s"]
    c["ratio_process"] = wall / (diff["load_s"] + diff["image_s"])
    c["ratio_peak"] = c["pcpp_peak_GiB"] / diff["peak_GiB"]
    if len(summary["cases"]) == 0:
        # The same image with the VAE in bf16 instead of diffusers' f32 upcast: speed and parity.
        png_b, rep_b = f"{a.out}/pcpp_{tag}_vae_bf16.png", f"{a.out}/pcpp_{tag}_vae_bf16.json"
        run(one + ["--init-noise", f"{a.out}/noise_{tag}.safetensors", "--output", png_b, "--vae-dtype", "bf16",
                   "--report", rep_b], f"{a.out}/pcpp_{tag}_vae_bf16.log")
        rb = json.loads(open(rep_b).read())
        c["vae_bf16"] = {"decode_s": rb["decode_seconds"], "image_psnr_db": image_psnr(png_b, f"{a.out}/diffusers_{tag}.png")}
    summary["cases"].append(c)
    print(json.dumps(c), flush=True)
    if a.ranks > 1 and "ranks" not in summary:
        png_r = f"{a.out}/pcpp_{tag}_ranks{a.ranks}.png"
        wall_r, err_r = run(one + ["--init-noise", f"{a.out}/noise_{tag}.safetensors", "--output", png_r,
                                    "--transport", "local", "--ranks", str(a.ranks),
                                    "--report", f"{a.out}/pcpp_{tag}_ranks.json", "-v"], f"{a.out}/pcpp_ranks.log")
        rr = json.loads(open(f"{a.out}/pcpp_{tag}_ranks.json").read())
        summary["ranks"] = {"size": size, "ranks": a.ranks, "process_s": wall_r, "image_s": rr["image_seconds"],
                            "denoise_s": rr["denoise_seconds"], "peak_GiB": (rr["peak_gpu_allocated_bytes"] or 0) / 2**30,
                            "image_psnr_vs_one_rank_db": image_psnr(png_r, png)}
        print(json.dumps(summary["ranks"]), flush=True)
open(f"{a.out}/summary.json", "w").write(json.dumps(summary, indent=1))
print(json.dumps(summary))
