#!/usr/bin/env bash
# Bitwise check of the MPI / UCX device exchanges (issue #21): `pcpp-cli generate --device cuda`
# on 4 ranks sharing one GPU, over `--transport mpi` and `--transport ucx` with each device
# exchange path (auto, staged, cuda-aware where the library moves device memory, host), must give
# latents bitwise equal to the local transport (4 ranks as threads of one process, host path) on
# the same GPU. CUDA graphs replay the steady steps of the device-path runs; one run per transport
# also goes without them, so a mismatch can be told apart.
#
# Usage: bench/device-comm-bitwise.sh BIN_DIR OUT_DIR
#   BIN_DIR  holds pcpp-cli built with --features cuda,mpi,ucx,nccl
# Environment:
#   MODEL  model folder (default models/tiny-sdxl, the repository's random-weight SDXL)
#   SIZE   image size in pixels (default 256)
#   STEPS  denoising steps (default 8: 2 synchronous warm-up steps, 2 eager steady steps, 4
#          replayed from CUDA graphs)
#   CUDA_UCX_DIR  folder with the CUDA-enabled UCX libraries (default .whl/ucx)
#   RUNS   the runs to make besides `local` (default all: mpi_auto mpi_staged mpi_host
#          mpi_auto_nographs ucx_auto ucx_staged ucx_cuda-aware ucx_host ucx_auto_nographs)
#   EXTRA_UCX_ENV  space-separated VAR=VALUE pairs exported to the UCX runs only (e.g.
#          "UCX_TLS=^cuda_copy,cuda_ipc,gdr_copy" to run without UCX's CUDA transports)
#   PCPP_DEVICE_WAIT  how the streams wait for MPI / UCX exchanges, passed to every rank when set:
#          stream (the default: a flag wait on the stream) or host-fn (the older blocking host
#          function); each run's start-up line names it
#   PCPP_*  every other kernel choice set (e.g. PCPP_SMALL_GEMM=1) reaches every rank, and the
#          local reference, which runs in this shell's environment
#   GEN_EXTRA  space-separated flags appended to every run's `generate` (e.g. "--no-cfg-split",
#          "--sync-mode none", "--gn-mode stale"), the local reference's too
#   RUN_TIMEOUT  seconds each run may take (default 300)
#   DEADLINE     `date +%s` after which no run starts (a run starts only if it can finish by it);
#                the comparison of what ran is made anyway
# Writes OUT_DIR/bitwise/<name>.{safetensors,log} and OUT_DIR/bitwise.txt (one PASS / FAIL line
# per run); exits non-zero when a run fails or differs.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${1:?usage: $0 BIN_DIR OUT_DIR}
OUT=${2:?usage: $0 BIN_DIR OUT_DIR}
MODEL=${MODEL:-models/tiny-sdxl}
SIZE=${SIZE:-256}
STEPS=${STEPS:-8}
CUDA_UCX_DIR=${CUDA_UCX_DIR:-.whl/ucx}
D="$OUT/bitwise"
mkdir -p "$D"
: >"$OUT/bitwise.txt"

GEN=(generate --model "$MODEL" --prompt "A painting of a squirrel eating a burger" --steps "$STEPS"
    --warmup-steps 2 --height "$SIZE" --width "$SIZE" --seed 7 --device cuda --timeout 120)
read -ra gen_extra <<<"${GEN_EXTRA:-}"
GEN+=("${gen_extra[@]}")
MPIRUN=(mpirun --allow-run-as-root --oversubscribe -n 4)
# Every PCPP_* setting of this shell (kernel choices, PCPP_DEVICE_WAIT) reaches every rank.
for v in $(compgen -e | grep '^PCPP_'); do
    MPIRUN+=(-x "$v=${!v}")
done
# UCX runs load the CUDA-enabled UCX; Open MPI (only their bootstrap) then keeps off UCX.
UCX_ENV=(-x "LD_LIBRARY_PATH=$PWD/$CUDA_UCX_DIR:${LD_LIBRARY_PATH:-}" -x "UCX_MODULE_DIR=$PWD/$CUDA_UCX_DIR/ucx"
    --mca pml ob1 --mca osc ^ucx --mca btl self,vader,tcp)
read -ra extra_ucx <<<"${EXTRA_UCX_ENV:-}"
for kv in "${extra_ucx[@]}"; do
    UCX_ENV+=(-x "$kv")
done

RUNS=${RUNS:-mpi_auto mpi_staged mpi_host mpi_auto_nographs ucx_auto ucx_staged ucx_cuda-aware ucx_host ucx_auto_nographs}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
DEADLINE=${DEADLINE:-0}
rm -f "$D"/*.safetensors

status=0
run() { # name, then the command
    local name=$1
    shift
    local start=$SECONDS limit=$RUN_TIMEOUT
    if [[ $DEADLINE -gt 0 ]]; then
        local left=$((DEADLINE - $(date +%s)))
        if [[ $left -lt 20 ]]; then
            echo "SKIP $name: no time left" | tee -a "$OUT/bitwise.txt"
            status=1
            return
        fi
        [[ $left -lt $limit ]] && limit=$left
    fi
    if timeout -k 5 "$limit" "$@" --save-latents "$D/$name.safetensors" --output "$D/$name.png" >"$D/$name.log" 2>&1; then
        echo "$name: ran in $((SECONDS - start)) s; $(grep -h 'device exchanges' "$D/$name.log" | head -1)"
    else
        local rc=$?
        [[ $rc -eq 124 ]] && rc="timeout after $limit s"
        echo "FAIL $name: exit status $rc ($(grep -h -m1 -E 'FAILED|error' "$D/$name.log" || tail -1 "$D/$name.log"))" \
            | tee -a "$OUT/bitwise.txt"
        rm -f "$D/$name.safetensors"
        status=1
    fi
}

run local "$BIN/pcpp-cli" "${GEN[@]}" --transport local --ranks 4
for name in $RUNS; do
    t=${name%%_*}
    comm=${name#*_}
    flags=(--device-comm "${comm%_nographs}")
    [[ $comm == *_nographs ]] && flags+=(--no-cuda-graphs)
    case $t in
        mpi) run "$name" "${MPIRUN[@]}" "$BIN/pcpp-cli" "${GEN[@]}" --transport mpi "${flags[@]}" ;;
        ucx) run "$name" "${MPIRUN[@]}" "${UCX_ENV[@]}" "$BIN/pcpp-cli" "${GEN[@]}" --transport ucx "${flags[@]}" ;;
        *) echo "FAIL $name: unknown run (mpi_<path> or ucx_<path>[_nographs])" | tee -a "$OUT/bitwise.txt"; status=1 ;;
    esac
done

# Compare the raw bytes of tensor `latents` (safetensors read with the standard library only).
python3 - "$D" >>"$OUT/bitwise.txt" <<'PY' || status=1
import glob, json, os, struct, sys
d = sys.argv[1]
def latents(p):
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        body = f.read()
    t = head["latents"]
    a, b = t["data_offsets"]
    return t["dtype"], t["shape"], body[a:b]
ref_path = os.path.join(d, "local.safetensors")
if not os.path.exists(ref_path):
    print("FAIL local: no reference latents"); sys.exit(1)
ref = latents(ref_path)
bad = 0
for p in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
    name = os.path.basename(p)[:-12]
    if name == "local":
        continue
    got = latents(p)
    if got == ref:
        print(f"PASS {name}: latents bitwise equal to local ({ref[0]} {ref[1]})")
    else:
        bad += 1
        diff = sum(x != y for x, y in zip(got[2], ref[2]))
        print(f"FAIL {name}: latents differ from local ({diff} of {len(ref[2])} bytes; shapes {got[1]} / {ref[1]})")
sys.exit(1 if bad else 0)
PY
cat "$OUT/bitwise.txt"
exit $status
