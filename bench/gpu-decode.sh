#!/usr/bin/env bash
# The patch-parallel VAE decode measured on one GPU, beside diffusers' AutoencoderKL.decode on the
# same weights, and the modelled 8-GPU decode and image (docs/benchmarks.md, "The VAE decode"):
#   bench/gpu-decode.sh BIN_DIR OUT_DIR
# BIN_DIR holds the stripped release `pcpp-cli` (features cuda). diffusers 0.42.1 must be
# importable. Environment: SIZES (default "2048 4096"), RANKS (default "1 2 4 8"), BAND (1: also
# time the per-rank pcpp UNet steps at N = 8 for the end-to-end model; default 1), ENCODE_S (text
# encoder seconds for the end-to-end model, from a `generate --report`; default 0.05).
# Writes OUT_DIR/decode.jsonl, OUT_DIR/diffusers_vae.jsonl, OUT_DIR/band/ and OUT_DIR/model.md.
set -uo pipefail
BIN=$(realpath "$1"); OUT=$(realpath -m "$2"); WORK=${WORK:-/tmp/pcpp-decode}
SIZES=${SIZES:-"2048 4096"}; RANKS=${RANKS:-"1 2 4 8"}; BAND=${BAND:-1}; ENCODE_S=${ENCODE_S:-0.05}
mkdir -p "$OUT" "$WORK"
cd "$(dirname "$0")/.."
# One VAE folder with seeded random fp16 weights (SDXL-base config), read by both engines.
timeout 300 python3 bench/diffusers_vae_decode.py "$WORK/model" --sizes $SIZES \
    --make-config models/sdxl-base-1.0-configs/vae >"$OUT/diffusers_vae.jsonl" 2>"$OUT/diffusers_vae.log"
cat "$OUT/diffusers_vae.jsonl"
: >"$OUT/decode.jsonl"
for s in $SIZES; do
    for n in $RANKS; do
        iters=3; [ "$s" -ge 4096 ] && iters=2
        timeout 200 "$BIN/pcpp-cli" decode-bench --device cuda --model "$WORK/model" --height "$s" \
            --width "$s" --ranks "$n" --iters "$iters" --json >>"$OUT/decode.jsonl" 2>>"$OUT/decode.log"
    done
done
if [ "$BAND" = 1 ]; then
    BIN="$BIN" SIZES="$SIZES" RANKS=8 MODES=pcpp ITERS=3 timeout 300 scripts/band-bench.sh "$OUT/band" >/dev/null 2>&1
fi
python3 scripts/model-decode.py --decode "$OUT/decode.jsonl" --diffusers "$OUT/diffusers_vae.jsonl" \
    --band "$OUT/band/bench.jsonl" --encode-s "$ENCODE_S" | tee "$OUT/model.md"
