#!/usr/bin/env bash
# The small-row GEMMs (PCPP_SMALL_GEMM, issue 17) against cuBLASLt in one command on one GPU:
#   1. GPU parity first: `cuda_small_gemm` (every level against the CPU and cuBLASLt),
#      `cuda_vector_parity` (the kernels the band shares with the default path), `cuda_rows_into` (window rows written in place, on cuBLASLt and
#      on the small-row GEMMs, the layer norm inside the row-writing GEMM) and `cuda_unet_parity`
#      (the tiny UNet with and without the small-row GEMMs against diffusers), one thread each
#      (the tests switch the GEMMs for their process);
#   2. the SDXL-base UNet step (seeded random weights, fp16, CUDA graph) of one rank of 8 (pcpp, a
#      32-row band at b = 1) at each PCPP_SMALL_GEMM level (1: GEMMs, GEGLU and layer norms
#      fused; geglu; gemm; 0: cuBLASLt), alternating, REPS times each, with blocks of at most
#      128 and 64 rows and with K split at most 4 and 2 ways, all in one process on the same
#      weights (`bench --small-gemm`); the
#      naive-patch band with them on and off; the whole 1024² step at b = 2 (more than 1 024 rows
#      a GEMM: the same kernels either way), for the modelled 8-GPU efficiency 1024² / (8 · band);
#   3. bench/diffusers_unet.py (diffusers 0.42.1, eager and graph), the anchor.
# About 6 minutes. Prints every result line; writes them under OUT_DIR.
#
# Usage: bench/gpu-small-gemm.sh BIN_DIR OUT_DIR
#   BIN_DIR  pcpp-cli (--features cuda) and the test binaries:
#              cargo build --release -p pcpp-cli --features cuda
#              cargo test --release -p pcpp-kernels --features cuda --no-run \
#                --test cuda_small_gemm --test cuda_vector_parity --test cuda_rows_into
#              cargo test --release --features cuda --no-run --test cuda_unet_parity
# Environment: PYTHON (a python with torch and diffusers 0.42.1; default python3), SKIP_PARITY=1,
# REPS (default 2).
set -uo pipefail
source "$(dirname "$0")/unet-bench-lib.sh"

echo "== GPU parity"
if [[ ${SKIP_PARITY:-0} != 1 ]]; then
    gpu_test cuda_small_gemm 120
    gpu_test cuda_vector_parity 180
    gpu_test cuda_rows_into 120
    gpu_test cuda_unet_parity 180
    grep -hE "^test |test result" "$OUT"/cuda_*.txt
fi

echo "== SDXL UNet step"
: >"$OUT/unet.jsonl"
# Every level, alternating, REPS rounds, then the row and split caps, in one process (same
# weights); one result line each, named by its "small_gemm" item.
LEVELS=$(for _ in $(seq "${REPS:-2}"); do printf '0,gemm,geglu,1,'; done)1/128,1/64,1/256/4,1/256/2,1,0
unet band32 "${BAND[@]}" --parallel pcpp --small-gemm "$LEVELS"
unet band32_naive "${BAND[@]}" --parallel naive-patch --small-gemm 1,0
unet b2_1024 --height 128 --width 128 --batch 2
cat "$OUT/unet.jsonl"
timeout 240 "$PY" bench/diffusers_unet.py >"$OUT/diffusers_unet.json" 2>"$OUT/diffusers_unet.err" || status=1
cat "$OUT/diffusers_unet.json"
exit $status
