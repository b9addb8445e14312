# Call 7: the timing fixed first. In call 6 the table's causal D128 row at S 4096 (176/11/1 from
# S 4096) timed 482 TFLOP/s as "table" and 517 as the identical candidate "176/11/1": timed one
# after another (do_bench each, median of 3 rotated rounds) two launches of one kernel differed by
# 7%. sm90_fwd_check.interleaved_ms now takes every implementation's launches in turns (60 each,
# L2 flushed before each, a GPU spin per turn so that no event brackets host time). The stages
# phase times the table's row twice ("again") to show the spread that is left; then the rows phase.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 200 python ci/sm90_fwd_check.py --phase stages --head-dims 64 128 --seqlens 2048 4096 8192 > $OUT/stages.log 2>&1
echo "stages rc=$?"; grep -v "^ *(" $OUT/stages.log | sed 's/Row(head_dim=[^)]*)//' | tail -14
timeout 300 python ci/sm90_fwd_check.py --phase rows --head-dims 128 64 --seqlens 2048 4096 8192 > $OUT/rows.log 2>&1
echo "rows rc=$?"; grep -v "^ *(" $OUT/rows.log | tail -14
