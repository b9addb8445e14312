#!/usr/bin/env bash
# One device round of the sm90 kernels: compile, correctness (localized to a simpler variant if
# the tuned one fails), host cost of tensor maps, tuning candidates, benchmark. Logs to $OUT.
# The backward's phases (ci/sm90_bwd_check.py) are named bwd_*; bwd_sanitize runs racecheck and
# synccheck (SANITIZE_TOOLS) on its small shapes.
#   OUT=/tmp/x PHASES="compile check host tune bench" bash ci/sm90_round.sh
#   OUT=/tmp/x PHASES="bwd_compile bwd_check bwd_sanitize bwd_bench" [BWD_HEAD_DIMS=256] bash ci/sm90_round.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-ci/results/latest}
mkdir -p "$OUT"
PHASES=${PHASES:-compile check host tune bench}
check_failed=
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt" 2>&1
run() {  # run NAME TIMEOUT ARGS...
    local name=$1 limit=$2; shift 2
    timeout "$limit" python ci/sm90_fwd_check.py "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "[$name rc=$rc] $(grep SUMMARY "$OUT/$name.log" | tail -1)"
    return $rc
}
runb() {  # the backward's check script: runb NAME TIMEOUT ARGS...
    local name=$1 limit=$2; shift 2
    timeout "$limit" python ci/sm90_bwd_check.py "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "[$name rc=$rc] $(grep SUMMARY "$OUT/$name.log" | tail -1)"
    return $rc
}
for phase in $PHASES; do
    case $phase in
    compile) run compile 120 --phase compile ;;
    check)
        if ! run check 200 --phase check; then
            check_failed=1
            grep -E "FAIL|Error" "$OUT/check.log" | head -20
            run check_overlap 60 --phase check --quick --variant overlap
            run check_simple 60 --phase check --quick --variant simple
            grep -E "FAIL|Error" "$OUT/check_simple.log" | head -10
        fi ;;
    host) run host 60 --phase host ;;
    tune) [ -n "$check_failed" ] && continue; run tune 150 --phase tune; grep "TUNE BEST" "$OUT/tune.log" ;;
    bench) [ -n "$check_failed" ] && continue; run bench 160 --phase bench ;;
    bench_old) run bench_old 60 --phase bench_old ;;
    sanitize)  # one small shape per row, each tool in turn; all logs in one file
        for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
            echo "=== $tool" >> "$OUT/sanitize.log"
            # --report-api-errors no: cuda-bindings probes driver entry points that this driver
            # lacks (cuGetProcAddress_v2 INVALID_VALUE), which memcheck would count as errors
            timeout 100 compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 \
                python ci/sm90_fwd_check.py --phase check --sanitize >> "$OUT/sanitize.log" 2>&1
            echo "[sanitize $tool rc=$?] $(grep -E 'SUMMARY' "$OUT/sanitize.log" | tail -2 | tr '\n' ' ')"
        done ;;
    bwd_compile) runb bwd_compile 120 --phase compile ;;
    bwd_varlen) runb bwd_varlen 200 --phase varlen ;;
    bwd_varlen_bench) runb bwd_varlen_bench 150 --phase varlen_bench --head-dims ${BWD_HEAD_DIMS:-128 256} ;;
    bwd_check)
        if ! runb bwd_check 200 --phase check ${BWD_QUICK:+--quick}; then
            check_failed=1
            grep -E "FAIL|Error" "$OUT/bwd_check.log" | head -20
        fi ;;
    bwd_sanitize)
        export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # memcheck then sees an access past any tensor's end
        for tool in ${SANITIZE_TOOLS:-racecheck synccheck}; do
            echo "=== $tool" >> "$OUT/bwd_sanitize.log"
            # only the sm90 backward is instrumented: torch's oracle and the other kernels run as usual
            timeout 100 compute-sanitizer --tool "$tool" --kernel-name kns=flash_bwd_sm90 --report-api-errors no \
                --error-exitcode 9 python ci/sm90_bwd_check.py --phase check --sanitize >> "$OUT/bwd_sanitize.log" 2>&1
            echo "[bwd_sanitize $tool rc=$?] $(grep -E 'SUMMARY|ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/bwd_sanitize.log" | tail -2 | tr '\n' ' ')"
            timeout 100 compute-sanitizer --tool "$tool" --kernel-name kns=flash_bwd_sm90 --report-api-errors no \
                --error-exitcode 9 python ci/sm90_bwd_check.py --phase varlen --sanitize >> "$OUT/bwd_sanitize.log" 2>&1
            echo "[bwd_sanitize varlen $tool rc=$?] $(grep -E 'SUMMARY|ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/bwd_sanitize.log" | tail -2 | tr '\n' ' ')"
        done
        unset PYTORCH_NO_CUDA_MEMORY_CACHING ;;
    bwd_bench) [ -n "$check_failed" ] && continue
        runb bwd_bench 240 --phase bench ${BWD_QUICK:+--quick} --head-dims ${BWD_HEAD_DIMS:-64 128} ;;
    pytest) timeout 200 python -m pytest -q -x -p no:cacheprovider tests/test_sm90.py > "$OUT/pytest.log" 2>&1
        echo "[pytest rc=$?] $(tail -1 "$OUT/pytest.log")" ;;
    esac
done
