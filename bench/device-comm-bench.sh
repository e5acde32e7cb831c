#!/usr/bin/env bash
# Exchange cost of the MPI / UCX device paths (issue #21) with 4 ranks sharing one GPU:
#
# 1. the per-step exchange time of the `pcpp` N = 4 traffic alone: `device_comm bench` moves the
#    bytes one rank sends per steady step (from `pcpp-cli plan` for the SDXL-base config at each
#    size) in EXCHANGES exchanges, each a ring to both neighbours, between device buffers, over
#    MPI and UCX on the old host path (pageable copies and a blocking exchange per message), the
#    staged path and the CUDA-aware path (where the library moves device memory);
# 2. how much of it stays hidden: the steady step of `pcpp-cli patch-bench` (SDXL-base config,
#    seeded random weights, CUDA graphs on the device paths) over each transport and path, against
#    the same ranks' step with the solo transport (`pcpp-cli bench --rank r`, 4 processes at once
#    on the GPU: the same computation and contention, nothing delivered).
#
# Usage: bench/device-comm-bench.sh BIN_DIR OUT_DIR
#   BIN_DIR  holds pcpp-cli and device_comm (features cuda,mpi,ucx,nccl)
# Environment:
#   SIZES       sizes of the exchange bench (default "1024 2048")
#   STEP_SIZES  sizes of the step-time runs (default "1024"; each run loads a full-size UNet per
#               rank, so 2048 roughly doubles this script's time)
#   STEP_RUNS   transport:path pairs of the step-time runs (default "mpi:host mpi:staged
#               ucx:staged ucx:cuda-aware"; each loads a full-size UNet per rank)
#   EXCHANGES   exchanges per step in the exchange bench (default 150)
#   STEPS       patch-bench steps (default 10, 2 of them synchronous warm-up)
#   CUDA_UCX_DIR   CUDA-enabled UCX libraries (default .whl/ucx)
# Writes OUT_DIR/exchange.jsonl, OUT_DIR/steps.jsonl, logs under OUT_DIR/bench/ and the tables in
# OUT_DIR/exchange.md.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${1:?usage: $0 BIN_DIR OUT_DIR}
OUT=${2:?usage: $0 BIN_DIR OUT_DIR}
SIZES=${SIZES:-"1024 2048"}
STEP_SIZES=${STEP_SIZES:-1024}
EXCHANGES=${EXCHANGES:-150}
STEP_RUNS=${STEP_RUNS:-"mpi:host mpi:staged ucx:staged ucx:cuda-aware"}
STEPS=${STEPS:-10}
CUDA_UCX_DIR=${CUDA_UCX_DIR:-.whl/ucx}
CONFIG=models/sdxl-base-1.0-configs
L="$OUT/bench"
mkdir -p "$L"
: >"$OUT/exchange.jsonl"
: >"$OUT/steps.jsonl"

MPIRUN=(mpirun --allow-run-as-root --oversubscribe -n 4)
UCX_ENV=(-x "LD_LIBRARY_PATH=$PWD/$CUDA_UCX_DIR:${LD_LIBRARY_PATH:-}" -x "UCX_MODULE_DIR=$PWD/$CUDA_UCX_DIR/ucx"
    --mca pml ob1 --mca osc ^ucx --mca btl self,vader,tcp)
# Paths per transport: MPI is CUDA-aware only where it says so.
mpi_cuda=$(ompi_info --parsable --all 2>/dev/null | grep -c 'mpi_built_with_cuda_support:value:true')
MPI_PATHS="host staged"
[[ $mpi_cuda -gt 0 ]] && MPI_PATHS="host staged cuda-aware"
UCX_PATHS="host staged cuda-aware"

launch() { # transport, then the command after mpirun's own flags
    local t=$1
    shift
    if [[ $t == ucx ]]; then
        timeout 240 "${MPIRUN[@]}" "${UCX_ENV[@]}" "$@"
    else
        timeout 240 "${MPIRUN[@]}" "$@"
    fi
}

# 1. Exchange time per step.
for size in $SIZES; do
    bytes=$("$BIN/pcpp-cli" plan --config "$CONFIG/unet/config.json" --height "$size" --width "$size" \
        --ranks 4 --parallel pcpp --json | python3 -c '
import json, sys
p = json.load(sys.stdin)
print(max(sum(r["steady"]["sent"].values()) for r in p["ranks"]))')
    for t in mpi ucx; do
        paths=$MPI_PATHS
        [[ $t == ucx ]] && paths=$UCX_PATHS
        for path in $paths; do
            name="exchange_${size}_${t}_$path"
            if launch "$t" "$BIN/device_comm" bench --transport "$t" --device-comm "$path" \
                --bytes "$bytes" --exchanges "$EXCHANGES" --steps 12 >"$L/$name.log" 2>&1; then
                line=$(grep -h '^device_comm bench' "$L/$name.log" | sed 's/^[^{]*//')
                echo "{\"size\": $size, \"transport\": \"$t\", \"path\": \"$path\", \"result\": $line}" >>"$OUT/exchange.jsonl"
                echo "$name: $line"
            else
                echo "$name: FAILED ($(tail -1 "$L/$name.log"))"
            fi
        done
    done
done

# 2. Step time against the solo transport.
for size in $STEP_SIZES; do
    lat=$((size / 8))
    name="solo_$size"
    pids=()
    for r in 0 1 2 3; do
        timeout 300 "$BIN/pcpp-cli" bench --device cuda --config "$CONFIG/unet/config.json" --random-weights \
            --batch 2 --iters 8 --warmup 3 --height "$lat" --width "$lat" --ranks 4 --rank "$r" \
            --parallel pcpp --json >"$L/${name}_$r.json" 2>"$L/${name}_$r.log" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    for r in 0 1 2 3; do
        [[ -s $L/${name}_$r.json ]] && echo "{\"size\": $size, \"transport\": \"solo\", \"path\": \"-\", \"rank\": $r, \"bench\": $(cat "$L/${name}_$r.json")}" >>"$OUT/steps.jsonl"
    done
    for run in $STEP_RUNS; do
        t=${run%%:*} path=${run##*:}
        name="step_${size}_${t}_$path"
        graph=()
        [[ $path != host ]] && graph=(--graph)
        if launch "$t" "$BIN/pcpp-cli" patch-bench --config "$CONFIG" --height "$size" --width "$size" \
            --steps "$STEPS" --warmup-steps 2 --device cuda --parallel pcpp --transport "$t" \
            --device-comm "$path" "${graph[@]}" --report "$L/$name.json" >"$L/$name.log" 2>&1; then
            echo "{\"size\": $size, \"transport\": \"$t\", \"path\": \"$path\", \"report\": \"$L/$name.json\"}" >>"$OUT/steps.jsonl"
            echo "$name: $(grep -h '^patch-bench' "$L/$name.log" | sed 's/.*steady step/steady step/; s/, setup.*//')"
        else
            echo "$name: FAILED ($(tail -1 "$L/$name.log"))"
        fi
    done
done

python3 - "$OUT" <<'PY' | tee "$OUT/exchange.md"
import json, os, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(out, "exchange.jsonl")) if l.strip()]
print("## Exchange time per steady step, pcpp N = 4, 4 ranks on one GPU\n")
print("| size | transport | path | MB per rank per step | exchanges | ms per step | GB/s |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    x = r["result"]
    print(f"| {r['size']}² | {r['transport']} | {r['path']} | {x['bytes_per_step'] / 1e6:.1f} | {x['exchanges']} | {x['step_ms']:.2f} | {x['gbps']:.2f} |")
steps = [json.loads(l) for l in open(os.path.join(out, "steps.jsonl")) if l.strip()]
# Solo baseline per size: the slowest rank, as a CUDA graph (for the device paths, which replay
# graphs) and eager (for the host path, which cannot).
solo = {}
for s in steps:
    if s["transport"] == "solo":
        b = s["bench"]
        for graph in (True, False):
            t = (b.get("steady_step_graph_ms") if graph else None) or b["steady_step_ms"]
            key = (s["size"], graph)
            solo[key] = max(solo.get(key, 0.0), t)
exch = {(r["size"], r["transport"], r["path"]): r["result"]["step_ms"] for r in rows}
print("\n## Steady step against the solo transport (same 4 ranks on the GPU, nothing delivered; graph replays on the device paths, eager on the host path)\n")
print("| size | transport | path | step (ms) | solo step (ms) | exposed (ms) | exchange alone (ms) | hidden |")
print("|---|---|---|---|---|---|---|---|")
for s in steps:
    if s["transport"] == "solo":
        continue
    rep = json.load(open(s["report"]))
    t = rep["steady_step_seconds"] * 1e3
    base = solo.get((s["size"], s["path"] != "host"))
    ex = exch.get((s["size"], s["transport"], s["path"]))
    exposed = t - base if base is not None else float("nan")
    hidden = "" if ex is None or base is None else f"{max(0.0, min(1.0, 1 - exposed / ex)) * 100:.0f} %"
    print(f"| {s['size']}² | {s['transport']} | {s['path']} | {t:.1f} | {base if base is not None else float('nan'):.1f} | {exposed:.1f} | {ex if ex is not None else float('nan'):.2f} | {hidden} |")
PY
