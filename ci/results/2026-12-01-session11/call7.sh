# Call 7: the D128 and D256 forward rows' tiles again, now that they rescale lazily (call 2): each
# candidate pinned as the only row, with the table's rescale_slack, in turns with cuDNN, S 1024-8192
# (ci/sm90_fwd_check.py --phase rows; its candidate list updated for this). Prediction: the table's
# rows stay best or within 1% (the lazy rescaling removes FMULs from every candidate alike); S 1024
# is at or above 0.9 of cuDNN (not measured in turns before).
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 300 python ci/sm90_fwd_check.py --phase rows --head-dims 128 256 --seqlens 1024 2048 4096 8192 > $OUT/rows.log 2>&1
echo "rows rc=$?"; grep -v "^ *(" $OUT/rows.log | sed 's/Row(head_dim=[^)]*)//' | tail -20
