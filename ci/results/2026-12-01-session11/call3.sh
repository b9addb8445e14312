# Call 3: the softmax's row max and row sum as 4 independent chains per row (flash_fwd.cu
# ROW_CHAINS) instead of one: the SASS showed 32 dependent FMNMX back to back per row at 128-key
# tiles (and 32 dependent FADDs), a latency chain each warp waits out. "new" = this tree, "old" =
# HEAD (commit before it: lazy rescaling in). Prediction: D64 +2-5% (softmax-heavy), D128 +1-2%,
# D256 0-1% (20 values a row). Then the kernel checks.
#   git archive HEAD kernels_cuda/sm90 | tar -x --strip-components=2 -C kernels_cuda/sm90_old
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 240 python ci/sm90_ab.py --old sm90_old --head-dims 64 128 256 \
    --fwd-seqlens 2048 8192 --bwd-seqlens > $OUT/ab.log 2>&1
echo "ab rc=$?"; tail -13 $OUT/ab.log
timeout 150 python ci/sm90_fwd_check.py --phase check --quick > $OUT/check.log 2>&1
echo "check rc=$?"; tail -2 $OUT/check.log
