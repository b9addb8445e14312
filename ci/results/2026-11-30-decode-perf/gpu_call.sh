#!/usr/bin/env bash
# The second device call of the decode-performance round (README.md here; ran at commit 56d7ce7,
# when the bulk-copy path and XATTN_DECODE_BULK still existed). First a probe of the
# sm_90 bulk-copy path (probe.py: each case in its own process with a time limit, output compared
# with cp.async's); if any case is not OK the rest runs with XATTN_DECODE_BULK=0. Then the measured
# copy bandwidth, the decode benchmark (and, with bulk copies on, the same benchmark on cp.async in a
# second process), and the correctness checks in parallel: the decode kernel check (both copy
# paths), the KV-cache GPU tests (and the FP8 ones again on cp.async), compute-sanitizer memcheck on
# bad block tables and memcheck, racecheck, synccheck on ci/decode_sanitize.py. Logs in $OUT/logs.tgz.
#
#   OUT=/some/dir bash ci/results/2026-11-30-decode-perf/gpu_call.sh
set -u
O=${OUT:?}
L=$O/logs
mkdir -p "$L"
export PYTHONPATH=. PYTHONUNBUFFERED=1
here=ci/results/2026-11-30-decode-perf
nvidia-smi -L > "$L/gpu.txt"
log() { echo "$1 rc=$2 $3s" >> "$L/summary.txt"; }
s=$SECONDS
timeout 80 python $here/probe.py > "$L/probe.log" 2>&1
rc=$?
log probe $rc $((SECONDS - s))
bulk=1
if [ $rc -ne 0 ]; then bulk=0; export XATTN_DECODE_BULK=0; echo "bulk copies off (probe)" >> "$L/summary.txt"; fi
s=$SECONDS
timeout 30 python $here/copy_bandwidth.py > "$L/copy_bandwidth.log" 2>&1
log copy_bandwidth $? $((SECONDS - s))
s=$SECONDS
timeout 55 python -m xattn bench --decode --out "$L" > "$L/bench_decode.log" 2>&1
log bench_decode $? $((SECONDS - s))
if [ $bulk = 1 ]; then
    s=$SECONDS
    mkdir -p "$L/cpasync"
    XATTN_DECODE_BULK=0 timeout 55 python -m xattn bench --decode --out "$L/cpasync" \
        > "$L/bench_decode_cpasync.log" 2>&1
    log bench_decode_cpasync $? $((SECONDS - s))
fi
s=$SECONDS
(timeout 110 python ci/kernel_check_decode.py --quick > "$L/kernel_check_decode.log" 2>&1
 log kernel_check_decode $? $((SECONDS - s))) &
(timeout 120 python -m pytest -m gpu -q -p no:cacheprovider -n 6 -k "not hip-on-cuda" \
    tests/test_kvcache.py tests/test_kvcache_fp8.py tests/test_decode_fp8_fragments.py > "$L/pytest.log" 2>&1
 log pytest $? $((SECONDS - s))) &
if [ $bulk = 1 ]; then
    (XATTN_DECODE_BULK=0 timeout 120 python -m pytest -m gpu -q -p no:cacheprovider -n 3 \
        -k "not hip-on-cuda" tests/test_kvcache_fp8.py > "$L/pytest_fp8_cpasync.log" 2>&1
     log pytest_fp8_cpasync $? $((SECONDS - s))) &
fi
(export PYTORCH_NO_CUDA_MEMORY_CACHING=1
 timeout 40 compute-sanitizer --tool memcheck --error-exitcode 9 python ci/decode_bad_table.py \
     > "$L/memcheck_bad_table.log" 2>&1
 log memcheck_bad_table $? $((SECONDS - s))
 for tool in memcheck racecheck synccheck; do
     timeout 35 compute-sanitizer --tool $tool --error-exitcode 9 python ci/decode_sanitize.py \
         > "$L/$tool.log" 2>&1
     log $tool $? $((SECONDS - s))
 done) &
wait
tar czf "$O/logs.tgz" -C "$O" logs
cat "$L/summary.txt" "$L/probe.log" "$L/copy_bandwidth.log"
tail -n 2 "$L/pytest.log" "$L/kernel_check_decode.log"
[ -f "$L/pytest_fp8_cpasync.log" ] && tail -n 1 "$L/pytest_fp8_cpasync.log"
grep -h "SUMMARY" "$L"/memcheck*.log "$L"/racecheck.log "$L"/synccheck.log 2>/dev/null
grep -v "^#" "$L/bench_decode.log" | head -60
