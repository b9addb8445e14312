# Call 11: everything that checks, after the merge of the decode's one CUDA-core body for both
# vendors (kernels_common/flash_decode_simt.h; the CUDA decode cubins byte-identical to before,
# the portable HIP decode rebuilt on it) and this session's sm90 rows: ci/gpu_suite.sh verify
# (kernel checks, the GPU tests on the cuda and hip-on-cuda paths, sanitizers on the tuned rows,
# bad block tables), and beside it compute-sanitizer over ci/decode_sanitize.py through the
# portable decode (--hip-on-cuda) and the CUDA one.
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
( for tool in memcheck racecheck synccheck; do
    timeout 120 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 python ci/decode_sanitize.py --hip-on-cuda >> $O/decode_sanitize_hip.log 2>&1
    echo "decode_sanitize --hip-on-cuda $tool rc=$?"
  done > $O/decode_sanitize_hip.sum ) &
OUT=$O/verify VERIFY_LIMIT=380 bash ci/gpu_suite.sh verify 2>&1 | tail -18
wait
cat $O/decode_sanitize_hip.sum; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cases" $O/decode_sanitize_hip.log | tail -6
tar -czf $O/verify_logs.tar.gz -C $O verify && rm -rf $O/verify
