# Call 3: what the two changes gained, side by side with the sources before them (kernels_cuda/
# sm90_old: git archive of 115d4c4's kernels_cuda/sm90, carried for this call only) and with the
# suspend hint alone switched off (MBAR_SUSPEND_NS=0), cuDNN in the same rounds; then Nsight
# Compute on the D128 forward and backward again (instruction mix: SYNCS, ULOP3).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 330 python ci/sm90_ab.py --old sm90_old --variant nohint:MBAR_SUSPEND_NS=0 > $OUT/ab.log 2>&1
echo "ab rc=$?"; cat $OUT/ab.log | grep -v "^ *(" | tail -40
OUT=$OUT NCU_LIMIT=150 NCU_L2_CASES=none timeout 200 bash ci/ncu_profile.sh fwd128 bwd128 > $OUT/ncu_summary.txt 2>&1
echo "ncu rc=$?"
