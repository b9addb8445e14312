# Call 1: Nsight Compute on the rows still short of cuDNN (the current table rows), and the host
# overhead once more. ncu: ci/ncu_profile.sh (xattn and cuDNN each once per case, same shapes).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
timeout 100 python -m xattn bench --overhead --out $OUT/overhead 2>&1 | grep -E "^forward"
OUT=$OUT NCU_LIMIT=420 NCU_L2_CASES=decode timeout 480 bash ci/ncu_profile.sh fwd128 fwd128c fwd64c bwd128 bwd64c decode > $OUT/ncu_summary.txt 2>&1
echo "ncu done rc=$?"; grep -E "rc=|^profiled" $OUT/ncu_summary.txt | head -20
