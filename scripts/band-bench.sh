#!/usr/bin/env bash
# One-GPU per-rank measurement of patch parallelism (PCPP §1-§4, §7.4) with the full-size
# SDXL-base UNet config and seeded random weights:
#   - T_full: the serial UNet step of the whole image (batch 2 = one CFG pair), eager and as a
#     CUDA graph;
#   - for N ranks with CFG split (N/2 bands per branch), every rank's steady (stale) step measured
#     alone (`pcpp-cli bench --parallel MODE --ranks N`, SoloTransport: same bands, windows and
#     byte accounting, nothing delivered), eager and replayed from a CUDA graph, with the bytes the
#     same step posts (from the runtime's report);
#   - a modelled multi-GPU step and patch efficiency T_full / (N * T_step) from those numbers
#     (scripts/model-speedup.py; link bandwidth LINK_GBPS per direction).
#
# Usage: scripts/band-bench.sh [OUT_DIR]
# Environment:
#   BIN        folder holding pcpp-cli built with --features cuda (default target/release)
#   SIZES      image sizes in pixels (default "1024 2048")
#   RANKS      rank counts (default "2 4 8")
#   MODES      parallel modes (default "pcpp distrifusion naive-patch")
#   PORTION    PCPP portion (default 0.3)
#   ITERS      timed steps per measurement (default 10)
#   LINK_GBPS  link bandwidth per direction for the model (default 450, NVLink 4 on H100)
#   PYTHON     python3 for the model table (default python3)
# Writes OUT_DIR/bench.jsonl (one JSON line per measured rank), OUT_DIR/bench.log (errors) and
# OUT_DIR/model.md.
set -uo pipefail

OUT=${1:-band-bench-out}
BIN=${BIN:-target/release}
SIZES=${SIZES:-"1024 2048"}
RANKS=${RANKS:-"2 4 8"}
MODES=${MODES:-"pcpp distrifusion naive-patch"}
PORTION=${PORTION:-0.3}
ITERS=${ITERS:-10}
LINK_GBPS=${LINK_GBPS:-450}
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-models/sdxl-base-1.0-configs/unet/config.json}
mkdir -p "$OUT"
: >"$OUT/bench.jsonl"
: >"$OUT/bench.log"

run() { # label, then bench flags
    local label=$1
    shift
    local start=$SECONDS tmp
    tmp=$(mktemp)
    if "$BIN/pcpp-cli" bench --device cuda --config "$CONFIG" --random-weights --batch 2 \
        --iters "$ITERS" --warmup 3 --portion "$PORTION" --json "$@" >"$tmp" 2>>"$OUT/bench.log"; then
        cat "$tmp" >>"$OUT/bench.jsonl"
        echo "$label: $((SECONDS - start)) s"
    else
        echo "$label: FAILED"
        tail -3 "$OUT/bench.log"
    fi
    rm -f "$tmp"
}

for size in $SIZES; do
    lat=$((size / 8))
    run "${size}_serial_1" --height "$lat" --width "$lat" --ranks 1
    for n in $RANKS; do
        for mode in $MODES; do
            run "${size}_${mode}_${n}" --height "$lat" --width "$lat" --ranks "$n" --parallel "$mode"
        done
    done
done

"$PYTHON" "$(dirname "$0")/model-speedup.py" "$OUT/bench.jsonl" --link-gbps "$LINK_GBPS" | tee "$OUT/model.md"
