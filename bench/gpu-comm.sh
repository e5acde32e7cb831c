#!/usr/bin/env bash
# GPU checks of the MPI / UCX device exchanges (issue #21; docs/clusters.md), on one GPU shared by
# the ranks:
#   1. what the machine offers: Open MPI's CUDA support, the CUDA memory type of the UCX in use;
#   2. the device-memory conformance cases (pcpp_comm::conformance::device) over MPI and UCX with
#      2 and 4 ranks: the path chosen by `auto` (checked: staged for an MPI that is not
#      CUDA-aware, CUDA-aware for the CUDA-enabled UCX), and the staged and CUDA-aware paths
#      forced (CUDA-aware over MPI only where Open MPI reports CUDA support);
#   3. the bitwise check: 4-rank `generate --device cuda` over MPI and UCX against the local
#      transport (bench/device-comm-bitwise.sh);
#   4. the exchange bench and the step time against the solo transport (bench/device-comm-bench.sh);
#   5. the step model on 8 GPUs over a 50 GB/s link beside NVLink (scripts/link-model.py).
#
# Usage: bench/gpu-comm.sh BIN_DIR OUT_DIR
#   BIN_DIR  stripped release binaries built with --features cuda,mpi,ucx,nccl: pcpp-cli and the
#            pcpp-comm example device_comm
#              cargo build --release -p pcpp-cli --features cuda,mpi,ucx,nccl
#              cargo build --release -p pcpp-comm --features mpi,ucx,cuda --example device_comm
#   The CUDA-enabled UCX is taken from .whl/ucx (libucp/ucs/uct/ucm/ucs_signal.so.0, ucx/ with
#   the uct_cuda, ucm_cuda and uct_cma modules, ucx_info), e.g. from the PyPI wheel
#   libucx-cu13==1.22.0; set UCX_WHEEL for another folder.
# Writes OUT_DIR/summary.md (everything), OUT_DIR/env.txt, OUT_DIR/conformance.txt and the
# outputs of the scripts above. Exit status non-zero when a conformance case or the bitwise check
# fails. About 5 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=$(cd "${1:?usage: $0 BIN_DIR OUT_DIR}" && pwd)
OUT=${2:?usage: $0 BIN_DIR OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export UCX_WHEEL=${UCX_WHEEL:-.whl/ucx}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
start=$SECONDS
status=0

# 1. The machine.
chmod +x "$UCX_WHEEL/ucx_info" 2>/dev/null
{
    nvidia-smi -L 2>&1 | head -4
    echo "--- Open MPI: $(mpirun --version 2>&1 | head -1)"
    ompi_info --parsable --all 2>/dev/null | grep -E 'mpi_built_with_cuda_support|mpi_extensions' || echo "ompi_info: none"
    echo "--- UCX in $UCX_WHEEL: memory types and CUDA transports"
    LD_LIBRARY_PATH="$PWD/$UCX_WHEEL" UCX_MODULE_DIR="$PWD/$UCX_WHEEL/ucx" "$UCX_WHEEL/ucx_info" -v 2>&1 | head -2
    LD_LIBRARY_PATH="$PWD/$UCX_WHEEL" UCX_MODULE_DIR="$PWD/$UCX_WHEEL/ucx" "$UCX_WHEEL/ucx_info" -d 2>&1 \
        | grep -E 'Transport: cuda|memory types:.*cuda' | sort | uniq -c
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
mpi_cuda=$(grep -c 'mpi_built_with_cuda_support:value:true' "$OUT/env.txt")
if [[ $mpi_cuda -gt 0 ]]; then MPI_AUTO=cuda-aware; else MPI_AUTO=staged; fi

# 2. Device conformance.
: >"$OUT/conformance.txt"
UCX_ENV=(-x "LD_LIBRARY_PATH=$PWD/$UCX_WHEEL:${LD_LIBRARY_PATH:-}" -x "UCX_MODULE_DIR=$PWD/$UCX_WHEEL/ucx"
    --mca pml ob1 --mca osc ^ucx --mca btl self,vader,tcp)
conf() { # transport n device-comm expected-path
    local t=$1 n=$2 comm=$3 want=$4 name="conf_$1_$2_$3" extra=()
    [[ $t == ucx ]] && extra=("${UCX_ENV[@]}")
    if timeout 120 mpirun --allow-run-as-root --oversubscribe -n "$n" "${extra[@]}" "$BIN/device_comm" \
        conformance --transport "$t" --device-comm "$comm" --expect "$want" >"$OUT/$name.log" 2>&1 \
        && [[ $(grep -c 'passed' "$OUT/$name.log") -eq $n ]]; then
        echo "PASS $t n=$n --device-comm $comm ($want)" | tee -a "$OUT/conformance.txt"
    else
        echo "FAIL $t n=$n --device-comm $comm (expected $want): $(grep -h -m1 -E 'FAILED|error' "$OUT/$name.log")" \
            | tee -a "$OUT/conformance.txt"
        status=1
    fi
}
for n in 2 4; do
    conf mpi "$n" auto "$MPI_AUTO"
    conf mpi "$n" staged staged
    [[ $mpi_cuda -gt 0 ]] && conf mpi "$n" cuda-aware cuda-aware
    conf ucx "$n" auto cuda-aware
    conf ucx "$n" staged staged
    conf ucx "$n" cuda-aware cuda-aware
done
[[ $mpi_cuda -eq 0 ]] && echo "(MPI CUDA-aware path not forced: this Open MPI reports no CUDA support)" >>"$OUT/conformance.txt"
echo "conformance done at $((SECONDS - start)) s"

# 3. Bitwise check.
bench/device-comm-bitwise.sh "$BIN" "$OUT" || status=1
echo "bitwise check done at $((SECONDS - start)) s"

# 4. Exchange bench and step time.
bench/device-comm-bench.sh "$BIN" "$OUT"
echo "exchange bench done at $((SECONDS - start)) s"

# 5. Link model (measured per-rank compute of docs/data-band-bench.jsonl, traffic from the plan).
python3 scripts/link-model.py --cli "$BIN/pcpp-cli" --bench docs/data-band-bench.jsonl >"$OUT/link-model.md" 2>&1

{
    echo "# GPU device-exchange run ($(date -u +%F\ %H:%M) UTC, $((SECONDS - start)) s)"
    echo
    echo '```'
    cat "$OUT/env.txt"
    echo '```'
    echo
    echo "## Conformance"
    echo
    sed 's/^/- /' "$OUT/conformance.txt"
    echo
    echo "## Bitwise check against the local transport"
    echo
    sed 's/^/- /' "$OUT/bitwise.txt"
    echo
    cat "$OUT/exchange.md"
    echo
    cat "$OUT/link-model.md"
} >"$OUT/summary.md"
echo "summary: $OUT/summary.md (status $status, $((SECONDS - start)) s)"
exit $status
