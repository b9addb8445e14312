# Call 8: bench --overhead twice more (two processes), for the spread of the forward+backward ratio.
export PYTHONPATH=. PYTHONUNBUFFERED=1
for i in 1 2; do timeout 90 python -m xattn bench --overhead --out $OUT/overhead$i 2>&1 | grep -E "^forward"; done
