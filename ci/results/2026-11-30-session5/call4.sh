# Session 5, device call 4: the swizzled decode ring and the D64 forward row, checked and timed.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
o=$OUT
timeout 150 python ci/kernel_check_decode.py > $o/check_decode.log 2>&1; echo "kernel_check_decode rc=$? $(tail -1 $o/check_decode.log)"
timeout 200 python -m pytest -m gpu -q -x -n 6 -k "not hip" tests/test_kvcache.py tests/test_kvcache_fp8.py tests/test_decode_fp8_fragments.py > $o/pytest_decode.log 2>&1; echo "pytest decode rc=$? $(tail -1 $o/pytest_decode.log)"
(for t in memcheck racecheck synccheck; do timeout 100 compute-sanitizer --tool $t --report-api-errors no --error-exitcode 1 python ci/decode_sanitize.py > $o/sanitize_decode_$t.log 2>&1; echo "$t rc=$? $(grep -h 'ERROR SUMMARY\|RACECHECK SUMMARY' $o/sanitize_decode_$t.log | tail -1)"; done; timeout 90 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 python ci/decode_bad_table.py > $o/sanitize_bad_table.log 2>&1; echo "bad_table memcheck rc=$? $(grep 'ERROR SUMMARY' $o/sanitize_bad_table.log | tail -1)") &
timeout 120 python ci/sm90_fwd_check.py --phase check --quick > $o/sm90_fwd_check.log 2>&1; echo "sm90_fwd_check rc=$? $(grep -i 'passed\|failed' $o/sm90_fwd_check.log | tail -1)"
wait
timeout 60 ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight --metrics dram__sectors_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,lts__t_requests_srcunit_tex_op_read.sum python ci/ncu_cases.py decode > $o/ncu_decode_swizzle.txt 2>&1
grep -E "^  [^ ]|__|Duration|DRAM Through" $o/ncu_decode_swizzle.txt | cut -c1-120 | head -14
timeout 200 python -m xattn bench --decode --out $o/bd > $o/bench_decode.log 2>&1; echo "bench decode rc=$?"
grep -v "^#" $o/bench_decode.log
timeout 150 python ci/sm90_fwd_check.py --phase bench --quick --head-dims 64 --seqlens 1024 2048 4096 8192 > $o/sm90_bench_d64.log 2>&1
grep "^|" $o/sm90_bench_d64.log
