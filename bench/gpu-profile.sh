#!/usr/bin/env bash
# Where the time of one UNet step goes on the GPU (docs/benchmarks.md, "Where the UNet step's time
# goes"), for the full-size SDXL-base UNet config with seeded random weights:
#   - the whole 1024² image at b = 2, and one rank of 8 (pcpp, CFG split: a 32-row band at b = 1);
#   - `pcpp-cli bench --profile`: the GPU time of every op kind (CUDA events around each op) over
#     eager steady steps, beside the step's own time;
#   - with Nsight Compute (`ncu`) on the machine, every kernel's GPU time over three eager steps
#     (no clock locking) and DRAM bytes, and scripts/kernel-profile.py's breakdown of the last
#     step by op kind, by kernel (with bandwidth) and, for the largest kernels, by launch shape:
#     the time the kernels themselves take, without the launch gaps that the op events include;
#   - with Nsight Systems (`nsys`) instead, its CUDA-kernel summary as CSV.
#   bench/gpu-profile.sh BIN_DIR OUT_DIR
# Environment: CASES (default "full band"; also "full2048"), SKIP_OPS=1 (only the kernel profile).
set -uo pipefail
BIN=$(realpath "$1"); OUT=$(realpath -m "$2"); WORK=${WORK:-/tmp/pcpp-profile}
mkdir -p "$OUT" "$WORK"
cd "$(dirname "$0")/.."
CFG=models/sdxl-base-1.0-configs/unet/config.json
bench() { # name, then flags
    local name=$1
    shift
    "$BIN/pcpp-cli" bench --device cuda --config "$CFG" --random-weights --height 128 --width 128 \
        --batch 2 --iters 5 --warmup 2 "$@" >"$OUT/$name.txt" 2>&1
}
flags_of() { # case -> bench flags
    case $1 in
    full) echo "--height 128 --width 128 --batch 2" ;;
    band) echo "--height 128 --width 128 --batch 2 --parallel pcpp --ranks 8 --rank 1" ;;
    full2048) echo "--height 256 --width 256 --batch 1" ;;
    esac
}
if [[ ${SKIP_OPS:-0} != 1 ]]; then
    bench ops_full --profile --no-graph
    bench ops_band --profile --no-graph --parallel pcpp --ranks 8 --rank 1
    cat "$OUT/ops_full.txt" "$OUT/ops_band.txt"
fi
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
    for case in ${CASES:-full band}; do
        # shellcheck disable=SC2046
        "$NCU" --clock-control none --metrics gpu__time_duration.sum,dram__bytes.sum \
            --print-units base --csv --page raw \
            --log-file "$OUT/ncu_$case.csv" "$BIN/pcpp-cli" bench --device cuda --config "$CFG" \
            --random-weights --iters 2 --warmup 1 --no-graph $(flags_of $case) \
            >"$OUT/ncu_$case.txt" 2>&1
        python3 scripts/kernel-profile.py "$OUT/ncu_$case.csv" --shapes 12 | tee "$OUT/kern_$case.md"
    done
    exit 0
fi
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys \
    /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
if [ -z "$NSYS" ]; then
    echo "no nsys on this machine"
    exit 0
fi
for case in full band; do
    flags="--no-graph"; [ $case = band ] && flags="--no-graph --parallel pcpp --ranks 8 --rank 1"
    "$NSYS" profile -o "$WORK/unet_$case" --force-overwrite true -t cuda \
        "$BIN/pcpp-cli" bench --device cuda --config "$CFG" --random-weights --height 128 --width 128 \
        --batch 2 --iters 5 --warmup 2 $flags >/dev/null 2>&1
    "$NSYS" stats --report cuda_gpu_kern_sum --format csv -o "$OUT/kern_$case" \
        "$WORK/unet_$case.nsys-rep" >/dev/null 2>&1
done
ls "$OUT"
head -30 "$OUT"/kern_full*.csv
