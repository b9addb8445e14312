# Call 8: the benchmarks (forward bf16; backward fp16 and bf16 at S 4096: the device time left)
export PYTHONPATH=. PYTHONUNBUFFERED=1
python -m xattn bench --head-dims 64 128 256 --seqlens 2048 8192 --dtypes bfloat16 --out $OUT/fwd
python -m xattn bench --bwd --head-dims 64 128 256 --seqlens 4096 --dtypes float16 bfloat16 --out $OUT/bwd
