# Call 6: the benchmarks on the session's rows (forward bf16 D64/128/192/256; backward fp16 and bf16
# at S 4096), side by side with SDPA flash and cuDNN.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 300 python -m xattn bench --head-dims 64 128 192 256 --seqlens 2048 8192 --dtypes bfloat16 --out $OUT/fwd 2>&1 | tail -22
timeout 280 python -m xattn bench --bwd --head-dims 64 128 256 --seqlens 4096 --dtypes float16 bfloat16 --out $OUT/bwd 2>&1 | tail -16
