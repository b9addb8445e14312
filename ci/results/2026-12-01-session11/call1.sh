# Call 1: a share of the forward's exponentials on the FMA units (platform.h exp2_poly,
# flash_fwd.cu EXP2_POLY = how many of every 8). At D64 the tensor cores consume 16 scores a clock
# per SM (4 * 64 FLOP each at ~4096 FLOP/clk) and MUFU produces 16 ex2 a clock: the two pipes are
# equally loaded, so the softmax cannot hide under the GEMMs. Prediction: D64 +3-5% at poly 2
# (MUFU 6/8 of the GEMM time, issue slots ~6/8), less or negative past 3; D128 within +-1% (MUFU
# at half the GEMM time); D256 no change.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 420 python ci/sm90_ab.py --variant poly1:EXP2_POLY=1 --variant poly2:EXP2_POLY=2 \
    --variant poly3:EXP2_POLY=3 --variant poly4:EXP2_POLY=4 --head-dims 64 128 256 \
    --fwd-seqlens 2048 8192 --bwd-seqlens > $OUT/ab.log 2>&1
echo "ab rc=$?"; cat $OUT/ab.log | tail -16
