# Call 4: the forward's persistent loop across blocks (two Q buffers, D128 rows up to S 2048):
# float64 checks, the three sanitizers, and the table's rows with and without it against cuDNN.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
OUT=$O PHASES="check sanitize" bash ci/sm90_round.sh
grep -E "FAIL|rror" $O/check.log | head -5
timeout 200 python ci/sm90_fwd_check.py --phase rows --head-dims 128 --seqlens 1024 2048 4096 > $O/fwd_rows.log 2>&1; echo "rows rc=$?"
grep -E "^D|table rows" $O/fwd_rows.log
