#!/usr/bin/env bash
# Produces docs/quality.md: PSNR / SSIM of patch-parallel images against the serial image for
# pcpp at several portions, distrifusion and naive patch, on 2, 4 and 8 ranks, with the tiny
# random-weight model shipped in the repository (so the numbers show the schemes' relative
# behaviour, not SDXL's image quality).
#
# The table replaces everything above the "## Group-norm modes" section of docs/quality.md.
#
# Usage: scripts/quality-table.sh [STEPS] [SIZE]     (defaults 20 steps, 128×128 pixels)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-20}
SIZE=${2:-128}
cargo build --release -q -p pcpp-cli
BIN=target/release/pcpp-cli
DIR=$(mktemp -d)
PROMPT="A painting of a squirrel eating a burger"
common=(generate --prompt "$PROMPT" --steps "$STEPS" --height "$SIZE" --width "$SIZE" --seed 1)
$BIN "${common[@]}" --output "$DIR/serial.png"
REST=$(awk '/^## Group-norm modes/{p=1} p' docs/quality.md 2>/dev/null || true)
{
  echo "# Quality of the parallel schemes against serial output"
  echo
  echo "Produced by \`scripts/quality-table.sh $STEPS $SIZE\`: the tiny random-weight SDXL model in"
  echo "\`models/tiny-sdxl\` (random weights: the images are noise-like, so these figures compare the"
  echo "schemes' deviation from the serial result, not picture quality), prompt \"$PROMPT\", seed 1,"
  echo "${SIZE}×${SIZE} pixels, $STEPS Euler steps, guidance 5, 4 synchronous warm-up steps (none for naive"
  echo "patch), CFG split (N ranks = two groups of N/2 bands: with 2 ranks each branch runs whole on one rank, hence identical to serial), corrected asynchronous group norm, \`--transport local\`. PSNR (dB) and SSIM of"
  echo "each image against the serial image, from \`pcpp-cli compare\`."
  echo
  echo "| scheme | portion | 2 ranks PSNR / SSIM | 4 ranks PSNR / SSIM | 8 ranks PSNR / SSIM |"
  echo "|---|---|---|---|---|"
  for scheme in "pcpp 0" "pcpp 0.1" "pcpp 0.3" "pcpp 0.5" "pcpp 1" "distrifusion -" "naive-patch -"; do
    set -- $scheme
    row="| $1 | $2 |"
    for n in 2 4 8; do
      extra=(--parallel "$1" --ranks "$n")
      [[ "$2" != "-" ]] && extra+=(--portion "$2")
      out="$DIR/$1-$2-$n.png"
      $BIN "${common[@]}" "${extra[@]}" --output "$out" 2>"$DIR/log"
      row="$row $($BIN compare "$DIR/serial.png" "$out" | awk '{printf "%s / %s", $2, $5}') |"
    done
    echo "$row"
  done
  if [[ -n "$REST" ]]; then
    echo
    echo "$REST"
  fi
} > "$DIR/quality.md"
mv "$DIR/quality.md" docs/quality.md
rm -rf "$DIR"
cat docs/quality.md
