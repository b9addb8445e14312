# Call 3: the rows changed in this session checked before any speed claim: the sm90 forward (D64
# causal overlapped with the softmax under P V, D192 with it) and backward (non-causal D64 with dQ
# by the TMA reduce-add) against float64, then racecheck and synccheck on one small shape
# per row.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
timeout 120 python ci/sm90_fwd_check.py --phase check > $O/fwd_check.log 2>&1; echo "fwd check rc=$? $(grep SUMMARY $O/fwd_check.log)"
grep -E "FAIL|rror" $O/fwd_check.log | head -5
timeout 120 python ci/sm90_bwd_check.py --phase check > $O/bwd_check.log 2>&1; echo "bwd check rc=$? $(grep SUMMARY $O/bwd_check.log)"
grep -E "FAIL|rror" $O/bwd_check.log | head -5
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in racecheck synccheck; do
  timeout 90 compute-sanitizer --tool $tool --kernel-name kns=flash_fwd_sm90 --report-api-errors no --error-exitcode 9 \
    python ci/sm90_fwd_check.py --phase check --sanitize >> $O/fwd_sanitize.log 2>&1
  echo "fwd sanitize $tool rc=$? $(grep -E 'SUMMARY' $O/fwd_sanitize.log | tail -2 | tr '\n' ' ')"
  timeout 90 compute-sanitizer --tool $tool --kernel-name kns=flash_bwd_sm90 --report-api-errors no --error-exitcode 9 \
    python ci/sm90_bwd_check.py --phase check --sanitize >> $O/bwd_sanitize.log 2>&1
  echo "bwd sanitize $tool rc=$? $(grep -E 'SUMMARY' $O/bwd_sanitize.log | tail -2 | tr '\n' ' ')"
done
unset PYTORCH_NO_CUDA_MEMORY_CACHING
