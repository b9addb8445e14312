# Call 8: the retuned forward rows (D128 with the softmax under P V, one causal D128 row, D64 with
# three stages) checked, then the benchmarks with the launches of every implementation taken in
# turns (xattn.bench.in_turns: `python -m xattn bench` timed each implementation with do_bench one
# after another until now).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
timeout 150 python ci/sm90_fwd_check.py --phase check > $O/fwd_check.log 2>&1; echo "fwd check rc=$? $(grep SUMMARY $O/fwd_check.log)"
grep -E "FAIL|rror" $O/fwd_check.log | head -5
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in memcheck racecheck synccheck; do
  timeout 80 compute-sanitizer --tool $tool --kernel-name kns=flash_fwd_sm90 --report-api-errors no --error-exitcode 9 \
    python ci/sm90_fwd_check.py --phase check --sanitize >> $O/fwd_sanitize.log 2>&1
  echo "fwd sanitize $tool rc=$? $(grep -E 'SUMMARY' $O/fwd_sanitize.log | tail -2 | tr '\n' ' ')"
done
unset PYTORCH_NO_CUDA_MEMORY_CACHING
timeout 120 python -m xattn bench --dtypes bfloat16 float16 --head-dims 64 128 256 --seqlens 2048 8192 --out $O/bench > $O/bench.log 2>&1; echo "bench rc=$?"
timeout 120 python -m xattn bench --bwd --dtypes bfloat16 --head-dims 64 128 256 --seqlens 4096 --out $O/bench_bwd > $O/bench_bwd.log 2>&1; echo "bench bwd rc=$?"
timeout 100 python -m xattn bench --decode --out $O/bench_decode > $O/bench_decode.log 2>&1; echo "bench decode rc=$?"
cat $O/bench.log; grep -v "^#" $O/bench_bwd.log | head -12; grep -E "xattn bf16 |cuDNN" $O/bench_decode.log
rm -rf $O/bench/*.png $O/bench_bwd/*.png $O/bench_decode/*.png
