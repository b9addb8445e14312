# Call 6: the GPU suite's checks after the last kernel change (kernel checks, GPU tests on the cuda
# and hip-on-cuda paths, sanitizers on the tuned rows, bad-table memchecks), as parallel jobs.
set -u
OUT=$OUT VERIFY_LIMIT=400 bash ci/gpu_suite.sh verify > $OUT/verify_summary.txt 2>&1
cat $OUT/verify_summary.txt | tail -20
for f in $OUT/pytest_*.log; do grep -E "^FAILED|^ERROR" $f | head -3; done
