# Call 12: the per-call host overhead twice more on this tree (two processes).
export PYTHONPATH=. PYTHONUNBUFFERED=1
for i in 1 2; do timeout 70 python -m xattn bench --overhead --out $OUT/overhead$i 2>&1 | grep -E "^forward"; done
