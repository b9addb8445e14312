# Call 6: call 5 found the D128 row up to S 2048 7% faster with 3 stages (547 -> 586 TFLOP/s,
# 0.92 -> 0.98 of cuDNN). Which tile wins at each length once 3-stage candidates are in the
# field: sm90_fwd_check --phase rows (the table's row and every candidate of ROW_CANDIDATES pinned,
# cuDNN in the same rotated rounds), D128 and D64, S 2048-8192.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 400 python ci/sm90_fwd_check.py --phase rows --head-dims 128 64 --seqlens 2048 4096 8192 > $OUT/rows.log 2>&1
echo "rc=$?"; grep -v "^ *(" $OUT/rows.log | tail -16
