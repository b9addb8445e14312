# Call 9: the backward's row choices (dQ path, early S^T) were made with the old timing; again in
# turns: sm90_bwd_check --phase bench (the table's sm90 rows, the same with the other dQ path and
# with the other S^T timing, the mma.sync kernels, SDPA flash, cuDNN, deterministic modes).
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 400 python ci/sm90_bwd_check.py --phase bench --quick --head-dims 64 128 256 > $OUT/bwd_bench.log 2>&1
echo "rc=$?"; grep -v "^ *(" $OUT/bwd_bench.log | tail -16
