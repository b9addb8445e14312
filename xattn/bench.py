"""`python -m xattn bench`: xattn against PyTorch SDPA's flash, cuDNN and efficient backends, side by
side in one process, on the shapes of ../shared/ANCHORS.md (B*S = 16384, H*D = 2048).

Forward FLOPs = 4*B*H*Sq*Sk*D, halved when causal (the FlashAttention papers' convention).
A benchmark, not a test: it prints a table with ratios, and writes JSON and (with matplotlib) a PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

PEERS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def _timer():
    """Median milliseconds of fn(), measured with CUDA events (triton's do_bench when present)."""
    import torch

    try:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")
    except ImportError:
        pass

    def bench(fn, reps=30):
        for _ in range(5):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return bench


def _sdpa(backend_name: str, causal: bool):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, PEERS[backend_name])

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def forward_cases(args):
    for dtype in args.dtypes:
        for head_dim in args.head_dims:
            for causal in args.causal:
                for seqlen in args.seqlens:
                    yield dtype, head_dim, causal, seqlen


def run_forward(args, timer) -> list[dict]:
    import torch

    import xattn

    rows = []
    for dtype_name, head_dim, causal, seqlen in forward_cases(args):
        dtype = getattr(torch, dtype_name)
        batch, heads = max(1, args.tokens // seqlen), max(1, args.width // head_dim)
        q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype) for _ in range(3))
        flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
        row = {"dtype": dtype_name, "head_dim": head_dim, "causal": causal, "seqlen": seqlen,
               "batch": batch, "heads": heads}
        impls = {"xattn": lambda q, k, v: xattn.attention(q, k, v, causal=causal)}
        impls |= {name: _sdpa(name, causal) for name in PEERS}
        reference = None
        for name, fn in impls.items():
            try:
                out = fn(q, k, v)
                ms = timer(lambda: fn(q, k, v))
            except Exception as exc:  # a peer may not support this shape or GPU
                row[name] = None
                row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                continue
            row[name] = flops / ms / 1e9  # TFLOP/s
            if name == "xattn":
                reference = out
            elif name == "flash" and reference is not None:
                diff = (reference.float() - out.float()).norm() / out.float().norm()
                row["xattn_vs_flash_rel_err"] = float(diff)
        rows.append(row)
        print(_format_row(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _ratio(row, peer):
    a, b = row.get("xattn"), row.get(peer)
    return f"{a / b:5.2f}x" if a and b else "    - "


def _format_row(row) -> str:
    cells = [f"{row['dtype']:8}", f"D{row['head_dim']:<4}", "causal" if row["causal"] else "      ",
             f"S{row['seqlen']:<6}"]
    for name in ("xattn", *PEERS):
        value = row.get(name)
        cells.append(f"{value:7.1f}" if value else "      -")
    cells += [_ratio(row, "flash"), _ratio(row, "cudnn")]
    return " ".join(cells)


HEADER = (f"{'dtype':8} {'D':5} {'':6} {'S':7} {'xattn':>7} {'flash':>7} {'cudnn':>7} {'effic.':>7}"
          f" {'/flash':>6} {'/cudnn':>6}")


def _plot(rows, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(r["dtype"], r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, (dtype, head_dim, causal) in zip(axes[0], groups):
        sel = [r for r in rows if (r["dtype"], r["head_dim"], r["causal"]) == (dtype, head_dim, causal)]
        for name in ("xattn", *PEERS):
            pts = [(r["seqlen"], r[name]) for r in sel if r.get(name)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype} D={head_dim}{' causal' if causal else ''}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xattn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--causal", type=lambda s: s == "causal", nargs="+", default=[False, True],
                        help="any of: causal full")
    parser.add_argument("--tokens", type=int, default=16384, help="B * S")
    parser.add_argument("--width", type=int, default=2048, help="H * D")
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="folder for JSON and PNG")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("xattn bench needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    timer = _timer()
    device = torch.cuda.get_device_name()
    print(f"# {device}, torch {torch.__version__}, forward TFLOP/s (median)")
    print(HEADER)
    rows = run_forward(args, timer)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    (args.out / "bench.json").write_text(json.dumps({"meta": meta, "forward": rows}, indent=1))
    plotted = _plot(rows, args.out / "bench.png")
    print(f"# wrote {args.out / 'bench.json'}" + (f" and {args.out / 'bench.png'}" if plotted else
                                                  " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
