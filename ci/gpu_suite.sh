#!/usr/bin/env bash
# The whole GPU suite in one call on a lent NVIDIA machine: kernel checks, the pytest GPU
# properties, compute-sanitizer, compile timing, and the benchmark. Writes logs under $OUT (or
# ci/results/latest) and prints a short summary last.
#
#   bash ci/gpu_suite.sh [checks] [sanitize] [bench]     (no argument: all three; the device
#   tool's 10-minute limit per command fits one or two phases per call)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-ci/results/latest}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
summary=()

step() {  # step NAME TIMEOUT COMMAND...: run, log to $OUT/NAME.log, keep its last line for the summary
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-12s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - start)) "$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-150)")")
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
phases=${*:-checks sanitize bench}
if [[ " $phases " == *" checks "* ]]; then
    step kernels 300 python ci/kernel_check.py --cases grid,variants
    step kernels_bwd 300 python ci/kernel_check_bwd.py --cases grid,variants
    [ -f ci/kernel_check_decode.py ] && step decode 300 python ci/kernel_check_decode.py
    step pytest 600 python -m pytest -m gpu -q -p no:cacheprovider
    step compile 120 python ci/compile_timing.py
fi
if [[ " $phases " == *" sanitize "* ]]; then
    # memcheck, racecheck, synccheck, initcheck on forward and backward (tuned rows + odd sizes)
    step sanitize 620 env SANITIZE_TIMEOUT=70 bash ci/sanitize.sh
fi
if [[ " $phases " == *" bench "* ]]; then
    step bench 900 python -m xattn bench --out "$OUT"
    step bench_bwd 900 python -m xattn bench --bwd --out "$OUT"
    step bench_variants 300 python -m xattn bench --variants --out "$OUT"
    step bench_decode 300 python -m xattn bench --decode --out "$OUT"
    step bench_overhead 300 python -m xattn bench --overhead --out "$OUT"
fi

echo "== GPU suite on $(cat "$OUT/gpu.txt") =="
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
