#!/usr/bin/env bash
# Where the time of one UNet step goes on the GPU, kernel by kernel (docs/benchmarks.md, "Where
# the UNet step's time goes"): Nsight Systems traces the eager steps of `pcpp-cli bench` (the
# full-size SDXL-base UNet config, seeded random weights, 1024², b = 2; eager so that every
# kernel launch is seen) and its CUDA-kernel summary is written as CSV.
#   bench/gpu-profile.sh BIN_DIR OUT_DIR
# Needs `nsys` (Nsight Systems) on PATH or in the CUDA toolkit; says so and stops without it.
set -uo pipefail
BIN=$(realpath "$1"); OUT=$(realpath -m "$2"); WORK=${WORK:-/tmp/pcpp-profile}
mkdir -p "$OUT" "$WORK"
cd "$(dirname "$0")/.."
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys \
    /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
if [ -z "$NSYS" ]; then
    echo "no nsys on this machine"
    exit 0
fi
# The whole 1024² image at b = 2, and a 32-row band (one rank of 8 with CFG split) at b = 1.
for case in "128 2" "32 1"; do
    set -- $case
    "$NSYS" profile -o "$WORK/unet_$1" --force-overwrite true -t cuda \
        "$BIN/pcpp-cli" bench --device cuda --config models/sdxl-base-1.0-configs/unet/config.json \
        --random-weights --height "$1" --width 128 --batch "$2" --iters 5 --warmup 2 --no-graph \
        >"$OUT/bench_$1.txt" 2>&1
    "$NSYS" stats --report cuda_gpu_kern_sum --format csv -o "$OUT/kern_$1" "$WORK/unet_$1.nsys-rep" \
        >/dev/null 2>&1
done
ls "$OUT"
head -25 "$OUT"/kern_128*.csv
