# Call 5: the GPU suite's verify phase on main with the one CUDA-core body (forward and backward
# of kernels_common/, issue 12) and this session's sm90 rows; then float32 speed of the unified
# body against the two kernels it replaced (.carry/old: the tree at 7becaff, carried), one process
# after the other; then the per-call overhead once more.
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
OUT=$O/verify VERIFY_LIMIT=420 bash ci/gpu_suite.sh verify 2>&1 | tail -16
grep -h -E "FAILED|Error|failed" $O/verify/pytest_*.log | head -20
tail -4 $O/verify/sanitize.log
tar czf $O/verify_logs.tgz -C $O verify && rm -rf $O/verify
(cd .carry/old && timeout 120 python ci/f32_paths.py) > $O/f32_old.log 2>&1; echo "old rc=$?"; cat $O/f32_old.log | grep -v Warn
timeout 120 python ci/f32_paths.py > $O/f32_new.log 2>&1; echo "new rc=$?"; cat $O/f32_new.log | grep -v Warn
timeout 100 python -m xattn bench --overhead --out $O/overhead 2>&1 | tail -9
