# Call 10: the causal D64 backward row on the TMA reduce-add (its 8-byte spill accepted: +12-14%
# in call 9) checked: the backward check phase (every row against float64, dK/dV bitwise repeats),
# memcheck, racecheck and synccheck, then the backward benchmark of that row in turns.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
timeout 150 python ci/sm90_bwd_check.py --phase check > $O/bwd_check.log 2>&1; echo "bwd check rc=$? $(grep SUMMARY $O/bwd_check.log)"
grep -E "FAIL|rror|local [1-9]" $O/bwd_check.log | head -8
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in memcheck racecheck synccheck; do
  timeout 80 compute-sanitizer --tool $tool --kernel-name kns=flash_bwd_sm90 --report-api-errors no --error-exitcode 9 \
    python ci/sm90_bwd_check.py --phase check --sanitize >> $O/bwd_sanitize.log 2>&1
  echo "bwd sanitize $tool rc=$? $(grep -E 'SUMMARY' $O/bwd_sanitize.log | tail -2 | tr '\n' ' ')"
done
unset PYTORCH_NO_CUDA_MEMORY_CACHING
timeout 100 python -m xattn bench --bwd --dtypes bfloat16 float16 --head-dims 64 --seqlens 2048 4096 8192 --out $O/bench_bwd > $O/bench_bwd.log 2>&1; echo "bench bwd rc=$?"
grep -v "^#" $O/bench_bwd.log | head -9; rm -f $O/bench_bwd/*.png
