# Call 2: the sm90 kernels after the two changes of this session (try_wait with a suspend-time
# hint; descriptors advanced from a base) checked before any speed claim: forward and backward
# against float64 on every row, then racecheck and synccheck on one small shape per row.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
timeout 150 python ci/sm90_fwd_check.py --phase check > $O/fwd_check.log 2>&1; echo "fwd check rc=$? $(grep SUMMARY $O/fwd_check.log)"
grep -E "FAIL|rror" $O/fwd_check.log | head -5
timeout 150 python ci/sm90_bwd_check.py --phase check > $O/bwd_check.log 2>&1; echo "bwd check rc=$? $(grep SUMMARY $O/bwd_check.log)"
grep -E "FAIL|rror" $O/bwd_check.log | head -5
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in racecheck synccheck; do
  timeout 70 compute-sanitizer --tool $tool --kernel-name kns=flash_fwd_sm90 --report-api-errors no --error-exitcode 9 \
    python ci/sm90_fwd_check.py --phase check --sanitize >> $O/fwd_sanitize.log 2>&1
  echo "fwd sanitize $tool rc=$? $(grep -E 'SUMMARY' $O/fwd_sanitize.log | tail -2 | tr '\n' ' ')"
  timeout 70 compute-sanitizer --tool $tool --kernel-name kns=flash_bwd_sm90 --report-api-errors no --error-exitcode 9 \
    python ci/sm90_bwd_check.py --phase check --sanitize >> $O/bwd_sanitize.log 2>&1
  echo "bwd sanitize $tool rc=$? $(grep -E 'SUMMARY' $O/bwd_sanitize.log | tail -2 | tr '\n' ' ')"
done
