# Call 2: lazy rescaling in the sm90 forward (flash_fwd.cu RESCALE_SLACK = 8: a row keeps its
# running max as the offset until the max rises by more than 8 in base 2; a warp whose rows all
# kept skips O *= alpha). Call 1 showed the consumers' instruction stream is the limit (every extra
# FMA-pipe instruction cost time), so removing O_REGS FMULs a tile should pay. Prediction (new
# against slack0 = the old code): D64 +1-2% (32 FMULs of ~350 instructions a tile), D128 +3%
# (64), D256 +5-8% (128 of ~320). Then the correctness of it: the new rising-scores test, the
# property tests of the sm90 forward, and the kernel checks.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 240 python ci/sm90_ab.py --variant slack0:RESCALE_SLACK=0 --head-dims 64 128 256 \
    --fwd-seqlens 2048 8192 --bwd-seqlens > $OUT/ab.log 2>&1
echo "ab rc=$?"; tail -13 $OUT/ab.log
timeout 200 python -m pytest -q -x -m gpu tests/test_sm90.py -k "rising or forward_matches or persistent or packed" \
    -p no:cacheprovider > $OUT/pytest.log 2>&1
echo "pytest rc=$?"; tail -3 $OUT/pytest.log
timeout 150 python ci/sm90_fwd_check.py --phase check --quick > $OUT/check.log 2>&1
echo "check rc=$?"; tail -2 $OUT/check.log
