#!/usr/bin/env bash
# What each kind of kernel costs inside the replayed UNet step graph (docs/benchmarks.md, "Where
# the band's time goes inside the graph"): `pcpp-cli bench --kernel-costs` times the steady step
# with each kind of node (kernel name, memcpy, memset; then the library kernels, this source's
# kernels, every kernel, every node) switched off in the CUDA graph, beside the step with
# everything on, for the full-size SDXL-base UNet config with seeded random weights:
#   - band:  one rank of 8 at 1024² (pcpp, CFG split: a 32-row band at b = 1);
#   - naive: the same band under naive patch parallelism (no stale windows, no halos);
#   - full:  the whole 1024² image at b = 2.
# First the GPU test of switching graph nodes off and on. Tables go to OUT/costs_CASE.md.
#   bench/gpu-kernel-costs.sh BIN_DIR OUT_DIR
# Environment: CASES (default "band naive full"), ITERS (timed replays per measurement, 20).
set -uo pipefail
source "$(dirname "$0")/unet-bench-lib.sh"
gpu_test cuda_parity 120 graph_nodes capture_graph
grep -hE "^test |test result|panicked" "$OUT/cuda_parity.txt"
for case in ${CASES:-band naive full}; do
    case $case in
    band) flags=("${BAND[@]}" --parallel pcpp) ;;
    naive) flags=("${BAND[@]}" --parallel naive-patch) ;;
    full) flags=(--height 128 --width 128 --batch 2) ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
    esac
    timeout 400 "$BIN/pcpp-cli" bench --device cuda --config "$UNET_CFG" --random-weights \
        --warmup 3 --iters "${ITERS:-20}" --kernel-costs "${flags[@]}" \
        >"$OUT/costs_$case.md" 2>"$OUT/costs_$case.err" || status=1
    echo "== $case"
    cat "$OUT/costs_$case.md"
done
exit $status
