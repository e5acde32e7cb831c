#!/usr/bin/env bash
# The Flux transformer step on one H200 (issue #19): full-size FLUX.1-dev config with seeded random
# bf16 weights, 512 text tokens, at 1024² (4096 image tokens) and 2048² (16384): pcpp's serial
# step and one rank's steady patch-parallel step for N = 2, 4, 8 (solo transport: the rank's own
# computation and bytes; rank 1, an interior band where there is one) as CUDA-graph replays, then
# diffusers' FluxTransformer2DModel (bf16, SDPA, CUDA graph) from the same config, one after the
# other (each needs ~24 GB of weights), and the modelled multi-GPU speed-up table.
#
# Usage: bench/gpu-flux.sh BIN_DIR OUT_DIR   (BIN_DIR holds a `--features cuda` pcpp-cli)
# Needs python3 with torch and diffusers for the anchor (PYTHON=... to choose). About 5 minutes.
set -euo pipefail
BIN=${1:?usage: gpu-flux.sh BIN_DIR OUT_DIR}
OUT=${2:?usage: gpu-flux.sh BIN_DIR OUT_DIR}
HERE=$(cd "$(dirname "$0")/.." && pwd)
CFG=$HERE/pcpp-flux/configs/flux1-dev/transformer/config.json
PY=${PYTHON:-python3}
mkdir -p "$OUT"
J=$OUT/flux-pcpp.jsonl
: > "$J"
bench() { timeout 150 "$BIN/pcpp-cli" flux-bench --device cuda --config "$CFG" --tokens 512 "$@" >> "$J" || echo "flux-bench $* failed" >&2; }
for size in 1024 2048; do
  iters=5; [ "$size" = 2048 ] && iters=3
  bench --height "$size" --width "$size" --iters $iters
  for n in 2 4 8; do
    bench --height "$size" --width "$size" --iters $iters --ranks $n --rank 1 --parallel pcpp --portion 0.3
  done
  bench --height "$size" --width "$size" --iters $iters --ranks 4 --rank 1 --parallel distrifusion
done
cat "$J"
D=$OUT/flux-diffusers.jsonl
timeout 150 "$PY" "$HERE/bench/diffusers_flux_step.py" "$CFG" --sizes 1024,2048 --iters 5 > "$D" || echo "diffusers anchor failed" >&2
cat "$D"
"$PY" "$HERE/scripts/flux-speedup.py" "$J" "$D" | tee "$OUT/flux-speedup.md"
