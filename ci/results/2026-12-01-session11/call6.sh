# Call 6: the backward's dQ reduce-add per warp (flash_bwd.cu, DQ_TMA rows other than D256): each
# warp stages its 16 rows of the consumer's dQ tile and its lane 0 issues their reduce-adds; no
# warpgroup barrier a step (BAR_DQ) and no single thread waiting for the copy engine for all. Call
# 4's ncu: the fence and the barriers around the dQ staging held ~8.6% of the D128 backward's stall
# samples; the same change at D256 (DQ_BY_BOX, session 7) removed 31%. Prediction: D128 +3-5%, D64
# +2-4%, D256 unchanged (its path is untouched). No "old" in this process: the tensor map of
# dq_accum now has 16-row boxes, which HEAD's one reduce per 64 rows cannot use; the comparison is
# each row's ratio to cuDNN here against call 5's "old" (HEAD's kernel), minutes apart.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 200 python ci/sm90_bwd_check.py --phase check --quick > $OUT/check.log 2>&1
echo "check rc=$?"; tail -2 $OUT/check.log
timeout 240 python ci/sm90_ab.py --head-dims 64 128 256 --fwd-seqlens --bwd-seqlens 4096 8192 > $OUT/ab.log 2>&1
echo "ab rc=$?"; tail -13 $OUT/ab.log
