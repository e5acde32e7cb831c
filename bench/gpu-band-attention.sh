#!/usr/bin/env bash
# A band's small attention grids (issue 17): the default `ws`, which runs a PCPP band's short
# attentions on the 64-row `mma.sync` kernel with each block's key tiles split between up to four
# groups of warps (`flash_small64s4`), against `ws-split1` (one chain of key tiles a block:
# `flash_small64`), `ws-split2` (up to two groups), `ws-small-wide` (the default for the band's
# level-1 self-attention too) or any other `PCPP_FLASH128` names (CHOICES), in one command on one
# GPU:
#   1. GPU parity first: `cuda_parity`'s attention tests (every kernel against the CPU, the
#      warp-specialised grids bit-equal across tile heights) and `cuda_vector_parity` (the packed
#      attention and the key splits: the small kernel against the CPU, unsplit bit-equal to the
#      128-row `mma.sync` kernel);
#   2. the SDXL-base UNet step (seeded random weights, fp16, CUDA graph) of one rank of 8 (pcpp and
#      naive-patch, a 32-row band at b = 1) with every choice, alternating REPS times in one
#      process on the same weights (`bench --attention`); the whole 1024², b = 2 and 2048², b = 1
#      steps (not small grids: the same kernels either way), for the modelled 8-GPU efficiency
#      1024² / (8 · band); then the band and the 1024² step with each of LT_REDUCTIONS (values
#      of PCPP_LT_REDUCTION, one process each: cuBLASLt's split-K reductions in place or none)
#      beside a default process;
#   3. bench/diffusers_unet.py (diffusers 0.42.1, eager and graph), the anchor, and with COMPILE=1
#      bench/diffusers_unet_compile.py (torch.compile + CUDA graph, about two minutes to compile).
# About 6 minutes (8 with COMPILE=1). Prints every result line; writes them under OUT_DIR.
#
# Usage: bench/gpu-band-attention.sh BIN_DIR OUT_DIR
#   BIN_DIR  pcpp-cli (--features cuda) and the test binaries:
#              cargo build --release -p pcpp-cli --features cuda
#              cargo test --release -p pcpp-kernels --features cuda --no-run \
#                --test cuda_parity --test cuda_vector_parity
# Environment: PYTHON (a python with torch and diffusers 0.42.1; default python3), SKIP_PARITY=1,
# CHOICES (default ws,ws-split1,ws-split2,ws-small-wide), REPS (default 2), LT_REDUCTIONS (default
# "inplace off"; empty skips), COMPILE=1.
set -uo pipefail
source "$(dirname "$0")/unet-bench-lib.sh"

echo "== GPU parity"
if [[ ${SKIP_PARITY:-0} != 1 ]]; then
    # The first process of a machine compiles the kernels (NVRTC): a longer limit.
    gpu_test cuda_parity 300 attention
    gpu_test cuda_vector_parity 180
    grep -hE "^test |test result" "$OUT"/cuda_*.txt
fi

echo "== SDXL UNet step"
: >"$OUT/unet.jsonl"
# Both choices, alternating, REPS rounds, in one process (same weights); one result line each,
# named by its "attention" item.
ONE=${CHOICES:-ws,ws-split1,ws-split2,ws-small-wide}
ALL=$(for _ in $(seq "${REPS:-2}"); do printf '%s,' "$ONE"; done)
ALL=${ALL%,}
unet band32 "${BAND[@]}" --parallel pcpp --attention "$ALL"
unet band32_naive "${BAND[@]}" --parallel naive-patch --attention "$ONE"
unet b2_1024 --height 128 --width 128 --batch 2
for red in ${LT_REDUCTIONS-inplace off}; do
    PCPP_LT_REDUCTION=$red unet "band32_lt_$red" "${BAND[@]}" --parallel pcpp
    PCPP_LT_REDUCTION=$red unet "b2_1024_lt_$red" --height 128 --width 128 --batch 2
done
[[ -n ${LT_REDUCTIONS-inplace off} ]] && unet band32_default "${BAND[@]}" --parallel pcpp
unet b1_2048 --height 256 --width 256 --batch 1
cat "$OUT/unet.jsonl"
timeout 240 "$PY" bench/diffusers_unet.py >"$OUT/diffusers_unet.json" 2>"$OUT/diffusers_unet.err" || status=1
cat "$OUT/diffusers_unet.json"
if [[ ${COMPILE:-0} == 1 ]]; then
    timeout 400 "$PY" bench/diffusers_unet_compile.py "$OUT/compile.json" >"$OUT/compile.out" 2>&1 \
        || status=1
    cat "$OUT/compile.json"
fi
exit $status
