#!/usr/bin/env bash
# One device call for the sm90 forward's persistent grid (issue 13), inside a budget of BUDGET
# seconds: each step gets at most its cap and what is left. Logs to $OUT, a summary line per step.
#   correctness  ci/sm90_fwd_check.py --phase check (the table's rows: persistent; plus the
#                few-CTA cases), then --variant flat --quick (one CTA per query block)
#   bench        persistent vs flat vs cuDNN and SDPA flash, bf16, rotated medians
#   pytest       tests/test_sm90.py -m gpu
#   sanitizers   racecheck and synccheck on the sm90 forward only, a grid of 2 CTAs
#   xattn bench  the public API (the table's rows), if time is left
#   OUT=/tmp/x BUDGET=340 bash ci/sm90_persist_round.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-ci/results/latest}
BUDGET=${BUDGET:-340}
mkdir -p "$OUT"
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt" 2>&1
left() { echo $((BUDGET - (SECONDS - start))); }
step() {  # step NAME CAP COMMAND...: run with timeout min(CAP, time left), log to $OUT/NAME.log
    local name=$1 cap=$2; shift 2
    local limit; limit=$(left)
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 10 ]; then echo "[$name skipped: no time left]"; return; fi
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "[$name rc=$rc ${limit}s cap, took $((SECONDS - t0))s] $(grep -E 'SUMMARY|passed|failed' "$OUT/$name.log" | tail -2 | tr '\n' ' ')"
}
step check 110 python ci/sm90_fwd_check.py --phase check
grep -E "FAIL" "$OUT/check.log" | head -20
step bench 95 python ci/sm90_fwd_check.py --phase bench --quick --seqlens 1024 2048 4096 8192 --head-dims 64 128 256
grep "^|" "$OUT/bench.log"
step pytest 150 python -m pytest -m gpu -q -x -p no:cacheprovider -k "not hip-on-cuda" tests/test_sm90.py
tail -5 "$OUT/pytest.log"
for tool in racecheck synccheck; do
    step "sanitize_$tool" 30 compute-sanitizer --tool "$tool" --kernel-name kns=flash_fwd_sm90 --report-api-errors no \
        --error-exitcode 9 python ci/sm90_fwd_check.py --phase check --sanitize
    grep -E "SUMMARY" "$OUT/sanitize_$tool.log" | tail -2
done
step check_flat 60 python ci/sm90_fwd_check.py --phase check --quick --variant flat
grep -E "FAIL" "$OUT/check_flat.log" | head -10
step xattn_bench 60 python -m xattn bench --dtypes bfloat16 --head-dims 64 128 --seqlens 2048 4096 8192
echo "total $((SECONDS - start))s"
