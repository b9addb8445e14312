# Call 10: the D192 rows' lazy rescaling, which they took from their neighbours unmeasured (call 2
# measured D128 and D256): the table's rows (rescale_slack 8) against the same with
# RESCALE_SLACK=0 (byte-identical to the rows before this session: NVRTC 13.0 cubin hashes, here on
# the CPU). Prediction: +2-4% (between D128's +0.3-4% and D256's +4-6%).
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 200 python ci/sm90_ab.py --variant slack0:RESCALE_SLACK=0 --head-dims 192 \
    --fwd-seqlens 1024 2048 8192 --bwd-seqlens > $OUT/ab.log 2>&1
echo "ab rc=$?"; tail -7 $OUT/ab.log
