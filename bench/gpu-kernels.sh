#!/usr/bin/env bash
# The kernel variants (issues 17 and 19), against each other and against diffusers in one command
# on one GPU:
#   1. GPU parity first: `cuda_parity` (every attention kernel, Hopper's included) and
#      `cuda_vector_parity` (vectorised element-wise kernels, row broadcasts, warp-per-row norms,
#      rotate_pairs, modulated_layer_norm, add_gated), each against the CPU twins;
#   2. the SDXL-base UNet step (seeded random weights, fp16, CUDA graph): 1024² at b = 2 and b = 1,
#      2048² at b = 1, and one rank of 8 (pcpp, a 32-row band at b = 1), once per attention kernel
#      of FLASH_VARIANTS (PCPP_FLASH128; default "shared-q64 hopper ws": the mma.sync kernels,
#      Hopper's warpgroup MMAs, the same warp-specialised); then bench/diffusers_unet.py (diffusers 0.42.1, eager and graph);
#   3. the FLUX.1-dev transformer step at 1024² (bf16, CUDA graph; builds ~24 GB of random
#      weights, ~30 s) for each of FLUX_VARIANTS (`flux-bench --variants`, default
#      "hopper+fused,ws+fused", the first with --profile); then
#      bench/diffusers_flux_step.py at 1024².
#   4. with COMPILE=1, bench/diffusers_unet_compile.py: the same UNet under torch.compile
#      (inductor, channels-last) replayed as a CUDA graph at 1024², b = 2 (compiling takes 2-3
#      minutes).
# About 8 minutes (11 with COMPILE=1). Prints every result line; writes them under OUT_DIR.
#
# Usage: bench/gpu-kernels.sh BIN_DIR OUT_DIR
#   BIN_DIR  pcpp-cli (--features cuda) and the test binaries cuda_parity and cuda_vector_parity:
#              cargo build --release -p pcpp-cli --features cuda
#              cargo test --release -p pcpp-kernels --features cuda --no-run \
#                --test cuda_parity --test cuda_vector_parity
# Environment: PYTHON (a python with torch and diffusers 0.42.1; default python3), SKIP_PARITY=1,
# SKIP_FLUX=1, FLASH_VARIANTS, FLUX_VARIANTS, COMPILE=1.
set -uo pipefail
BIN=$(realpath "${1:?usage: $0 BIN_DIR OUT_DIR}"); OUT=$(realpath -m "${2:?usage: $0 BIN_DIR OUT_DIR}")
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
HERE=$PWD
status=0

echo "== GPU parity"
[[ ${SKIP_PARITY:-0} == 1 ]] || for t in cuda_parity cuda_vector_parity; do
    (cd pcpp-kernels && timeout 240 "$BIN/$t" --ignored --test-threads=1) >"$OUT/$t.txt" 2>&1 || status=1
    grep -E "^test |test result" "$OUT/$t.txt"
done

echo "== SDXL UNet step"
CFG=models/sdxl-base-1.0-configs/unet/config.json
: >"$OUT/unet.jsonl"
unet() { # name, then flags
    local name=$1
    shift
    for fl in ${FLASH_VARIANTS:-shared-q64 hopper ws}; do
        PCPP_FLASH128=$fl timeout 120 "$BIN/pcpp-cli" bench --device cuda --config "$CFG" \
            --random-weights --warmup 3 --iters 20 --json "$@" 2>"$OUT/unet_${name}_$fl.err" \
            | sed "s/^{/{\"case\":\"$name\",\"flash\":\"$fl\",/" >>"$OUT/unet.jsonl" || status=1
    done
}
unet b2_1024 --height 128 --width 128 --batch 2
unet b1_1024 --height 128 --width 128 --batch 1
unet b1_2048 --height 256 --width 256 --batch 1
unet band32 --height 128 --width 128 --batch 2 --parallel pcpp --ranks 8 --rank 1
cat "$OUT/unet.jsonl"
timeout 240 "$PY" bench/diffusers_unet.py >"$OUT/diffusers_unet.json" 2>"$OUT/diffusers_unet.err" || status=1
cat "$OUT/diffusers_unet.json"
if [[ ${COMPILE:-0} == 1 ]]; then
    timeout 400 "$PY" bench/diffusers_unet_compile.py "$OUT/diffusers_unet_compile.json" \
        models/sdxl-base-1.0-configs >/dev/null 2>"$OUT/diffusers_unet_compile.err" || status=1
    cat "$OUT/diffusers_unet_compile.json"
fi

if [[ ${SKIP_FLUX:-0} != 1 ]]; then
    echo "== Flux transformer step"
    FCFG=$HERE/pcpp-flux/configs/flux1-dev/transformer/config.json
    : >"$OUT/flux.jsonl"
    timeout 240 "$BIN/pcpp-cli" flux-bench --device cuda --config "$FCFG" --tokens 512 --height 1024 \
        --width 1024 --iters 5 --profile --variants "${FLUX_VARIANTS:-hopper+fused,ws+fused}" \
        >>"$OUT/flux.jsonl" 2>>"$OUT/flux.err" || status=1
    cat "$OUT/flux.jsonl"
    timeout 200 "$PY" bench/diffusers_flux_step.py "$FCFG" --sizes 1024 --iters 5 \
        >"$OUT/flux_diffusers.jsonl" 2>"$OUT/flux_diffusers.err" || status=1
    cat "$OUT/flux_diffusers.jsonl"
fi
exit $status
