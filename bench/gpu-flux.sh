#!/usr/bin/env bash
# The Flux transformer step on one H200 (issue #19): full-size FLUX.1-dev config with seeded random
# bf16 weights, 512 text tokens, at 1024² (4096 image tokens) and 2048² (16384): pcpp's serial
# step and one rank's steady patch-parallel step for N = 2, 4, 8 (solo transport: the rank's own
# computation and bytes; rank 1, an interior band where there is one) as CUDA-graph replays, beside
# diffusers' FluxTransformer2DModel (bf16, SDPA, CUDA graph) from the same config, one after the
# other (each needs ~24 GB of weights), and the modelled multi-GPU speed-up table.
#
# Usage: bench/gpu-flux.sh BIN_DIR OUT_DIR   (BIN_DIR holds a `--features cuda` pcpp-cli)
# Needs python3 with torch and diffusers for the anchor (PYTHON=... to choose). The anchor runs
# first (it is what every ratio is taken against), then pcpp's runs, each building its own
# random weights (~30 s). RUNS picks them: SIZE:RANKS:MODE items (default every size with
# N = 1, 2, 4, 8 pcpp and N = 4 distrifusion; about 8 minutes); SIZES the anchor's sizes;
# PROFILE=1 adds the per-op-kind breakdown of the eager steps (`--profile`) to the serial runs;
# PCPP_FLASH128=registers-q picks the older head-size-128 attention kernel (Q in registers) and
# PCPP_VECTOR_KERNELS=0 the scalar element-wise kernels (the JSON lines say which ran);
# VARIANTS (e.g. "shared-q,shared-q64,shared-q+fused") times the serial steps once per kernel
# variant on the same weights (`flux-bench --variants`; the fastest is the modelled serial step).
set -euo pipefail
BIN=${1:?usage: gpu-flux.sh BIN_DIR OUT_DIR}
OUT=${2:?usage: gpu-flux.sh BIN_DIR OUT_DIR}
HERE=$(cd "$(dirname "$0")/.." && pwd)
CFG=$HERE/pcpp-flux/configs/flux1-dev/transformer/config.json
PY=${PYTHON:-python3}
SIZES=${SIZES:-1024,2048}
DEFAULT_RUNS=""
for size in ${SIZES//,/ }; do
  DEFAULT_RUNS+=" $size:1:serial $size:2:pcpp $size:4:pcpp $size:8:pcpp $size:4:distrifusion"
done
RUNS=${RUNS:-$DEFAULT_RUNS}
mkdir -p "$OUT"
D=$OUT/flux-diffusers.jsonl
timeout 200 "$PY" "$HERE/bench/diffusers_flux_step.py" "$CFG" --sizes "$SIZES" --iters 5 > "$D" || echo "diffusers anchor failed" >&2
cat "$D"
J=$OUT/flux-pcpp.jsonl
: > "$J"
for run in $RUNS; do
  IFS=: read -r size n mode <<< "$run"
  iters=5; [ "$size" -ge 2048 ] && iters=3
  args=(--height "$size" --width "$size" --iters $iters)
  [ "$n" -gt 1 ] && args+=(--ranks "$n" --rank 1 --parallel "$mode" --portion 0.3)
  [ "$n" -eq 1 ] && [ "${PROFILE:-0}" = 1 ] && args+=(--profile)
  [ "$n" -eq 1 ] && [ -n "${VARIANTS:-}" ] && args+=(--variants "$VARIANTS")
  timeout 150 "$BIN/pcpp-cli" flux-bench --device cuda --config "$CFG" --tokens 512 "${args[@]}" >> "$J" \
    || echo "flux-bench $run failed" >&2
done
cat "$J"
"$PY" "$HERE/scripts/flux-speedup.py" "$J" "$D" | tee "$OUT/flux-speedup.md"
