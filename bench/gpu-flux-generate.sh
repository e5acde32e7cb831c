#!/usr/bin/env bash
# A whole Flux.1 `generate` image on one GPU against diffusers' FluxPipeline (issue 19): FLUX.1-dev
# at full size with seeded random bf16 weights, 1024², 28 steps, embedded guidance 3.5, the same
# prompt and initial noise in both.
#
#   bench/gpu-flux-generate.sh BIN_DIR OUT_DIR    (BIN_DIR holds a `--features cuda` pcpp-cli)
#
# 1. bench/diffusers_flux_pipeline.py builds MODEL_DIR if it has no model_index.json (the configs in
#    pcpp-flux/configs/flux1-dev, random weights made on the GPU, saved in bf16 with the transformer
#    and T5 in 5 GB shards: about 34 GB on disk, so mind a 64 GB disk), loads it with
#    FluxPipeline.from_pretrained(bf16) and times one image (one warm-up, median of 3) with the
#    noise it writes to OUT_DIR/noise.safetensors.
# 2. A tiny pcpp run (models/tiny-flux-dev) fills the kernel cache, then `pcpp-cli generate` makes
#    the same image from MODEL_DIR (--init-noise, --save-latents, --report), PCPP_RUNS times, each
#    a fresh process (load included in the log, not in the image time).
# 3. With WARM=1 (the default on a GPU, 0 on the CPU) a second pcpp process makes the same
#    prompt twice through --prompts (models loaded once): the second image's time is pcpp's warm
#    image time (no first-use costs), with its encode / denoise / decode split.
# 4. A python step prints both image times and their ratio, and compares the final latents (max abs
#    difference, PSNR against diffusers' peak) and the PNGs (PSNR; null when identical); OUT_DIR/summary.json.
#
# Environment: PYTHON (python with torch, diffusers 0.42.1, transformers, numpy, safetensors,
# Pillow; default python3), MODEL_DIR (default /tmp/flux-random; created here), SIZE (H or HxW,
# default 1024), STEPS (default 28), GUIDANCE (3.5), SEED (0), PROMPT, PCPP_RUNS (1),
# DEVICE (cuda; cpu for a smoke test), WARM (see 3.), CONFIG_DIR (the component configs MODEL_DIR is built from,
# default the full-size FLUX.1-dev ones; models/tiny-flux-dev for a smoke test), SHARD (5GB).
# pcpp's image time is the first image of a fresh process (kernel cache already filled, CUDA graphs
# captured in that image); diffusers' is the median after a warm-up call (its first call's time,
# without decode, is in the summary too).
# Time on one H200 (measured 2026-12-03): about 100 s in all (building and saving the folder
# about 40 s, diffusers' load and 4 images about 30 s, pcpp's tiny warm-up, load and image about
# 20 s). Where a job has a time limit (say 10 minutes), build MODEL_DIR alone first:
#   python3 bench/diffusers_flux_pipeline.py /tmp/flux-random /tmp/flux-build --build-only
# (written to MODEL_DIR.partial and renamed when complete; an existing MODEL_DIR is reused).
# CPU smoke test (about 15 s):
#   DEVICE=cpu SIZE=64 STEPS=4 CONFIG_DIR=models/tiny-flux-dev SHARD=100KB MODEL_DIR=/tmp/tiny-flux-random \
#     PYTHON=python3 bench/gpu-flux-generate.sh target/release /tmp/flux-smoke
set -euo pipefail
BIN=$(cd "${1:?usage: gpu-flux-generate.sh BIN_DIR OUT_DIR}" && pwd)
OUT=${2:?usage: gpu-flux-generate.sh BIN_DIR OUT_DIR}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
MODEL=${MODEL_DIR:-/tmp/flux-random}
SIZE=${SIZE:-1024}
H=${SIZE%x*}
W=${SIZE#*x}
STEPS=${STEPS:-28}
GUIDANCE=${GUIDANCE:-3.5}
SEED=${SEED:-0}
PROMPT=${PROMPT:-a photo of an astronaut riding a horse on mars}
PCPP_RUNS=${PCPP_RUNS:-1}
DEVICE=${DEVICE:-cuda}
SHARD=${SHARD:-5GB}
if [ "$DEVICE" = cuda ]; then WARM=${WARM:-1}; else WARM=${WARM:-0}; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

py_args=(--size "$H" "$W" --steps "$STEPS" --guidance "$GUIDANCE" --seed "$SEED" --prompt "$PROMPT"
         --max-shard-size "$SHARD")
[ -n "${CONFIG_DIR:-}" ] && py_args+=(--config-dir "$CONFIG_DIR")
if [ ! -f "$MODEL/model_index.json" ]; then
  mkdir -p "$(dirname "$MODEL")"
  echo "building $MODEL with random weights; free space there:" >&2
  df -h "$(dirname "$MODEL")" >&2 || true
fi
timeout 540 "$PY" "$HERE/bench/diffusers_flux_pipeline.py" "$MODEL" "$OUT" "${py_args[@]}" \
  2> "$OUT/diffusers.log" | tee "$OUT/diffusers.jsonl" || { tail -20 "$OUT/diffusers.log" >&2; exit 1; }

gen=(--prompt "$PROMPT" --guidance "$GUIDANCE" --device "$DEVICE" -v)
if [ "$DEVICE" = cuda ]; then
  timeout 180 "$BIN/pcpp-cli" generate --model "$HERE/models/tiny-flux-dev" "${gen[@]}" --steps 2 \
    --height 64 --width 64 --output "$OUT/tiny-warm.png" > "$OUT/pcpp-tiny-warm.log" 2>&1 \
    || echo "the tiny warm-up run failed (see $OUT/pcpp-tiny-warm.log)" >&2
fi
for i in $(seq 1 "$PCPP_RUNS"); do
  smi=""
  if [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/pcpp_gpu_mem_$i.txt" &
    smi=$!
  fi
  rc=0
  timeout 300 "$BIN/pcpp-cli" generate --model "$MODEL" "${gen[@]}" --steps "$STEPS" --height "$H" --width "$W" \
    --init-noise "$OUT/noise.safetensors" --save-latents "$OUT/pcpp_latents_$i.safetensors" \
    --report "$OUT/pcpp_report_$i.json" --output "$OUT/pcpp_$i.png" > "$OUT/pcpp_$i.log" 2>&1 || rc=$?
  [ -n "$smi" ] && kill "$smi" 2> /dev/null
  tail -1 "$OUT/pcpp_$i.log"
  [ "$rc" -eq 0 ] || { echo "pcpp-cli generate run $i failed (exit $rc):" >&2; tail -20 "$OUT/pcpp_$i.log" >&2; exit 1; }
done

# A warm image: the same prompt twice through --prompts (models loaded once); the second image's
# time has no first-use costs (different seeds, so no latents comparison).
if [ "$WARM" = 1 ]; then
  printf '%s\n%s\n' "$PROMPT" "$PROMPT" > "$OUT/warm-prompts.txt"
  rm -rf "$OUT/warm"
  timeout 300 "$BIN/pcpp-cli" generate --model "$MODEL" --guidance "$GUIDANCE" --device "$DEVICE" -v \
    --steps "$STEPS" --height "$H" --width "$W" \
    --prompts "$OUT/warm-prompts.txt" --output-dir "$OUT/warm" > "$OUT/pcpp_warm.log" 2>&1 \
    || echo "the warm run failed (see $OUT/pcpp_warm.log)" >&2
fi

"$PY" - "$OUT" "$PCPP_RUNS" << 'EOF' | tee "$OUT/summary.json"
import json, re, statistics, sys
import numpy as np
from PIL import Image
from safetensors.numpy import load_file

out, runs = sys.argv[1], int(sys.argv[2])
d = json.loads(open(f"{out}/diffusers.jsonl").read().strip().splitlines()[-1])


def psnr(x, y, peak):
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * np.log10(peak * peak / mse)  # None: identical


def db(v):
    return "identical" if v is None else f"{v:.1f} dB"


gen, denoise, load, peak, stages = [], [], [], [], []
for i in range(1, runs + 1):
    m = re.search(r"load ([0-9.]+) s, generate ([0-9.]+) s", open(f"{out}/pcpp_{i}.log").read())
    gen.append(float(m.group(2)))
    rep = json.load(open(f"{out}/pcpp_report_{i}.json"))
    denoise.append(sum(rep["step_seconds"]))
    load.append(rep["load_seconds"])
    stages.append({k: rep.get(f"{k}_seconds") for k in ("encode", "denoise", "decode")})
    try:
        mib = [float(v) for v in open(f"{out}/pcpp_gpu_mem_{i}.txt").read().split() if v.strip()]
        peak.append(max(mib) / 1024 if mib else None)
    except FileNotFoundError:
        peak.append(None)
ref = load_file(f"{out}/diffusers_latents.safetensors")["latents"]
lat = load_file(f"{out}/pcpp_latents_{runs}.safetensors")["latents"]
if lat.shape != ref.shape:
    sys.exit(f"latents: pcpp {lat.shape} against diffusers {ref.shape}")
img_ref = np.asarray(Image.open(f"{out}/diffusers.png").convert("RGB"))
img = np.asarray(Image.open(f"{out}/pcpp_{runs}.png").convert("RGB"))
s = {
    "height": d["height"], "width": d["width"], "steps": d["steps"], "device": d["device"],
    "diffusers_image_seconds": d["image_seconds"], "diffusers_seconds_no_decode": d["seconds"],
    "diffusers_decode_seconds": d["decode_seconds"], "diffusers_load_seconds": d["load_seconds"],
    "diffusers_peak_gib": d["peak_gib"], "diffusers_first_call_seconds": d["warmup_seconds"],
    "pcpp_image_seconds": statistics.median(gen), "pcpp_denoise_seconds": statistics.median(denoise),
    "pcpp_load_seconds": statistics.median(load), "pcpp_all_image_seconds": gen,
    "pcpp_stage_seconds": stages[-1],
    "pcpp_gpu_used_gib": peak[-1],
    "latents_max_abs_diff": float(np.abs(lat - ref).max()),
    "latents_max_abs": float(np.abs(ref).max()),
    "latents_psnr_db": psnr(lat, ref, float(np.abs(ref).max())),
    "image_psnr_db": psnr(img, img_ref, 255.0),
    "pcpp_nonfinite_latents": int((~np.isfinite(lat)).sum()),
}
try:
    warm = open(f"{out}/pcpp_warm.log").read()
    times = [float(x) for x in re.findall(r"\(the image's ([0-9.]+) s\)", warm)]
    st = re.findall(r"encode ([0-9.]+) s, denoise ([0-9.]+) s, decode ([0-9.]+) s", warm)
    if len(times) >= 2:
        s["pcpp_warm_image_seconds"] = times[1]
        s["ratio_warm_image"] = times[1] / s["diffusers_image_seconds"]
    if len(st) >= 2:
        s["pcpp_warm_stage_seconds"] = dict(zip(("encode", "denoise", "decode"), map(float, st[1])))
except FileNotFoundError:
    pass
s["ratio_image"] = s["pcpp_image_seconds"] / s["diffusers_image_seconds"]
s["ratio_denoise"] = s["pcpp_denoise_seconds"] / s["diffusers_seconds_no_decode"]
if runs > 1:
    first = load_file(f"{out}/pcpp_latents_1.safetensors")["latents"]
    s["pcpp_runs_bitwise_equal"] = bool(np.array_equal(first, lat))
print(f"# {s['height']}x{s['width']}, {s['steps']} steps on {s['device']}: image pcpp "
      f"{s['pcpp_image_seconds']:.2f} s, diffusers {s['diffusers_image_seconds']:.2f} s "
      f"(pcpp/diffusers {s['ratio_image']:.2f}x; denoise {s['ratio_denoise']:.2f}x); latents max abs diff "
      f"{s['latents_max_abs_diff']:.3g} of {s['latents_max_abs']:.3g}, PSNR {db(s['latents_psnr_db'])}; "
      f"image PSNR {db(s['image_psnr_db'])}", file=sys.stderr)
print(json.dumps(s))
EOF
