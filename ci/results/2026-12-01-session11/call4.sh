# Call 4: Nsight Compute on the forward D128 S2048 (its table row: 128-key tiles, persistent, no
# pingpong, lazy rescaling; 0.96x cuDNN in call 3) and the backward D128 S4096 (0.94x): where the
# warps stall, instruction by instruction (ci/ncu_hot.py on the source page), against cuDNN's.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=$OUT NCU_LIMIT=300 NCU_L2_CASES=none timeout 400 bash ci/ncu_profile.sh fwd128 bwd128 > $OUT/ncu_summary.txt 2>&1
echo "ncu rc=$?"; grep -E "rc=|^profiled" $OUT/ncu_summary.txt | head
mkdir -p /tmp/n && tar -xzf $OUT/ncu.tar.gz -C /tmp/n
python ci/ncu_hot.py /tmp/n/ncu/sass.csv flash_fwd_sm90 45 > $OUT/hot_fwd.txt 2>&1
python ci/ncu_hot.py /tmp/n/ncu/sass.csv fprop 12 > $OUT/hot_fwd_cudnn.txt 2>&1
python ci/ncu_hot.py /tmp/n/ncu/sass.csv flash_bwd_sm90 45 > $OUT/hot_bwd.txt 2>&1
python ci/ncu_hot.py /tmp/n/ncu/sass.csv bprop 12 > $OUT/hot_bwd_cudnn.txt 2>&1
head -3 $OUT/hot_fwd.txt $OUT/hot_fwd_cudnn.txt $OUT/hot_bwd.txt $OUT/hot_bwd_cudnn.txt | cut -c1-400
rm $OUT/ncu.tar.gz
