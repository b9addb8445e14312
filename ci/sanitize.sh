#!/usr/bin/env bash
# compute-sanitizer over the CUDA kernels: memcheck, racecheck, synccheck and initcheck, each on
# the forward (ci/kernel_check.py) and the backward (ci/kernel_check_bwd.py), for every tuned table
# row this GPU selects (lengths one past the tiles) plus the odd sizes (S = 1, block + 1, D = 1,
# D = 200, GQA 7:1). Logs go to $OUT/sanitize/ (or ci/results/latest/sanitize/), a Markdown table to
# $OUT/sanitize.md; the last line printed is a one-line verdict. Exit 1 if any run is not clean.
#
#   bash ci/sanitize.sh            SANITIZE_TOOLS="memcheck racecheck" bash ci/sanitize.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-ci/results/latest}
LOGS="$OUT/sanitize"
mkdir -p "$LOGS"
export PYTHONPATH=. PYTHONUNBUFFERED=1
# Without torch's caching allocator every tensor is its own allocation, so memcheck sees an
# access past a tensor's end (inside one cached segment it would look legal).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
TOOLS=${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}
CASES=${SANITIZE_CASES:-tuned,odd,variants}
LIMIT=${SANITIZE_TIMEOUT:-240}
LIMIT_RACECHECK_BWD=${SANITIZE_TIMEOUT_RACECHECK_BWD:-$LIMIT}  # the slowest pair by far

table="$OUT/sanitize.md"
{
    echo "| tool | pass | check | cases passed | sanitizer summary | rc | s |"
    echo "|---|---|---|---|---|---|---|"
} > "$table"
dirty=0
for tool in $TOOLS; do
    for pass in fwd bwd; do
        script=ci/kernel_check.py
        [ "$pass" = bwd ] && script=ci/kernel_check_bwd.py
        log="$LOGS/$tool-$pass.log"
        start=$SECONDS
        # --report-api-errors no: cuda-bindings probes the driver with cuGetProcAddress for
        # entry points this driver lacks (34 refusals per process, xattn/tma.py's first use),
        # which the sanitizer would count as errors; kernel faults are still reported.
        limit=$LIMIT
        [ "$tool-$pass" = racecheck-bwd ] && limit=$LIMIT_RACECHECK_BWD
        timeout "$limit" compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 \
            python "$script" --sanitize --cases "$CASES" > "$log" 2>&1
        rc=$?
        checked=$(grep -Eo '[0-9]+/[0-9]+ cases passed' "$log" | tail -1)
        summary=$(grep -E '(ERROR|RACECHECK|SYNCCHECK|INITCHECK) SUMMARY' "$log" | tail -1 \
                  | sed 's/^=* *//')
        verdict=clean
        if [ "$rc" -ne 0 ]; then verdict=FAIL; dirty=1; fi
        [ "$rc" -eq 124 ] && summary="timed out after ${limit}s"
        echo "| $tool | $pass | $verdict | ${checked:-?} | ${summary:-no summary} | $rc | $((SECONDS - start)) |" >> "$table"
    done
done
cat "$table"
if [ "$dirty" -eq 0 ]; then
    echo "sanitize: clean ($TOOLS; forward and backward; cases $CASES)"
else
    echo "sanitize: NOT clean, see $table and $LOGS/"
fi
exit "$dirty"
