# Call 5: the backward's dS^T (and P^T) staging by stmatrix (4 per step) instead of 16 st.shared.b32
# (flash_bwd.cu stage_transposed). Call 4's ncu: the D128 backward stalls on MIO 11% of its samples
# (cuDNN's bprop: under 1%), at the STS of the dS and dQ staging. Prediction: +1-2% (the dQ staging's
# 16 STS.64 a step stay). "old" = HEAD. Then the backward checks.
#   git archive HEAD kernels_cuda/sm90 | tar -x --strip-components=2 -C kernels_cuda/sm90_old
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 240 python ci/sm90_ab.py --old sm90_old --head-dims 64 128 256 --fwd-seqlens \
    --bwd-seqlens 4096 8192 > $OUT/ab.log 2>&1
echo "ab rc=$?"; tail -13 $OUT/ab.log
timeout 200 python ci/sm90_bwd_check.py --phase check --quick > $OUT/check.log 2>&1
echo "check rc=$?"; tail -2 $OUT/check.log
