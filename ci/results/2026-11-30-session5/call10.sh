# Session 5, device call 10: the mma.sync backward's dQ adds predicated (sm_90), checked and timed
# at D256 against FlashAttention-2 (SDPA flash) and cuDNN.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
o=$OUT
timeout 200 python ci/kernel_check_bwd.py --quick > $o/check_bwd.log 2>&1; echo "kernel_check_bwd rc=$? $(tail -1 $o/check_bwd.log)"
timeout 200 python -m xattn bench --bwd --dtypes bfloat16 --head-dims 256 --seqlens 2048 8192 --out $o/bb > $o/bench_bwd_d256.log 2>&1; echo "bench rc=$?"
grep -v "^#" $o/bench_bwd_d256.log | tail -12
