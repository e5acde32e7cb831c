#!/usr/bin/env bash
# CPU comparison of one tiny-SDXL UNet forward: pcpp (`pcpp-cli bench`) against diffusers on torch
# (bench/diffusers_cpu_unet.py), same inputs' shapes, same thread count, run alternately so that
# both see the same machine load. Prints the JSON lines of every run.
#
#   bench/cpu_compare.sh [PYTHON] [ROUNDS] [THREADS...]
#
# PYTHON: an interpreter with scripts/requirements-reference.txt installed (default .venv/bin/python);
# ROUNDS: alternations per thread count (default 3); THREADS: default "1 2".
# Run from the repository root after `cargo build --release -p pcpp-cli`.
set -euo pipefail
PY=${1:-.venv/bin/python}
ROUNDS=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
THREADS=${*:-1 2}
BIN=target/release/pcpp-cli
[ -x "$BIN" ] || { echo "build first: cargo build --release -p pcpp-cli" >&2; exit 1; }
for t in $THREADS; do
  for _ in $(seq "$ROUNDS"); do
    "$BIN" bench --threads "$t" --warmup 10 --iters 100 --json
    OMP_NUM_THREADS="$t" "$PY" bench/diffusers_cpu_unet.py --threads "$t" --warmup 10 --iters 100 2>/dev/null
  done
done
