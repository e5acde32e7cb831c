# Sourced by the GPU bench scripts that time the SDXL-base UNet step (gpu-small-gemm.sh,
# gpu-band-attention.sh) with their arguments BIN_DIR OUT_DIR: sets BIN and OUT
# (absolute; OUT made), PY (PYTHON or python3) and `status=0`, and moves to the repository root.
# A failure sets `status=1`; the caller exits with it.
#   gpu_test NAME SECONDS [FILTER...]  runs the GPU test binary NAME (ignored tests, one thread;
#                                      the pcpp-kernels ones from that crate's folder) into
#                                      OUT/NAME.txt
#   unet CASE FLAGS...                 one `pcpp-cli bench` of the UNet step (seeded random
#                                      weights, fp16, CUDA graph), its JSON lines tagged with
#                                      "case" and appended to OUT/unet.jsonl
[[ $# -ge 2 ]] || { echo "usage: $0 BIN_DIR OUT_DIR" >&2; exit 2; }
BIN=$(realpath "$1") || exit 2
OUT=$(realpath -m "$2")
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
status=0

UNET_CFG=models/sdxl-base-1.0-configs/unet/config.json
# The 32-row band of one rank of 8 at 1024² (CFG split: four bands at b = 1).
BAND=(--height 128 --width 128 --batch 2 --ranks 8 --rank 1)

gpu_test() {
    local name=$1 secs=$2 dir=.
    shift 2
    [[ -f pcpp-kernels/tests/$name.rs ]] && dir=pcpp-kernels
    (cd "$dir" && timeout "$secs" "$BIN/$name" --ignored --test-threads=1 "$@") \
        >"$OUT/$name.txt" 2>&1 || status=1
}

unet() {
    local name=$1
    shift
    timeout 240 "$BIN/pcpp-cli" bench --device cuda --config "$UNET_CFG" --random-weights \
        --warmup 3 --iters 20 --json "$@" 2>"$OUT/unet_$name.err" \
        | sed "s/^{/{\"case\":\"$name\",/" >>"$OUT/unet.jsonl" || status=1
}
