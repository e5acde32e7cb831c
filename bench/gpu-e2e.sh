#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one command, on a machine with one GPU:
#   bench/gpu-e2e.sh BIN_DIR OUT_DIR
# BIN_DIR holds the stripped release `pcpp-cli` (features cuda,nccl) and, optionally, the test
# binaries `cuda_parity`, `cuda_pipeline_parity` and `cuda_controlnet_parity` (built in a checkout at this same path, since
# they find tests/data through it). diffusers 0.42.1 must be importable (PYTHONPATH).
# Writes OUT_DIR/summary.json (bench/generate_vs_diffusers.py), OUT_DIR/controlnet_summary.json
# (bench/controlnet_vs_diffusers.py), OUT_DIR/tests.txt and
# OUT_DIR/e2e.tgz (every log and report).
set -uo pipefail
BIN=$(realpath "$1"); OUT=$2; WORK=${WORK:-/tmp/pcpp-e2e}
mkdir -p "$OUT" "$WORK"
cd "$(dirname "$0")/.."
for t in cuda_parity cuda_pipeline_parity cuda_controlnet_parity; do
    [ -x "$BIN/$t" ] && timeout 300 "$BIN/$t" --ignored --test-threads 1 >>"$OUT/tests.txt" 2>&1
done
grep -E "test result|FAILED" "$OUT/tests.txt"
# The tiny model on the GPU (also fills the kernel cache for the timed runs).
"$BIN/pcpp-cli" generate --device cuda --dtype f32 --prompt "a fox" --steps 4 --output "$WORK/tiny.png" -v
timeout 480 python3 bench/generate_vs_diffusers.py --bin "$BIN/pcpp-cli" --model "$WORK/sdxl" \
    --out "$WORK" --case 1024:50 --case 2048:10 --ranks 2 | tail -1 >"$OUT/summary.json"
# The cost of a LoRA per step: three 1024² images with a random rank-16 adapter on every attention
# and feed-forward layer (compare the denoise times with pcpp_warm_1024x1024.log).
python3 bench/random_sdxl_lora.py "$WORK/sdxl" "$WORK/lora.safetensors"
printf 'a photo of an astronaut riding a horse on mars\n%.0s' 1 2 3 >"$WORK/prompts3.txt"
rm -rf "$WORK/lora_out"
"$BIN/pcpp-cli" generate --device cuda --model "$WORK/sdxl" --prompts "$WORK/prompts3.txt" \
    --output-dir "$WORK/lora_out" --steps 50 --lora "$WORK/lora.safetensors:0.8" -v \
    >"$WORK/pcpp_lora_1024.log" 2>&1
cat "$WORK/pcpp_lora_1024.log"
# ControlNet: a full-size SDXL ControlNet (from_unet of the random-weight UNet, fp16) at 1024², 50
# steps, against diffusers' StableDiffusionXLControlNetPipeline (per-step cost, ratio, PSNR), and on
# 2 ranks sharing the GPU.
timeout 600 python3 bench/controlnet_vs_diffusers.py --bin "$BIN/pcpp-cli" --model "$WORK/sdxl" \
    --out "$WORK" --size 1024 --steps 50 --ranks 2 | tail -1 >"$OUT/controlnet_summary.json"
cat "$OUT/controlnet_summary.json"
# 4096² on one GPU (pcpp only; diffusers' f32 decode at this size takes about 40 s).
timeout 240 "$BIN/pcpp-cli" generate --device cuda --model "$WORK/sdxl" --prompt "a city at night" \
    --height 4096 --width 4096 --steps 3 --output "$WORK/pcpp_4096.png" --report "$WORK/pcpp_4096.json" -v \
    >"$WORK/pcpp_4096.log" 2>&1
tail -3 "$WORK/pcpp_4096.log"
# The same on 4 ranks sharing the GPU: each rank decodes a quarter of the image (per-rank decode
# seconds and bytes in the report; the peak is the whole GPU's, all ranks together).
timeout 240 "$BIN/pcpp-cli" generate --device cuda --model "$WORK/sdxl" --prompt "a city at night" \
    --height 4096 --width 4096 --steps 3 --ranks 4 --output "$WORK/pcpp_4096_r4.png" \
    --report "$WORK/pcpp_4096_r4.json" -v >"$WORK/pcpp_4096_r4.log" 2>&1
tail -3 "$WORK/pcpp_4096_r4.log"
tar -czf "$OUT/e2e.tgz" "$WORK"/*.log "$WORK"/*.json 2>/dev/null
cat "$WORK"/pcpp_1024x1024.log "$WORK"/pcpp_warm_1024x1024.log "$WORK"/pcpp_ranks.log 2>/dev/null
