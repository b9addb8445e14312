# Call 3: the forward's new D128 rows (S <= 2048): float64 checks, sanitizers, GPU tests.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
OUT=$O PHASES="check sanitize" bash ci/sm90_round.sh
grep -E "FAIL|rror" $O/check.log | head -5
timeout 220 python -m pytest -q -x -p no:cacheprovider -m gpu tests/test_sm90.py > $O/pytest_sm90.log 2>&1; echo "pytest sm90 rc=$? $(tail -1 $O/pytest_sm90.log)"
