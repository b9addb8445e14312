set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
O=$OUT
python - > $O/sass_device.txt 2>&1 <<'PY'
import sys; sys.path.insert(0, "ci")
import sass
from xattn import kernels, sm90
b = kernels.cuda("flash_bwd_sm90")
for row in sm90.BWD_ROWS:
    for es in (True, False):
        d = b.defines(row._replace(early_scores=es), "bfloat16", flags={"IS_CAUSAL": int(row.causal)})
        print(row.head_dim, row.causal, "early" if es else "late", sass.sass_counts(b.source, d, ("HGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE")))
PY
OUT=$O PHASES="bwd_check bwd_sanitize" bash ci/sm90_round.sh
OUT=$O BWD_QUICK=1 PHASES="bwd_bench" bash ci/sm90_round.sh
grep -E "^\|" $O/bwd_bench.log | head -20
cat $O/sass_device.txt
grep -E "FAIL|rror" $O/bwd_check.log | head -5
