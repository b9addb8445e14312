"""The hottest SASS lines of an ncu source page (ncu --page source --csv --print-source sass, one
"Kernel Name" line and a table per kernel): per kernel whose name contains KERNEL, its stall
reasons summed over the kernel and the instructions with the most warp-stall samples.

    python ci/ncu_hot.py sass.csv [KERNEL] [N]
"""

import csv
import sys


def kernels(path):
    """{kernel name: its rows (dicts)} in the file's order."""
    out, name, header = {}, None, None
    for row in csv.reader(open(path, newline="", errors="replace")):
        if row and row[0] == "Kernel Name":
            name, header = row[1], None
        elif header is None:
            header = row
        elif name is not None:
            out.setdefault(name, []).append(dict(zip(header, row)))
    return out


def number(text) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


def main(path, kernel="", top=30):
    for name, rows in kernels(path).items():
        if kernel not in name:
            continue
        samples = "Warp Stall Sampling (All Samples)"
        total = sum(number(r[samples]) for r in rows) or 1.0
        reasons = {k: sum(number(r[k]) for r in rows) for k in rows[0]
                   if k.startswith("stall_") and not k.endswith("(Not Issued)")}
        print(f"== {name[:100]}: {total:.0f} samples")
        print("   " + ", ".join(f"{k[6:]} {100 * v / total:.1f}%" for k, v in
                                 sorted(reasons.items(), key=lambda kv: -kv[1]) if v / total > 0.01))
        for r in sorted(rows, key=lambda r: -number(r[samples]))[:top]:
            why = max(reasons, key=lambda k: number(r.get(k)))
            print(f"{100 * number(r[samples]) / total:5.1f}%  {r['Address']:>6}  {why[6:]:10} {r['Source'][:80]}")


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3]), *(int(a) for a in sys.argv[3:4]))
