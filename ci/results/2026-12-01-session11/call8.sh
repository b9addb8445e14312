# Call 8: everything that checks, on this session's forward (lazy rescaling on the D128/D192/D256
# rows, call 2; the D128 rows replaced by one 128-key pingpong row and the causal D128 and D256
# rows retuned, call 7): ci/gpu_suite.sh verify (kernel checks, the GPU tests on the cuda and
# hip-on-cuda paths, memcheck/racecheck/synccheck on the tuned rows), then the sm90 forward's own
# checks in full.
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
OUT=$O/verify VERIFY_LIMIT=380 bash ci/gpu_suite.sh verify 2>&1 | tail -18
timeout 150 python ci/sm90_fwd_check.py --phase check > $O/fwd_check.log 2>&1; echo "fwd check rc=$? $(grep SUMMARY $O/fwd_check.log)"
tar -czf $O/verify_logs.tar.gz -C $O verify && rm -rf $O/verify
