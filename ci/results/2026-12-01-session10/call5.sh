# Call 5: more K/V stages in flight (cuDNN's forward kernel takes 232 KB of shared memory, ours
# 165 KB at D128): the D64 and D128 rows with 3 and 4 stages where they fit, cuDNN in the same
# rounds. Predicted: +0-4% at S 2048 if the consumers wait on K/V loads (ncu: "wait" and "long
# scoreboard" stalls), nothing if they wait on the tensor cores.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 300 python ci/sm90_fwd_check.py --phase stages --head-dims 64 128 --seqlens 2048 4096 8192 > $OUT/stages.log 2>&1
echo "rc=$?"; grep -v "^ *(" $OUT/stages.log | tail -16
