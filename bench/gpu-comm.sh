#!/usr/bin/env bash
# GPU checks of the MPI / UCX device exchanges (issue #21; docs/clusters.md), on one GPU shared by
# the ranks, within a time budget (default 400 s, under the 7 minutes a GPU command may run):
#   1. what the machine offers: Open MPI's CUDA support, the CUDA memory type of the UCX in use;
#   2. the bitwise check first: 4-rank `generate --device cuda` over MPI and UCX against the local
#      transport (bench/device-comm-bitwise.sh, the runs in BITWISE_RUNS, each at most 60 s, all
#      but 180 s of the budget at most);
#   3. the device-memory conformance cases (pcpp_comm::conformance::device), each case at most
#      45 s (device exchange timeout 20 s), the quick 2-rank cases first: staged over MPI and UCX,
#      CUDA-aware over UCX on buffers of CUDA's stream-ordered pool (bounced by pcpp-comm) and of
#      cuMemAlloc (given to UCX as they are), MPI's `auto` (checked: staged for an MPI that is
#      not CUDA-aware) and UCX's `auto` (checked: staged), then the same with 4 ranks;
#   4. with WITH_BENCH=1 and time left: the exchange bench and step time against the solo
#      transport (bench/device-comm-bench.sh) and the link model (scripts/link-model.py).
# A case that would not finish within the budget is skipped and reported as SKIP; at the end the
# script prints every PASS / FAIL / SKIP line and the counts.
#
# Usage: bench/gpu-comm.sh BIN_DIR OUT_DIR
#   BIN_DIR  stripped release binaries built with --features cuda,mpi,ucx,nccl: pcpp-cli and the
#            pcpp-comm example device_comm
#              cargo build --release -p pcpp-cli --features cuda,mpi,ucx,nccl
#              cargo build --release -p pcpp-comm --features mpi,ucx,cuda --example device_comm
#   The CUDA-enabled UCX is taken from .whl/ucx (libucp/ucs/uct/ucm/ucs_signal.so.0, ucx/ with
#   the uct_cuda, ucm_cuda and uct_cma modules, ucx_info), e.g. from the PyPI wheel
#   libucx-cu13==1.22.0; set CUDA_UCX_DIR for another folder.
# Environment: BUDGET (seconds, default 400), BITWISE_RUNS (default "mpi_auto mpi_staged
# ucx_auto ucx_staged"; see bench/device-comm-bitwise.sh), CASE_TIMEOUT (default 45),
# WITH_BENCH=1.
# Writes OUT_DIR/summary.md (everything), OUT_DIR/env.txt, OUT_DIR/conformance.txt,
# OUT_DIR/bitwise.txt and the logs. Exit status non-zero when a case or the bitwise check fails
# or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=$(cd "${1:?usage: $0 BIN_DIR OUT_DIR}" && pwd)
OUT=${2:?usage: $0 BIN_DIR OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export CUDA_UCX_DIR=${CUDA_UCX_DIR:-.whl/ucx}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
BUDGET=${BUDGET:-400}
CASE_TIMEOUT=${CASE_TIMEOUT:-45}
start=$SECONDS
deadline=$(($(date +%s) + BUDGET))
left() { echo $((deadline - $(date +%s))); }
status=0

# 1. The machine.
chmod +x "$CUDA_UCX_DIR/ucx_info" 2>/dev/null
{
    timeout 20 nvidia-smi -L 2>&1 | head -4
    echo "--- Open MPI: $(mpirun --version 2>&1 | head -1)"
    ompi_info --parsable --all 2>/dev/null | grep -E 'mpi_built_with_cuda_support|mpi_extensions' || echo "ompi_info: none"
    echo "--- UCX in $CUDA_UCX_DIR: memory types and CUDA transports"
    LD_LIBRARY_PATH="$PWD/$CUDA_UCX_DIR" UCX_MODULE_DIR="$PWD/$CUDA_UCX_DIR/ucx" timeout 20 "$CUDA_UCX_DIR/ucx_info" -v 2>&1 | head -2
    LD_LIBRARY_PATH="$PWD/$CUDA_UCX_DIR" UCX_MODULE_DIR="$PWD/$CUDA_UCX_DIR/ucx" timeout 20 "$CUDA_UCX_DIR/ucx_info" -d 2>&1 \
        | grep -E 'Transport: cuda|memory types:.*cuda' | sort | uniq -c
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
mpi_cuda=$(grep -c 'mpi_built_with_cuda_support:value:true' "$OUT/env.txt")
if [[ $mpi_cuda -gt 0 ]]; then MPI_AUTO=cuda-aware; else MPI_AUTO=staged; fi

# 2. Bitwise check (before the conformance cases: it is the end-to-end result).
: >"$OUT/bitwise.txt"
# It may take all but 180 s of the budget; the conformance cases get the rest.
if [[ $(left) -gt 240 ]]; then
    RUNS=${BITWISE_RUNS:-mpi_auto mpi_staged ucx_auto ucx_staged} RUN_TIMEOUT=60 DEADLINE=$((deadline - 180)) \
        timeout -k 5 $(($(left) - 170)) bench/device-comm-bitwise.sh "$BIN" "$OUT" || status=1
else
    echo "SKIP bitwise check: no time left" | tee -a "$OUT/bitwise.txt"
    status=1
fi
echo "bitwise check done at $((SECONDS - start)) s"

# 3. Device conformance.
: >"$OUT/conformance.txt"
UCX_ENV=(-x "LD_LIBRARY_PATH=$PWD/$CUDA_UCX_DIR:${LD_LIBRARY_PATH:-}" -x "UCX_MODULE_DIR=$PWD/$CUDA_UCX_DIR/ucx"
    --mca pml ob1 --mca osc ^ucx --mca btl self,vader,tcp)
conf() { # transport n device-comm expected-path alloc
    local t=$1 n=$2 comm=$3 want=$4 alloc=$5 name="conf_$1_$2_$3_$5" extra=() limit=$CASE_TIMEOUT
    local what="$t n=$n --device-comm $comm --alloc $alloc"
    if [[ $(left) -lt 15 ]]; then
        echo "SKIP $what: no time left" | tee -a "$OUT/conformance.txt"
        status=1
        return
    fi
    [[ $(left) -lt $limit ]] && limit=$(left)
    [[ $t == ucx ]] && extra=("${UCX_ENV[@]}")
    local t0=$SECONDS
    timeout -k 5 "$limit" mpirun --allow-run-as-root --oversubscribe -n "$n" "${extra[@]}" "$BIN/device_comm" \
        conformance --transport "$t" --device-comm "$comm" --expect "$want" --alloc "$alloc" --timeout 20 \
        >"$OUT/$name.log" 2>&1
    local rc=$? passed
    passed=$(grep -c 'passed' "$OUT/$name.log")
    if [[ $rc -eq 0 && $passed -eq $n ]]; then
        echo "PASS $what ($want, $((SECONDS - t0)) s)" | tee -a "$OUT/conformance.txt"
    else
        [[ $rc -eq 124 ]] && rc="timeout after $limit s"
        echo "FAIL $what (expected $want; exit $rc; $passed of $n ranks passed): $(grep -h -m1 -E 'FAILED|ERROR|error' "$OUT/$name.log")" \
            | tee -a "$OUT/conformance.txt"
        status=1
    fi
}
for n in 2 4; do
    conf mpi "$n" staged staged pool
    conf ucx "$n" staged staged pool
    conf ucx "$n" cuda-aware cuda-aware pool
    conf ucx "$n" cuda-aware cuda-aware legacy
    conf mpi "$n" auto "$MPI_AUTO" pool
    conf ucx "$n" auto staged pool
    [[ $mpi_cuda -gt 0 ]] && conf mpi "$n" cuda-aware cuda-aware pool
done
[[ $mpi_cuda -eq 0 ]] && echo "(MPI CUDA-aware path not forced: this Open MPI reports no CUDA support)" >>"$OUT/conformance.txt"
echo "conformance done at $((SECONDS - start)) s"

# 4. Exchange bench, step time and link model (opt-in: longer than the budget allows).
: >"$OUT/exchange.md"
: >"$OUT/link-model.md"
if [[ ${WITH_BENCH:-0} == 1 && $(left) -gt 60 ]]; then
    timeout -k 5 $(($(left) - 20)) bench/device-comm-bench.sh "$BIN" "$OUT"
    echo "exchange bench done at $((SECONDS - start)) s"
    timeout 15 python3 scripts/link-model.py --cli "$BIN/pcpp-cli" --bench docs/data-band-bench.jsonl >"$OUT/link-model.md" 2>&1
fi

{
    echo "# GPU device-exchange run ($(date -u +%F\ %H:%M) UTC, $((SECONDS - start)) s)"
    echo
    echo '```'
    cat "$OUT/env.txt"
    echo '```'
    echo
    echo "## Bitwise check against the local transport"
    echo
    sed 's/^/- /' "$OUT/bitwise.txt"
    echo
    echo "## Conformance"
    echo
    sed 's/^/- /' "$OUT/conformance.txt"
    echo
    cat "$OUT/exchange.md"
    echo
    cat "$OUT/link-model.md"
} >"$OUT/summary.md"
echo "=== results"
grep -h -E '^(PASS|FAIL|SKIP)' "$OUT/bitwise.txt" "$OUT/conformance.txt"
count() { cat "$OUT/bitwise.txt" "$OUT/conformance.txt" | grep -c "^$1"; }
echo "passed $(count PASS), failed $(count FAIL), skipped $(count SKIP)"
echo "summary: $OUT/summary.md (status $status, $((SECONDS - start)) s)"
exit $status
