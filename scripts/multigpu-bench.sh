#!/usr/bin/env bash
# Multi-GPU benchmark of patch parallelism (PCPP §1-§4, §7.4) with the full-size SDXL-base UNet
# config and seeded random weights: serial on one GPU against pcpp / distrifusion / naive-patch on
# 2, 4, ... GPUs over NCCL (and MPI for comparison), CFG on, same initial noise everywhere.
#
# Records per run: steady per-step time, denoising time, bytes sent per rank and per stale step
# (from the runtime's report), and PSNR / SSIM of the final latents against the one-GPU latents.
#
# Usage: scripts/multigpu-bench.sh [OUT_DIR]
# Environment:
#   BIN        folder holding pcpp-cli built with --features cuda,mpi,nccl (default target/release)
#   SIZES      image sizes in pixels (default "1024 2048")
#   GPUS       GPU counts for the parallel runs (default "2 4")
#   MODES      parallel modes (default "pcpp distrifusion naive-patch")
#   TRANSPORTS transports for the parallel runs (default "nccl mpi")
#   MPI_MODES  modes run over MPI (default "pcpp"; NCCL runs every mode)
#   RUN_TIMEOUT seconds one run may take before it is killed (default 600)
#   STEPS      Euler steps per size, e.g. "1024:50 2048:50" (default 50 for every size)
#   PORTION    PCPP portion (default 0.3)
#   DTYPE      f16 (default) or f32
#   GRAPH      1: replay the steady step as a CUDA graph (patch-bench --graph), every run
#   PYTHON     python3 with numpy, safetensors and scikit-image, for PSNR / SSIM (default python3)
# Writes OUT_DIR/<size>_<mode>_<transport>_<n>.json / .safetensors / .log and OUT_DIR/summary.md.
set -uo pipefail

OUT=${1:-multigpu-out}
BIN=${BIN:-target/release}
SIZES=${SIZES:-"1024 2048"}
GPUS=${GPUS:-"2 4"}
MODES=${MODES:-"pcpp distrifusion naive-patch"}
TRANSPORTS=${TRANSPORTS:-"nccl mpi"}
MPI_MODES=${MPI_MODES:-"pcpp"}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
STEPS=${STEPS:-}
PORTION=${PORTION:-0.3}
DTYPE=${DTYPE:-f16}
GRAPH=${GRAPH:-0}
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-models/sdxl-base-1.0-configs}
# NVLink multicast stays off (it can take shared GPUs out of service).
export NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"

steps_for() {
    local size=$1 s
    for s in $STEPS; do
        if [[ ${s%%:*} == "$size" ]]; then
            echo "${s##*:}"
            return
        fi
    done
    echo 50
}

bench() { # name ranks transport mode size steps
    local name=$1 n=$2 transport=$3 mode=$4 size=$5 steps=$6
    local args=(patch-bench --config "$CONFIG" --height "$size" --width "$size" --steps "$steps"
        --dtype "$DTYPE" --device cuda --parallel "$mode" --portion "$PORTION"
        --report "$OUT/$name.json" --save-latents "$OUT/$name.safetensors")
    [[ $GRAPH == 1 ]] && args+=(--graph)
    local start=$SECONDS
    if [[ $n == 1 ]]; then
        timeout "$RUN_TIMEOUT" "$BIN/pcpp-cli" "${args[@]}" --transport local --ranks 1 \
            >"$OUT/$name.log" 2>&1
    else
        timeout "$RUN_TIMEOUT" mpirun --allow-run-as-root --oversubscribe -n "$n" -x NCCL_NVLS_ENABLE \
            "$BIN/pcpp-cli" "${args[@]}" --transport "$transport" >"$OUT/$name.log" 2>&1
    fi
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s: $(grep -h '^patch-bench' "$OUT/$name.log" | tail -1)"
    [[ $rc == 0 ]] || tail -5 "$OUT/$name.log"
}

for size in $SIZES; do
    steps=$(steps_for "$size")
    bench "${size}_serial_local_1" 1 local serial "$size" "$steps"
    for n in $GPUS; do
        for transport in $TRANSPORTS; do
            modes=$MODES
            [[ $transport == mpi ]] && modes=$MPI_MODES
            for mode in $modes; do
                bench "${size}_${mode}_${transport}_${n}" "$n" "$transport" "$mode" "$size" "$steps"
            done
        done
    done
done

"$PYTHON" - "$OUT" <<'EOF'
import glob, json, os, sys
import numpy as np
from safetensors.numpy import load_file
try:
    from skimage.metrics import structural_similarity
except ImportError:
    structural_similarity = None

out = sys.argv[1]
rows = []
for rep in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(rep)[:-5]
    size, mode, transport, n = name.split("_")
    r = json.load(open(rep))
    ser = os.path.join(out, f"{size}_serial_local_1")
    psnr = ssim = float("nan")
    lat = name + ".safetensors"
    if os.path.exists(ser + ".safetensors") and os.path.exists(os.path.join(out, lat)):
        a = load_file(ser + ".safetensors")["latents"][0].astype(np.float64)
        b = load_file(os.path.join(out, lat))["latents"][0].astype(np.float64)
        rng = float(a.max() - a.min())
        mse = float(((a - b) ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * np.log10(rng * rng / mse)
        if structural_similarity is not None:
            ssim = float(np.mean([structural_similarity(a[c], b[c], data_range=rng) for c in range(a.shape[0])]))
    per_rank = r["per_rank"]
    stale = [s for s in per_rank[0]["steps"] if not s["sync"]]
    def tot(t):
        return sum(t.values()) if isinstance(t, dict) else t
    stale_bytes = max((tot(s["traffic"]["sent"]) for s in stale), default=0)
    sync_bytes = max((tot(s["traffic"]["sent"]) for s in per_rank[0]["steps"] if s["sync"]), default=0)
    rows.append(dict(size=int(size), mode=mode, transport=transport, n=int(n), steps=r["steps"],
                     step_ms=1e3 * r["steady_step_seconds"], denoise=r["denoise_seconds"],
                     sync_mb=sync_bytes / 1e6, stale_mb=stale_bytes / 1e6, psnr=psnr, ssim=ssim))
base = {(x["size"]): x["step_ms"] for x in rows if x["mode"] == "serial"}
order = {"serial": 0, "pcpp": 1, "distrifusion": 2, "naive-patch": 3}
rows.sort(key=lambda x: (x["size"], x["n"], x["transport"], order.get(x["mode"], 9)))
lines = ["| size | GPUs | transport | mode | steps | step (ms) | speed-up | denoise (s) | sent/rank, sync step (MB) | sent/rank, stale step (MB) | PSNR latents (dB) | SSIM latents |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
for x in rows:
    sp = base.get(x["size"], float("nan")) / x["step_ms"] if x["step_ms"] > 0 else float("nan")
    lines.append(f"| {x['size']}² | {x['n']} | {x['transport']} | {x['mode']} | {x['steps']} | {x['step_ms']:.1f} | {sp:.2f}× | {x['denoise']:.2f} | {x['sync_mb']:.1f} | {x['stale_mb']:.1f} | {x['psnr']:.1f} | {x['ssim']:.4f} |")
text = "\n".join(lines)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
print(text)
EOF
