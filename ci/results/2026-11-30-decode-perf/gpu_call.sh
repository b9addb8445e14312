#!/usr/bin/env bash
# One device call of the decode-performance round (README.md here): the decode benchmark and the
# copy-path comparison first (alone on the GPU), then the correctness checks in parallel: the
# decode kernel check, the KV-cache GPU tests, and compute-sanitizer (memcheck on bad block
# tables; memcheck, racecheck and synccheck on ci/decode_sanitize.py). Logs under $OUT.
#
#   OUT=/some/dir bash ci/results/2026-11-30-decode-perf/gpu_call.sh [--no-tune]
set -u
O=${OUT:?}
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi -L > "$O/gpu.txt"
log() { echo "$1 rc=$2 $3s" >> "$O/summary.txt"; }
s=$SECONDS
timeout 60 python -m xattn bench --decode --out "$O" > "$O/bench_decode.log" 2>&1
log bench_decode $? $((SECONDS - s))
if [ "${1:-}" != "--no-tune" ]; then
    s=$SECONDS
    timeout 75 python ci/tune_decode.py --splits 0 --bulk 0 1 --paged 0 16 --fp8 \
        --seqlens 4096 131072 > "$O/tune.log" 2>&1
    log tune $? $((SECONDS - s))
fi
s=$SECONDS
(timeout 110 python ci/kernel_check_decode.py --quick > "$O/kernel_check_decode.log" 2>&1
 log kernel_check_decode $? $((SECONDS - s))) &
(timeout 130 python -m pytest -m gpu -q -p no:cacheprovider -n 8 -k "not hip-on-cuda" \
    tests/test_kvcache.py tests/test_kvcache_fp8.py tests/test_decode_fp8_fragments.py > "$O/pytest.log" 2>&1
 log pytest $? $((SECONDS - s))) &
(export PYTORCH_NO_CUDA_MEMORY_CACHING=1
 timeout 40 compute-sanitizer --tool memcheck --error-exitcode 9 python ci/decode_bad_table.py \
     > "$O/memcheck_bad_table.log" 2>&1
 log memcheck_bad_table $? $((SECONDS - s))
 for tool in memcheck racecheck synccheck; do
     timeout 35 compute-sanitizer --tool $tool --error-exitcode 9 python ci/decode_sanitize.py \
         > "$O/$tool.log" 2>&1
     log $tool $? $((SECONDS - s))
 done) &
wait
cat "$O/summary.txt"
tail -2 "$O/pytest.log" "$O/kernel_check_decode.log"
grep -h "SUMMARY" "$O"/*check*.log "$O"/memcheck*.log 2>/dev/null
