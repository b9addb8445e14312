"""The hottest SASS lines of an ncu source page (ncu --page source --csv --print-source sass):
per kernel, the instructions with the most warp-stall samples and the stall reasons they carry.

    python ci/ncu_hot.py sass.csv [KERNEL-SUBSTRING] [N]
"""

import csv
import sys


def main(path, kernel="", top=30):
    rows = list(csv.DictReader(open(path, newline="", errors="replace")))
    if not rows:
        print("no rows")
        return
    samples = next(k for k in rows[0] if k.startswith("Warp Stall Sampling (All"))
    total = sum(float(r[samples] or 0) for r in rows)
    hot = sorted(rows, key=lambda r: -float(r[samples] or 0))[:top]
    print(f"{total:.0f} samples; top {top} instructions:")
    for r in hot:
        n = float(r[samples] or 0)
        print(f"{100 * n / total:5.1f}%  {r.get('Address', '')}  {r.get('Source', '')[:90]}")


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3]), *(int(a) for a in sys.argv[3:4]))
