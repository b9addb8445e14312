# Call 9: the forward benchmark over the whole range (D 64/128/256, bf16 and fp16, causal
# and not, S 512-16384; implementations in turns), and memcheck over the backward's tuned rows
# alone (call 8's ran out of its 60 s beside the other jobs; the backward is byte-identical to
# session 10's, where it was clean).
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
timeout 220 python -m xattn bench --dtypes bfloat16 float16 --head-dims 64 128 256 \
    --seqlens 512 1024 2048 4096 8192 16384 --out $O/bench > $O/bench.log 2>&1; echo "bench rc=$?"
rm -rf $O/bench/*.png
timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 \
    python ci/kernel_check_bwd.py --sanitize --cases tuned > $O/memcheck_bwd.log 2>&1
echo "memcheck bwd rc=$? $(grep -E 'cases passed|ERROR SUMMARY' $O/memcheck_bwd.log | tail -2 | tr '\n' ' ')"
grep -v "^#" $O/bench.log | head -80
