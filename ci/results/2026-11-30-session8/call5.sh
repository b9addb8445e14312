# Call 5: the forward's softmax under P V (the loop's wait for P V moved across the back edge):
# the device NVRTC's compile (fallbacks where a variant spills), float64 checks, sanitizers, and
# each overlapped row with the wait where it was before (OVERLAP_WAIT_LATE=1) in the same rounds.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
OUT=$O PHASES="compile check sanitize" bash ci/sm90_round.sh
grep -E "fallback|local [1-9]|FAIL" $O/compile.log | head -8
grep -E "FAIL|rror" $O/check.log | head -5
timeout 300 python ci/sm90_fwd_check.py --phase rows --head-dims 64 128 256 --seqlens 2048 8192 > $O/fwd_rows.log 2>&1; echo "rows rc=$?"
grep -E "^D" $O/fwd_rows.log
