# Call 4: call 3's A/B again with 5 rounds: the sources before (sm90_old), the descriptors alone
# (MBAR_SUSPEND_NS=0) and both changes, cuDNN in the same rounds.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 400 python ci/sm90_ab.py --old sm90_old --variant desc:MBAR_SUSPEND_NS=0 --rounds 5 > $OUT/ab.log 2>&1
echo "ab rc=$?"; grep -v "^ *(" $OUT/ab.log | tail -30
