# Call 2: the mixed dQ path checked and timed against the table's (D128), and the forward's D128
# rows against candidate tiles at short and long sequences.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
timeout 150 python ci/sm90_bwd_check.py --phase check --dq mixed > $O/bwd_check_mixed.log 2>&1; echo "check mixed rc=$? $(grep SUMMARY $O/bwd_check_mixed.log)"
grep -E "FAIL|rror" $O/bwd_check_mixed.log | head -5
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in racecheck synccheck; do
  timeout 100 compute-sanitizer --tool $tool --kernel-name kns=flash_bwd_sm90 --report-api-errors no --error-exitcode 9 \
    python ci/sm90_bwd_check.py --phase check --sanitize --dq mixed >> $O/bwd_sanitize_mixed.log 2>&1
  echo "sanitize mixed $tool rc=$? $(grep -E 'SUMMARY' $O/bwd_sanitize_mixed.log | tail -2 | tr '\n' ' ')"
done
unset PYTORCH_NO_CUDA_MEMORY_CACHING
timeout 200 python ci/sm90_bwd_check.py --phase bench --quick --head-dims 128 > $O/bwd_bench.log 2>&1; echo "bench rc=$?"
grep -E "^\|" $O/bwd_bench.log
timeout 240 python ci/sm90_fwd_check.py --phase rows --head-dims 128 > $O/fwd_rows.log 2>&1; echo "rows rc=$?"
grep -E "^D|table" $O/fwd_rows.log
