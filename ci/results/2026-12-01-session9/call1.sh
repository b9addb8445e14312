# Call 1: per-call overhead and the whole model in interleaved rounds (issue 12); D64 forward rows
# with the softmax under P V, and D192's placement (issue 13).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi -L
timeout 200 python -m xattn bench --overhead --out $OUT/overhead 2>&1 | tee $OUT/overhead.log | tail -12
timeout 420 python -m xattn bench --model --model-reps 5 --out $OUT/model 2>&1 | tee $OUT/model.log | grep -v Warning | tail -14
timeout 400 python ci/sm90_fwd_check.py --phase rows --head-dims 64 192 --seqlens 2048 8192 2>&1 | tee $OUT/rows.log | tail -12
