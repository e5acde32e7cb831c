#!/usr/bin/env bash
# CPU comparison of one tiny-SDXL UNet forward: pcpp (`pcpp-cli bench`) against diffusers on torch
# (bench/diffusers_cpu_unet.py), same inputs' shapes, same thread count, run alternately so that
# both see the same machine load. Prints the JSON line of every run, then a summary per thread
# count: the median of the runs' medians, the best run's minimum, and the ratio pcpp / diffusers.
#
#   bench/cpu_compare.sh [PYTHON] [ROUNDS] [THREADS...]
#
# PYTHON: an interpreter with scripts/requirements-reference.txt installed (default .venv/bin/python);
# ROUNDS: alternations per thread count (default 3); THREADS: default "1 2".
# Run from the repository root after `cargo build --release -p pcpp-cli`. Environment variables
# (e.g. OMP_WAIT_POLICY for torch's OpenMP threads) pass through to both programs.
set -euo pipefail
PY=${1:-.venv/bin/python}
ROUNDS=${2:-3}
shift $(($# > 2 ? 2 : $#))
THREADS=${*:-1 2}
BIN=target/release/pcpp-cli
[ -x "$BIN" ] || {
  echo "build first: cargo build --release -p pcpp-cli" >&2
  exit 1
}
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
for t in $THREADS; do
  for _ in $(seq "$ROUNDS"); do
    "$BIN" bench --threads "$t" --warmup 10 --iters 100 --json | tee -a "$LOG"
    "$PY" bench/diffusers_cpu_unet.py --threads "$t" --warmup 10 --iters 100 2>/dev/null | tee -a "$LOG"
  done
done
"$PY" - "$LOG" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    who = "pcpp" if "pcpp_cpu_unet_ms" in d else "diffusers"
    r = runs.setdefault(d["threads"], {}).setdefault(who, {"median": [], "min": []})
    r["median"].append(d.get("pcpp_cpu_unet_ms", d.get("diffusers_cpu_unet_ms")))
    r["min"].append(d["min_ms"])
for t, r in sorted(runs.items()):
    p, q = r["pcpp"], r["diffusers"]
    pm, qm = statistics.median(p["median"]), statistics.median(q["median"])
    print(f"threads {t}: pcpp median {pm:.2f} ms (best min {min(p['min']):.2f}), diffusers median "
          f"{qm:.2f} ms (best min {min(q['min']):.2f}); ratio pcpp/diffusers: median {pm / qm:.2f}, "
          f"min {min(p['min']) / min(q['min']):.2f}")
EOF
