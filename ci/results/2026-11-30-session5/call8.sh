# Session 5, device call 8: the vectorized backward prep/convert kernels, checked and profiled;
# the decode's L2 prefetch hint and split count again, now that its copies are aligned.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
o=$OUT
timeout 200 python ci/kernel_check_bwd.py --quick > $o/check_bwd.log 2>&1; echo "kernel_check_bwd rc=$? $(tail -1 $o/check_bwd.log)"
timeout 150 python -m pytest -m gpu -q -x -n 6 -k "not hip" tests/test_grad.py > $o/pytest_grad.log 2>&1; echo "pytest grad rc=$? $(tail -1 $o/pytest_grad.log)"
OUT=$o NCU_LIMIT=120 bash ci/ncu_profile.sh bwd128 > $o/ncu_bwd_summary.txt 2>&1; rm -f $o/ncu.tar.gz
grep -E "^  [^ ]|Duration|DRAM Throughput" $o/ncu_bwd_summary.txt | cut -c1-110
timeout 200 python ci/tune_decode.py --prefetch 0 128 256 --splits 0 2 8 --seqlens 32768 131072 --heads-k 8 32 > $o/tune_decode.log 2>&1; echo "tune_decode rc=$?"
cat $o/tune_decode.log | tail -40
