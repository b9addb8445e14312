"""`python -m xattn bench`: xattn against PyTorch SDPA's flash, cuDNN and efficient backends,
side by side in one process, on B*S = 16384 tokens and H*D = 2048 (the FlashAttention papers'
shapes; --tokens and --width change them).

Forward FLOPs = 4*B*H*Sq*Sk*D, halved when causal (the FlashAttention papers' convention).
With --bwd: backward (2.5x the forward FLOPs) and forward+backward (3.5x) against SDPA flash and
cuDNN on the same shapes, and the peak memory of forward+backward at one long sequence.
With --model: a whole Llama-style model with "xattn" and with "sdpa" (xattn.bench_model).
A benchmark, not a test: it prints a table with ratios, and writes JSON and (with matplotlib) a PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

from xattn import bench_model

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


TURNS = 50  # launches of each implementation in in_turns


def in_turns(fns: dict, turns: int = TURNS) -> dict:
    """Median milliseconds of each fn() (name -> callable), their launches taken in turns: A B C,
    B C A, C A B, ... `turns` of each, so that every implementation runs under the same clocks
    (the H200's follow its power draw over seconds: timed one implementation after another with
    do_bench, two timings of one kernel differed by up to 7%; in turns, by 0.3%,
    ci/results/2026-12-01-session10/). Before every launch the L2 cache is flushed (as do_bench
    does) and, once a turn, the GPU spins for a millisecond so that it stays behind the host and
    no pair of CUDA events brackets host time. Each fn has run once before (compiled, planned)."""
    import torch

    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    names = list(fns)
    for name in names:
        fns[name]()
    torch.cuda.synchronize()
    events = {name: [] for name in names}
    for turn in range(turns):
        torch.cuda._sleep(2_000_000)
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs)
            for name, pairs in events.items()}


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
        reference, timed = None, {}
        for name, fn in impls.items():
            try:
                out = fn(q, k, v)
            except Exception as exc:  # a peer may not support this shape or GPU
                row[name] = None
                row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                continue
            timed[name] = lambda fn=fn: fn(q, k, v)
            if name == "xattn":
                reference = out
            elif name == "flash" and reference is not None:
                diff = (reference.float() - out.float()).norm() / out.float().norm()
                row["xattn_vs_flash_rel_err"] = float(diff)
        for name, ms in timer(timed).items():
            row[name] = flops / ms / 1e9  # TFLOP/s
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


# ------------------------------------------------------------------------------- --bwd

BWD_PEERS = ("flash", "cudnn")
BWD_FLOPS_FACTOR = 2.5  # backward / forward FLOPs (FlashAttention-2 paper)


def run_backward(args, timer, device="cuda") -> list[dict]:
    """Backward and forward+backward TFLOP/s of xattn and its peers on the forward table's shapes."""
    import torch

    import xattn

    rows = []
    for dtype_name, head_dim, causal, seqlen in forward_cases(args):
        dtype = getattr(torch, dtype_name)
        batch, heads = max(1, args.tokens // seqlen), max(1, args.width // head_dim)
        q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype)
                   .requires_grad_() for _ in range(3))
        dout = torch.randn_like(q)
        fwd_flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
        row = {"dtype": dtype_name, "head_dim": head_dim, "causal": causal, "seqlen": seqlen,
               "batch": batch, "heads": heads}
        impls = {"xattn": lambda q, k, v: xattn.attention(q, k, v, causal=causal)}
        impls |= {name: _sdpa(name, causal) for name in BWD_PEERS}
        reference, backward_only, both = None, {}, {}
        for name, fn in impls.items():
            try:
                out = fn(q, k, v)
                grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            except Exception as exc:  # a peer may not support this shape or GPU
                row[name] = row[f"{name}_fwdbwd"] = None
                row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                continue
            # Backward alone: the graph is kept and walked again on every repetition.
            backward_only[name] = lambda out=out: torch.autograd.grad(out, (q, k, v), dout,
                                                                      retain_graph=True)
            both[name] = lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
            if name == "xattn":
                reference = grads
            elif name == "flash" and reference is not None:
                for label, mine, theirs in zip(("dq", "dk", "dv"), reference, grads):
                    diff = (mine.float() - theirs.float()).norm() / theirs.float().norm()
                    row[f"xattn_vs_flash_{label}_rel_err"] = float(diff)
            del grads
        for name, ms in timer(backward_only).items():
            row[name] = BWD_FLOPS_FACTOR * fwd_flops / ms / 1e9  # TFLOP/s
        for name, ms in timer(both).items():
            row[f"{name}_fwdbwd"] = (1 + BWD_FLOPS_FACTOR) * fwd_flops / ms / 1e9
        del backward_only, both
        rows.append(row)
        print(_format_bwd_row(row), flush=True)
        del q, k, v, dout, reference
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_memory(args) -> dict:
    """Peak torch.cuda memory of forward+backward over the inputs' bytes, at one long sequence
    (B = 1, H = args.width // D, D = 128, bf16) where the math backend's S x S matrix cannot fit."""
    import torch

    import xattn

    seqlen, head_dim = args.mem_seqlen, 128
    heads = max(1, args.width // head_dim)
    impls = {"xattn": lambda q, k, v: xattn.attention(q, k, v)}
    impls |= {name: _sdpa(name, False) for name in BWD_PEERS}
    impls["math"] = _sdpa_math()
    result = {"seqlen": seqlen, "heads": heads, "head_dim": head_dim, "dtype": "bfloat16"}
    for name, fn in impls.items():
        torch.cuda.empty_cache()
        q, k, v = (torch.randn(1, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16)
                   .requires_grad_() for _ in range(3))
        input_bytes = 3 * q.numel() * q.element_size()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            fn(q, k, v).backward(torch.ones_like(q))
            torch.cuda.synchronize()
            result[name] = (torch.cuda.max_memory_allocated() - base) / input_bytes
        except Exception as exc:  # the math backend runs out of memory here, by design
            result[name] = None
            result[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        del q, k, v
    cells = [f"{result[n]:6.2f}x" if result.get(n) else "   OOM/-" for n in impls]
    print(f"# memory, forward+backward, bf16 B=1 H={heads} D={head_dim} S={seqlen}: peak "
          f"allocated / inputs' bytes")
    print("  ".join(f"{n}={c.strip()}" for n, c in zip(impls, cells)), flush=True)
    return result


def _sdpa_math():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _format_bwd_row(row) -> str:
    cells = [f"{row['dtype']:8}", f"D{row['head_dim']:<4}", "causal" if row["causal"] else "      ",
             f"S{row['seqlen']:<6}"]
    for suffix in ("", "_fwdbwd"):
        for name in ("xattn", *BWD_PEERS):
            value = row.get(name + suffix)
            cells.append(f"{value:7.1f}" if value else "      -")
        for peer in BWD_PEERS:
            a, b = row.get("xattn" + suffix), row.get(peer + suffix)
            cells.append(f"{a / b:5.2f}x" if a and b else "    - ")
    return " ".join(cells)


BWD_HEADER = (f"{'':29}{'backward':^38}{'forward+backward':^38}\n"
              f"{'dtype':8} {'D':5} {'':6} {'S':7}"
              + (f" {'xattn':>7} {'flash':>7} {'cudnn':>7} {'/flash':>6} {'/cudnn':>6}" * 2))


# ------------------------------------------------------------------------------- --overhead

OVERHEAD_SHAPE = (1, 8, 128, 64)  # B, H, S, D: small enough that the launch path dominates
OVERHEAD_CALLS = 200


def _overhead_impls(causal: bool):
    """name -> (context manager factory entered once around the timed loop, attention fn).
    The SDPA backend context is entered outside the loop so that only the call is timed, as
    for xattn; "default" lets torch choose."""
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import xattn

    impls = {"xattn": (contextlib.nullcontext,
                       lambda q, k, v: xattn.attention(q, k, v, causal=causal))}
    for name in ("flash", "cudnn"):
        backend = getattr(SDPBackend, PEERS[name])
        impls[name] = (lambda backend=backend: sdpa_kernel(backend),
                       lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    impls["default"] = (contextlib.nullcontext,
                        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    return impls


OVERHEAD_ROUNDS = 15


def _interleaved_us(calls: dict, per_run: int, rounds: int = OVERHEAD_ROUNDS) -> dict:
    """name -> (GPU us, host us, us / the first name's) per call, over `rounds` rounds in which
    every name runs `per_run` calls back to back (bench_model.rotated_rounds); the ratio is the
    median of the per-round ratios, beside the median absolute times.
    GPU: CUDA events around each run (launch-bound work shows the host's pace here too).
    Host: wall time to issue the calls, the final synchronization excluded; the launch queue
    (about a thousand entries) does not fill at these counts, so the host never waits on it.
    calls: name -> (context manager factory entered around each run, call)."""
    import time

    import torch

    names = list(calls)
    for context, call in calls.values():
        with context():
            for _ in range(20):
                call()
    torch.cuda.synchronize()
    gpu = {name: [] for name in names}
    host = {name: [] for name in names}
    for order in bench_model.rotated_rounds(names, rounds):
        for name in order:
            context, call = calls[name]
            with context():
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                torch.cuda.synchronize()
                start.record()
                began = time.perf_counter()
                for _ in range(per_run):
                    call()
                host[name].append((time.perf_counter() - began) * 1e6 / per_run)
                end.record()
                end.synchronize()
                gpu[name].append(start.elapsed_time(end) * 1e3 / per_run)
    first = names[0]
    return {name: (statistics.median(gpu[name]), statistics.median(host[name]),
                   bench_model.median_ratio(gpu[name], gpu[first]))
            for name in names}


def run_overhead(args, dtype_name="float16", causal=False) -> list[dict]:
    """Microseconds per call at B=1, H=8, S=128, D=64: forward (inputs not requiring grad, the
    inference path) and forward+backward through autograd, xattn against SDPA's backends, in
    interleaved rounds (_interleaved_us); each row's ratio is to SDPA flash's time."""
    import torch

    dtype = getattr(torch, dtype_name)
    rows = []
    for mode in ("forward", "forward+backward"):
        grad = mode != "forward"
        q, k, v = (torch.randn(OVERHEAD_SHAPE, device="cuda", dtype=dtype, requires_grad=grad)
                   for _ in range(3))
        dout = torch.randn_like(q)
        calls, errors = {}, {}
        impls = _overhead_impls(causal)
        for name in ["flash"] + [n for n in impls if n != "flash"]:
            context, fn = impls[name]
            if grad:
                def call(fn=fn):
                    return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
            else:
                def call(fn=fn):
                    return fn(q, k, v)
            try:  # a peer may not support this GPU
                with context():
                    call()
                calls[name] = (context, call)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        times = _interleaved_us(calls, args.overhead_calls) if calls else {}
        for name in impls:
            row = {"mode": mode, "impl": name, "shape": list(OVERHEAD_SHAPE), "dtype": dtype_name,
                   "causal": causal, "gpu_us": None, "host_us": None, "vs_flash": None}
            if name in times:
                row["gpu_us"], row["host_us"], row["vs_flash"] = times[name]
                if "flash" not in calls:
                    row["vs_flash"] = None
            else:
                row["error"] = errors[name]
            rows.append(row)
            cells = [f"{row[key]:9.1f}" if row[key] is not None else "        -"
                     for key in ("gpu_us", "host_us")]
            ratio = f"{row['vs_flash']:8.2f}x" if row["vs_flash"] is not None else "        -"
            print(f"{mode:17} {name:8} {cells[0]} {cells[1]} {ratio}"
                  + (f"  ({row['error']})" if "error" in row else ""), flush=True)
    return rows


def _main_overhead(args, device) -> int:
    import torch

    batch, heads, seqlen, head_dim = OVERHEAD_SHAPE
    print(f"# {device}, torch {torch.__version__}: microseconds per call, float16 B={batch} "
          f"H={heads} S={seqlen} D={head_dim}: {OVERHEAD_ROUNDS} rounds, each running every "
          f"implementation for {args.overhead_calls} calls back to back (order rotated); medians, "
          f"and the median of the per-round ratios of GPU time to SDPA flash's")
    print(f"{'mode':17} {'impl':8} {'GPU us':>9} {'host us':>9} {'vs flash':>9}")
    rows = run_overhead(args)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    (args.out / "bench_overhead.json").write_text(
        json.dumps({"meta": meta, "overhead": rows}, indent=1))
    print(f"# wrote {args.out / 'bench_overhead.json'}")
    return 0


# ------------------------------------------------------------------------------- --variants

def _varlen_inputs(lengths, heads, head_dim, dtype):
    """Packed q, k, v of these sequence lengths and their int32 cumulative lengths, on the GPU."""
    import torch

    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device="cuda")
    return q, k, v, cu


def run_variants(args, timer) -> list[dict]:
    """Forward milliseconds of the variants against plain attention on the same tokens:
    packed (varlen) batches against the padded batch, windows, softcap and ALiBi against the
    plain kernel. Ratios are variant time / plain time (below 1: faster)."""
    import torch

    import xattn

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for head_dim in args.head_dims:
            heads = max(1, args.width // head_dim)
            for causal in args.causal:
                # Equal lengths: varlen and the padded batch do the same work; the ratio is the
                # cost of packing. Mixed lengths: the padded batch also computes the padding.
                generator = torch.Generator().manual_seed(0)
                mixed = torch.randint(256, 2049, (16,), generator=generator).tolist()
                for label, lengths in (("varlen 16x1024", [1024] * 16), ("varlen mixed", mixed)):
                    q, k, v, cu = _varlen_inputs(lengths, heads, head_dim, dtype)
                    longest = max(lengths)
                    padded = torch.randn(len(lengths), heads, longest, head_dim, device="cuda",
                                         dtype=dtype)
                    ms = timer(lambda: xattn.attention_varlen(q, k, v, cu, cu, longest, longest,
                                                              causal=causal))
                    base = timer(lambda: xattn.attention(padded, padded, padded, causal=causal))
                    rows.append({"case": label, "dtype": dtype_name, "head_dim": head_dim,
                                 "causal": causal, "tokens": sum(lengths), "ms": ms,
                                 "plain_ms": base, "plain": "padded batch"})
                    del q, k, v, padded
                seqlen = 8192
                q, k, v = (torch.randn(2, heads, seqlen, head_dim, device="cuda", dtype=dtype)
                           for _ in range(3))
                slopes = torch.rand(heads, device="cuda")
                base = timer(lambda: xattn.attention(q, k, v, causal=causal))
                variants = {"window 1024": dict(window=(1024, 0 if causal else 1024)),
                            "softcap 30": dict(softcap=30.0), "alibi": dict(alibi_slopes=slopes)}
                for label, options in variants.items():
                    ms = timer(lambda: xattn.attention(q, k, v, causal=causal, **options))
                    rows.append({"case": label, "dtype": dtype_name, "head_dim": head_dim,
                                 "causal": causal, "tokens": 2 * seqlen, "ms": ms,
                                 "plain_ms": base, "plain": f"plain S={seqlen}"})
                del q, k, v
                for row in rows[-5:]:
                    print(f"{row['case']:15} {row['dtype']:8} D{row['head_dim']:<4} "
                          f"{'causal' if row['causal'] else '      '} {row['ms']:8.3f} "
                          f"{row['plain_ms']:8.3f} {row['ms'] / row['plain_ms']:6.2f}x  ({row['plain']})",
                          flush=True)
                torch.cuda.empty_cache()
    return rows


def _main_variants(args, timer, device) -> int:
    import torch

    print(f"# {device}, torch {torch.__version__}: forward ms of each variant against plain "
          f"attention on the same tokens (H*D = {args.width})")
    print(f"{'case':15} {'dtype':8} {'D':5} {'':6} {'ms':>8} {'plain ms':>8} {'ratio':>7}")
    rows = run_variants(args, timer)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    (args.out / "bench_variants.json").write_text(
        json.dumps({"meta": meta, "variants": rows}, indent=1))
    print(f"# wrote {args.out / 'bench_variants.json'}")
    return 0


# ------------------------------------------------------------------------------- --decode

DECODE_PEERS = ("flash", "cudnn")


def _sdpa_decode(backend_name: str, gqa: bool):
    """SDPA with one backend forced; gqa: K/V keep Hk heads (enable_gqa), else they come expanded."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, PEERS[backend_name])

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa) if gqa else \
                F.scaled_dot_product_attention(q, k, v)

    return run


DECODE_PAGE_SIZE = 16  # vLLM's default page (block) size, the smallest the kernels take


def _decode_caches(k, v, page_size, fp8, gen):
    """The bench's contiguous bf16 K/V in another form: paged (page_size > 0: (pages, page_size,
    Hk, D) with the pages in shuffled order and the block table that finds them) and/or FP8
    (e4m3fn with a per-kv-head scale amax / 448). Returns (k, v, block_table, k_scale, v_scale)."""
    import torch

    from xattn.kvcache import quantize

    batch, heads_k, seqlen, head_dim = k.shape
    table = k_scale = v_scale = None
    if fp8:
        scales = []
        for x in (k, v):
            amax = x.abs().amax(dim=(0, 2, 3)).float().clamp_min(1e-12)
            scales.append(amax / torch.finfo(torch.float8_e4m3fn).max)
        k_scale, v_scale = scales
        k, v = (quantize(x, s.reshape(-1, 1, 1), torch.float8_e4m3fn) for x, s in zip((k, v), scales))
    if page_size:
        per_seq = seqlen // page_size
        order = torch.randperm(batch * per_seq, generator=gen).to(k.device)
        table = order.reshape(batch, per_seq).int()

        def paginate(x):  # (B, Hk, S, D) -> pages (B * S / page_size, page_size, Hk, D)
            pages = x.reshape(batch, heads_k, per_seq, page_size, head_dim).permute(0, 2, 3, 1, 4)
            out = torch.empty((batch * per_seq, page_size, heads_k, head_dim), dtype=x.dtype,
                              device=x.device)
            out[order] = pages.reshape(batch * per_seq, page_size, heads_k, head_dim)
            return out
        k, v = paginate(k), paginate(v)
    return k, v, table, k_scale, v_scale


def run_decode(args, timer) -> list[dict]:
    """One decode step (Sq = 1, every sequence's cache full) on one set of tokens, in several
    forms: xattn on the contiguous bf16 cache, on the same values paged, and on their FP8
    (e4m3fn, per-kv-head scales) copy contiguous and paged; SDPA flash and cuDNN on the contiguous
    bf16 cache. Per implementation: microseconds, tokens/s (B / time) and TB/s of the cache bytes
    it actually reads (K + V: 2 * B * Hk * Sk * D * element size, 1 byte for FP8), so the bf16
    rows' TB/s ratios are ratios of time and the FP8 rows read half the bytes. A peer that rejects
    GQA (enable_gqa=True) is handed K/V expanded to Hq heads (outside the timing); its TB/s still
    counts the Hk-head cache ("expanded")."""
    import torch

    import xattn
    from xattn import kvcache

    rows = []
    batch, heads_q, head_dim, dtype = args.decode_batch, 32, 128, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    for heads_k in (8, 32):
        for seqlen in args.decode_seqlens:
            q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", dtype=dtype)
            k, v = (torch.randn(batch, heads_k, seqlen, head_dim, device="cuda", dtype=dtype)
                    for _ in range(2))
            lengths = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
            elements = 2 * k.numel()
            plan = kvcache._plan("bfloat16", q.device.index or 0, batch, heads_q, heads_k, 1, seqlen,
                                 head_dim, (-1, -1))
            row = {"batch": batch, "heads_q": heads_q, "heads_k": heads_k, "seqlen_k": seqlen,
                   "head_dim": head_dim, "dtype": "bfloat16", "kv_bytes": elements * 2,
                   "xattn_splits": plan[3], "page_size": DECODE_PAGE_SIZE, "impls": {}}
            forms = {"xattn": (0, False), "xattn_paged": (DECODE_PAGE_SIZE, False),
                     "xattn_fp8": (0, True), "xattn_fp8_paged": (DECODE_PAGE_SIZE, True)}
            reference, timed, read = None, {}, {}  # read: the cache bytes each form reads
            with torch.no_grad():
                for name, (page_size, fp8) in forms.items():
                    if name == "xattn":
                        kc, vc, table, ks, vs = k, v, None, None, None
                    else:
                        kc, vc, table, ks, vs = _decode_caches(k, v, page_size, fp8, gen)

                    def fn(kc=kc, vc=vc, table=table, ks=ks, vs=vs):
                        return xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths,
                                                            causal=False, block_table=table,
                                                            k_scale=ks, v_scale=vs)
                    out = fn()
                    timed[name], read[name] = fn, elements * (1 if fp8 else 2)
                    row["impls"][name] = entry = {}
                    if reference is None:
                        reference = out
                    else:  # FP8: the quantization error of the cache, ~1e-2 (e4m3 has 3 bits)
                        entry["rel_err_vs_xattn"] = float((out.float() - reference.float()).norm()
                                                          / reference.float().norm())
            for name in DECODE_PEERS:
                expanded = False
                try:
                    fn = _sdpa_decode(name, gqa=heads_k != heads_q)
                    out = fn(q, k, v)
                except Exception:  # no GQA support in this backend: expand K/V, outside the timing
                    try:
                        group = heads_q // heads_k
                        ke, ve = (x.repeat_interleave(group, dim=1) for x in (k, v))
                        fn, expanded = _sdpa_decode(name, gqa=False), True
                        out = fn(q, ke, ve)
                    except Exception as exc:
                        row["impls"][name] = {"error": f"{type(exc).__name__}: "
                                                       f"{str(exc).splitlines()[0][:80]}"}
                        continue
                args_ = (q, ke, ve) if expanded else (q, k, v)
                timed[name], read[name] = (lambda fn=fn, args_=args_: fn(*args_)), elements * 2
                row["impls"][name] = {"expanded": expanded, "rel_err_vs_xattn": float(
                    (reference.float() - out.float()).norm() / out.float().norm())}
            with torch.no_grad():
                for name, ms in timer(timed).items():
                    row["impls"][name] |= _decode_entry(ms, batch, read[name])
            del timed
            rows.append(row)
            for line in _format_decode_row(row):
                print(line, flush=True)
            del q, k, v, reference
            torch.cuda.empty_cache()
    return rows


def _decode_entry(ms: float, batch: int, bytes_read: int) -> dict:
    return {"us": ms * 1e3, "tokens_per_s": batch / (ms * 1e-3), "bytes_read": bytes_read,
            "tb_per_s": bytes_read / ms / 1e9}


DECODE_LABELS = {"xattn": "xattn bf16", "xattn_paged": "xattn bf16 paged",
                 "xattn_fp8": "xattn fp8", "xattn_fp8_paged": "xattn fp8 paged",
                 "flash": "SDPA flash bf16", "cudnn": "SDPA cuDNN bf16"}


def _format_decode_row(row) -> list[str]:
    """One line per implementation of one shape: us, tokens/s, TB/s read, time against cuDNN and
    tokens/s against xattn's contiguous bf16 row."""
    shape = f"B{row['batch']} Hq{row['heads_q']} Hk{row['heads_k']:<3} Sk{row['seqlen_k']:<7}"
    impls = row["impls"]
    cudnn = impls.get("cudnn", {}).get("us")
    base = impls["xattn"]["tokens_per_s"]
    lines = []
    for name, label in DECODE_LABELS.items():
        entry = impls.get(name)
        if entry is None or "us" not in entry:
            lines.append(f"{shape} {label:17} " + (entry or {}).get("error", "-"))
            continue
        mark = "*" if entry.get("expanded") else " "
        vs_cudnn = f"{cudnn / entry['us']:5.2f}x" if cudnn else "    - "
        lines.append(f"{shape} {label:17} {entry['us']:9.1f} {entry['tokens_per_s']:10.0f} "
                     f"{entry['tb_per_s']:6.2f}{mark} {vs_cudnn} {entry['tokens_per_s'] / base:6.2f}x")
    lines.append(f"{shape} splits {row['xattn_splits']}, page size {row['page_size']}")
    return lines


DECODE_HEADER = (f"{'shape':29} {'implementation':17} {'us':>9} {'tokens/s':>10} {'TB/s':>7} "
                 f"{'/cudnn':>6} {'tok/s vs bf16':>13}")


def _main_decode(args, timer, device) -> int:
    import torch

    print(f"# {device}, torch {torch.__version__}: decode, one query token per sequence, D=128, "
          f"bf16 queries; TB/s of the K+V bytes each implementation reads (FP8: 1 byte an "
          f"element), median time; /cudnn = cuDNN's time / this one's; * = peer given K/V "
          f"expanded to Hq heads")
    print(DECODE_HEADER)
    rows = run_decode(args, timer)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    (args.out / "bench_decode.json").write_text(json.dumps({"meta": meta, "decode": rows}, indent=1))
    print(f"# wrote {args.out / 'bench_decode.json'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xattn bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"],
                        choices=["bfloat16", "float16", "float32"],
                        help="dtypes of the forward, --bwd and --variants rows (default: %(default)s)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], metavar="D",
                        help="head dims of those rows (default: %(default)s)")
    parser.add_argument("--seqlens", type=int, nargs="+", metavar="S",
                        default=[512, 1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths of the forward and --bwd rows (default: %(default)s)")
    parser.add_argument("--causal", type=lambda s: s == "causal", nargs="+", default=[False, True],
                        metavar="{causal,full}", help="any of: causal full (default: both)")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="B * S of every row; B = tokens // S (default: %(default)s)")
    parser.add_argument("--width", type=int, default=2048,
                        help="H * D of every row; H = width // D (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"),
                        help="folder for the JSON and PNG (default: %(default)s)")
    parser.add_argument("--bwd", action="store_true",
                        help="backward and forward+backward instead of forward, plus a memory row")
    parser.add_argument("--mem-seqlen", type=int, default=65536,
                        help="sequence length of the --bwd memory row")
    parser.add_argument("--variants", action="store_true",
                        help="varlen against the padded batch; window, softcap, ALiBi against plain")
    parser.add_argument("--overhead", action="store_true",
                        help="only the per-call overhead rows (B=1 H=8 S=128 D=64, microseconds)")
    parser.add_argument("--overhead-calls", type=int, default=OVERHEAD_CALLS,
                        help="calls timed per --overhead row")
    parser.add_argument("--decode", action="store_true",
                        help="only the KV-cache decode rows (B=8 Hq=32 Hk=8,32 D=128 bf16, TB/s)")
    parser.add_argument("--decode-seqlens", type=int, nargs="+", default=[4096, 32768, 131072],
                        help="cache lengths of the --decode rows")
    parser.add_argument("--decode-batch", type=int, default=8, help="batch of the --decode rows")
    bench_model.add_arguments(parser)
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("xattn bench compares xattn with PyTorch's attention and needs torch: "
              "pip install 'xattn[torch]' (a CUDA build of torch, and a CuPy extra: "
              "'xattn[cuda12]' or 'xattn[cuda13]')", file=sys.stderr)
        return 2
    if args.model:  # the CPU is allowed here (--model-size tiny), so before the GPU check
        return bench_model.main(args)

    if not torch.cuda.is_available():
        print("xattn bench needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    timer = _timer()
    device = torch.cuda.get_device_name()
    if args.overhead:
        return _main_overhead(args, device)
    if args.decode:
        return _main_decode(args, in_turns, device)
    if args.variants:
        return _main_variants(args, timer, device)
    if args.bwd:
        return _main_bwd(args, in_turns, device)
    print(f"# {device}, torch {torch.__version__}, forward TFLOP/s (median of {TURNS} launches "
          f"each, the implementations taken in turns)")
    print(HEADER)
    rows = run_forward(args, in_turns)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    (args.out / "bench.json").write_text(json.dumps({"meta": meta, "forward": rows}, indent=1))
    plotted = _plot(rows, args.out / "bench.png")
    print(f"# wrote {args.out / 'bench.json'}" + (f" and {args.out / 'bench.png'}" if plotted else
                                                  " (no matplotlib: no plot)"))
    return 0


def _main_bwd(args, timer, device) -> int:
    import torch

    print(f"# {device}, torch {torch.__version__}, backward ({BWD_FLOPS_FACTOR}x forward FLOPs) "
          f"and forward+backward TFLOP/s (median of {TURNS} launches each, the implementations "
          f"taken in turns)")
    print(BWD_HEADER)
    rows = run_backward(args, timer)
    memory = run_memory(args)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    (args.out / "bench_bwd.json").write_text(
        json.dumps({"meta": meta, "backward": rows, "memory": memory}, indent=1))
    plotted = _plot(rows, args.out / "bench_bwd.png")  # backward TFLOP/s per shape group
    print(f"# wrote {args.out / 'bench_bwd.json'}" + (f" and {args.out / 'bench_bwd.png'}"
                                                      if plotted else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
