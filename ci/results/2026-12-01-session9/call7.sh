# Call 7: what call 5 left open: the lse property with the score-rounding term on every GPU path;
# the unified float32 bodies on the full forward and CUDA-core backward checks; racecheck and
# synccheck on the portable bodies run on NVIDIA in wave32 and wave64 (hip_on_cuda's named
# barriers per wave of 64).
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
timeout 100 python -m pytest -m gpu -q -p no:cacheprovider tests/test_properties.py -k "lse_is_logsumexp" 2>&1 | tail -3
timeout 130 python ci/kernel_check_bwd.py --simt --cases grid,tuned,odd > $O/bwd_simt.log 2>&1; echo "bwd simt rc=$? $(tail -1 $O/bwd_simt.log)"
timeout 100 python ci/kernel_check.py --cases tuned,odd > $O/fwd_tuned_odd.log 2>&1; echo "fwd tuned,odd rc=$? $(tail -1 $O/fwd_tuned_odd.log)"
for tool in racecheck synccheck; do
  timeout 115 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 \
    python -m pytest -m gpu -q -p no:cacheprovider tests/test_hip_portable.py -k "every_forward_row or backward" > $O/portable_$tool.log 2>&1
  echo "portable $tool rc=$? $(grep -E 'passed|failed' $O/portable_$tool.log | tail -1) $(grep -E 'SUMMARY' $O/portable_$tool.log | tail -1)"
done
# Then, the racecheck above having run out of time inside the backward tests, each alone:
#   timeout 250 compute-sanitizer --tool racecheck ... python -m pytest -m gpu -q tests/test_hip_portable.py -k "every_backward_row"  # portable_bwd_racecheck.log
#   timeout 150 compute-sanitizer --tool racecheck ... python -m pytest -m gpu -q tests/test_hip_portable.py -k "every_forward_row"   # portable_fwd_racecheck.log
