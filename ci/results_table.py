"""Render `python -m xattn bench` JSON (forward and --bwd) as the Markdown tables committed under
ci/results/.

    python ci/results_table.py ci/results/<run>/bench.json [ci/results/<run>/bench_bwd.json]
"""

import json
import statistics
import sys


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def forward_table(rows):
    lines = ["| dtype | D | causal | S | xattn | SDPA flash | SDPA cuDNN | SDPA efficient | xattn/flash | xattn/cuDNN |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['seqlen']} | "
                     f"{r['xattn']:.1f} | {r['flash']:.1f} | {r['cudnn']:.1f} | {r['efficient']:.1f} | "
                     f"{ratio(r['xattn'], r['flash'])} | {ratio(r['xattn'], r['cudnn'])} |")
    return lines


def backward_table(rows):
    lines = ["| dtype | D | causal | S | xattn bwd | flash bwd | cuDNN bwd | xattn/flash | xattn/cuDNN | xattn fwd+bwd | flash fwd+bwd | fwd+bwd xattn/flash |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['seqlen']} | "
                     f"{r['xattn']:.1f} | {r['flash']:.1f} | {r['cudnn']:.1f} | {ratio(r['xattn'], r['flash'])} | "
                     f"{ratio(r['xattn'], r['cudnn'])} | {r['xattn_fwdbwd']:.1f} | {r['flash_fwdbwd']:.1f} | "
                     f"{ratio(r['xattn_fwdbwd'], r['flash_fwdbwd'])} |")
    return lines


def summary(rows, key="xattn"):
    long = [r[key] / r["flash"] for r in rows if r["seqlen"] >= 1024 and r.get(key) and r.get("flash")]
    return f"S >= 1024: xattn/flash {min(long):.2f} to {max(long):.2f}, median {statistics.median(long):.2f}"


def main(paths):
    out = []
    for path in paths:
        data = json.load(open(path))
        meta = data["meta"]
        if "forward" in data:
            out += [f"## Forward TFLOP/s ({meta['device']}, torch {meta['torch']})", "", summary(data["forward"]), ""]
            out += forward_table(data["forward"]) + [""]
        if "backward" in data:
            out += [f"## Backward TFLOP/s (2.5 x forward FLOPs; {meta['device']})", "",
                    "backward " + summary(data["backward"]), "", *backward_table(data["backward"]), ""]
            if data.get("memory"):
                out += ["Memory (forward+backward, peak allocated / inputs' bytes): " + json.dumps(data["memory"]), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
