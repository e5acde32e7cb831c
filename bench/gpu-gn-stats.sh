#!/usr/bin/env bash
# Group norms in fewer launches (issue 17): `PCPP_GN_STATS=apply` (`gn_apply_nhwc_stats`: the
# apply finishes the statistics) and `one` (`gn_nhwc_one`: sums, statistics and apply in one
# launch with a grid barrier) against the default `kernel` (sums, a statistics kernel, then
# `gn_apply_nhwc`), in one command on one GPU:
#   1. GPU parity first, all three: `cuda_rows_into`'s statistics-window tests (the NHWC apply
#      on a window, corrected and stale, bit-equal to the NCHW merged norm and its table rows) and
#      `cuda_vector_parity`'s NHWC group norm (against the CPU and bit-equal to the NCHW norm);
#      then `bench/device-comm-bitwise.sh` with `apply` and `one`: the device path's latents over MPI
#      (staged, with and without CUDA graphs; corrected and stale group norms) bit-equal to the
#      local transport's host path;
#   2. the SDXL-base UNet step (seeded random weights, fp16, CUDA graph) of one rank of 8 (pcpp and
#      naive-patch, a 32-row band at b = 1) and of whole 1024², b = 2 and 2048², b = 1 images, the
#      settings alternating REPS times in one process on the same weights (`bench --gn-stats`),
#      for the modelled 8-GPU efficiency 1024² / (8 · band);
#   3. bench/diffusers_unet.py (diffusers 0.42.1, eager and graph), the anchor.
# About 9 minutes: more than one call of a 10-minute limit can hold after a cold start, so
# SKIP_BENCH=1 (steps 1 only) and SKIP_PARITY=1 SKIP_BITWISE=1 (steps 2 and 3) split it in two.
# Prints every result line; writes them under OUT_DIR.
#
# Usage: bench/gpu-gn-stats.sh BIN_DIR OUT_DIR
#   BIN_DIR  pcpp-cli (--features cuda,mpi,ucx,nccl) and the test binaries:
#              cargo build --release -p pcpp-cli --features cuda,mpi,ucx,nccl
#              cargo test --release -p pcpp-kernels --features cuda --no-run \
#                --test cuda_rows_into --test cuda_vector_parity
# Environment: PYTHON (a python with torch and diffusers 0.42.1; default python3), SKIP_PARITY=1,
# SKIP_BITWISE=1 (no MPI on the machine), SKIP_BENCH=1, REPS (default 3).
set -uo pipefail
source "$(dirname "$0")/unet-bench-lib.sh"

if [[ ${SKIP_PARITY:-0} != 1 ]]; then
    echo "== GPU parity"
    # The first process of a machine compiles the kernels (NVRTC): a longer limit.
    gpu_test cuda_rows_into 300 stats_window
    gpu_test cuda_vector_parity 180 nhwc_group_norm
    grep -hE "^test |test result" "$OUT"/cuda_*.txt
fi
if [[ ${SKIP_BITWISE:-0} != 1 ]]; then
    echo "== device path against the host path, statistics in the apply"
    for how in apply one; do
        for mode in corrected stale; do
            run=${how}_$mode
            PCPP_GN_STATS=$how RUNS="mpi_staged mpi_auto_nographs" GEN_EXTRA="--gn-mode $mode" \
                RUN_TIMEOUT=80 DEADLINE=$(($(date +%s) + 100)) timeout 130 \
                bench/device-comm-bitwise.sh "$BIN" "$OUT/bitwise_$run" \
                >"$OUT/bitwise_$run.log" 2>&1 || status=1
            rm -f "$OUT/bitwise_$run"/bitwise/*.safetensors
            sed "s/^/$run: /" "$OUT/bitwise_$run/bitwise.txt" 2>/dev/null || status=1
        done
    done
fi

[[ ${SKIP_BENCH:-0} == 1 ]] && exit $status
echo "== SDXL UNet step"
: >"$OUT/unet.jsonl"
# The three settings, alternating, REPS rounds, in one process (same weights); one result line
# each, named by its "gn_stats" item. Whole images take `apply` for `one` (grids too large).
CHOICES=$(for _ in $(seq "${REPS:-3}"); do printf 'kernel,apply,one,'; done)
CHOICES=${CHOICES%,}
unet band32 "${BAND[@]}" --parallel pcpp --gn-stats "$CHOICES"
unet band32_naive "${BAND[@]}" --parallel naive-patch --gn-stats kernel,apply,one
unet b2_1024 --height 128 --width 128 --batch 2 --gn-stats kernel,apply,kernel,apply
unet b1_2048 --height 256 --width 256 --batch 1 --gn-stats kernel,apply
cat "$OUT/unet.jsonl"
timeout 240 "$PY" bench/diffusers_unet.py >"$OUT/diffusers_unet.json" 2>"$OUT/diffusers_unet.err" || status=1
cat "$OUT/diffusers_unet.json"
exit $status
