# Call 4: at S 2048, where every forward row trails cuDNN, each head dim's table row against
# candidate tiles, overlaps and softmax placements in the same rotated rounds (issue 13).
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 560 python ci/sm90_fwd_check.py --phase rows --head-dims 64 128 256 --seqlens 2048 2>&1 | tee $OUT/rows2048.log | grep -E "^D|SUMMARY"
