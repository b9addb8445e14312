"""One GPU round for the sm90 backward (kernels_cuda/sm90/flash_bwd.cu, xattn/sm90.py), by phase:

  compile   every backward row (fp16/bf16, causal or not, the modifiers a row serves): registers
            and local memory through CuPy, and the SASS of an NVRTC cubin (HGMMA, RED, LDL/STL)
  check     xattn.cuda.backward against float64 autograd of exact attention (kernel_check_bwd's
            oracle and bounds) on awkward shapes: S = 1, 63, 64, 65, 127, 128, 129, 1000,
            Sq != Sk both ways, GQA 2:1, 3:1, 8:1, strided views in both layouts, head dims
            between rows, windows, softcap, ALiBi; each case asserts which kernel served it (sm90,
            or mma.sync where supports_backward declines); gradients NaN-poisoned; two runs: dK
            and dV bitwise equal, dQ (float32 reductions in any order) within rounding; and every
            sm90 backward variant the device's NVRTC compiled has no more local memory (spills) than its
            row allows (sm90.BwdRow.local_bytes: 8 bytes in the causal D64 row, 0 elsewhere)
  varlen    the same for packed batches (cu_seqlens): sequences of 0, 1, block +- 1 rows, Sq != Sk
            per sequence, GQA, causal, windows, softcap, per-sequence ALiBi; D64 expected on mma.sync
  bench     backward TFLOP/s (2.5 x the forward's 4 B H S^2 D, halved causal) of the sm90 kernel,
            the mma.sync kernels (SM90_BACKWARD off), SDPA flash and cuDNN, median of 50 launches taken in turns (xattn.bench.in_turns)
            rounds: bf16, D 64/128, causal or not, B S = 16384, H D = 2048; at D128 also the sm90
            kernel with the other dQ path (red.global from registers) and without dQ reductions; at D64
            and D128 the sm90 kernel with the other S^T timing (EARLY_SCORES flipped)
--dq red: every backward row takes the register-reduction dQ path (DQ_TMA = 0) for the phase.
A benchmark, not a test. Each phase prints one line per item and a SUMMARY line last.

    PYTHONPATH=. python ci/sm90_bwd_check.py --phase check [--quick | --sanitize]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_check_bwd import TOLERANCE, exact_out  # noqa: E402  (the float64 oracle and bounds)
from sm90_fwd_check import fair_tflops, make  # noqa: E402  (TMA-addressable strided views; timing)
import sass  # noqa: E402  (SASS counts of a compiled variant)

from xattn import cuda, jit, kernels, launch, sm90  # noqa: E402

BACKWARD = kernels.cuda("flash_bwd_sm90")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- compile -------------------------------------------------------------------------------------

def sass_counts(defines: dict) -> str:
    return sass.sass_counts(BACKWARD.source, defines, ("HGMMA", "RED"))


def phase_compile(args) -> int:
    bad = 0
    plain = {"IS_CAUSAL": 0, "IS_LOCAL": 0, "HAS_SOFTCAP": 0, "HAS_ALIBI": 0}
    for row in sm90.BWD_ROWS:
        for dtype in DTYPES:
            flag_sets = [{}] + ([{"IS_LOCAL": 1}, {"HAS_SOFTCAP": 1}, {"HAS_ALIBI": 1}]
                                if dtype == "bfloat16" and row.modifiers else [])
            for flags in flag_sets:
                d = BACKWARD.defines(row, dtype, flags=plain | {"IS_CAUSAL": int(row.causal)} | flags)
                t0 = time.perf_counter()
                try:
                    k = BACKWARD.compile(d, 0)
                    info = f"regs {k.num_regs} local {k.local_size_bytes}"
                    bad += k.local_size_bytes > row.local_bytes
                except Exception as exc:
                    info, bad = f"FAILED {type(exc).__name__}: {str(exc)[:400]}", bad + 1
                sass = sass_counts(d) if not flags and dtype == "bfloat16" else ""
                print(f"compile bwd D{row.head_dim} {'causal' if row.causal else 'full'} M{row.block_m} "
                      f"{dtype} {flags or ''}: {info} {time.perf_counter() - t0:.2f}s {sass}", flush=True)
    print(f"SUMMARY compile: {bad} bad variants", flush=True)
    return int(bad > 0)


# ---- check ---------------------------------------------------------------------------------------

def run_case(dtype, b, hq, hk, sq, sk, d, causal, layout, strided, variant, gen, deterministic=False):
    variant = dict(variant or {})
    if variant.get("alibi_slopes") == "per_head":
        variant["alibi_slopes"] = torch.rand(hq, device="cuda", generator=gen)
    elif variant.get("alibi_slopes") == "per_batch_head":
        variant["alibi_slopes"] = torch.rand(b, hq, device="cuda", generator=gen)
    q = make((b, hq, sq, d), dtype, layout, strided, gen)
    k = make((b, hk, sk, d), dtype, layout, strided, gen)
    v = make((b, hk, sk, d), dtype, layout, strided, gen)
    dout = make((b, hq, sq, d), dtype, layout, strided, gen)
    scale = 1 / math.sqrt(d)
    stream = torch.cuda.current_stream().cuda_stream
    out, lse = torch.empty_like(q), torch.empty(b, hq, sq, device="cuda")
    cuda.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream, **variant)
    runs, planned = [], []
    for _ in range(2):
        grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
        launch._plans.clear()
        cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=scale,
                      deterministic=deterministic, stream=stream, **variant)
        torch.cuda.synchronize()
        planned.append(cuda.sm90_backward_planned())
        runs.append(grads)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = torch.autograd.grad(exact_out(q64, k64, v64, causal, scale, **variant), (q64, k64, v64), dout.double())
    return (*judge(runs, ref, dtype, deterministic), planned[0])


def judge(runs, ref, dtype, deterministic):
    """(worst relative error, dQ's relative move between the two runs, problems) of two runs'
    (dq, dk, dv) against the float64 gradients `ref`: no NaN left, errors within TOLERANCE, dK and
    dV bitwise equal (each CTA owns its keys), dQ equal under deterministic=True and otherwise
    within what the order of float32 reductions explains."""
    problems, worst = [], 0.0
    for name, got, want in zip(("dq", "dk", "dv"), runs[0], ref):
        if got.isnan().any():
            problems.append(f"{name}: NaN left (unwritten or produced)")
            continue
        denom = want.norm().item()
        err = (got.double() - want).norm().item() / (denom if denom > 0 else 1)
        worst = max(worst, err)
        if err > TOLERANCE[dtype]:
            problems.append(f"{name} rel err {err:.2e}")
    for name, a, c in zip(("dk", "dv"), runs[0][1:], runs[1][1:]):
        if not torch.equal(a, c):
            problems.append(f"{name}: two runs differ (dK, dV are deterministic)")
    dq_a, dq_b = runs[0][0].double(), runs[1][0].double()
    dq_moved = (dq_a - dq_b).norm().item() / max(dq_a.norm().item(), 1e-30)
    if deterministic and dq_moved:
        problems.append(f"dq moved {dq_moved:.1e} between runs of deterministic=True")
    if dq_moved > TOLERANCE[dtype] / 10:
        problems.append(f"dq moved {dq_moved:.1e} between runs (more than reduction order explains)")
    return worst, dq_moved, problems


def check_cases(quick: bool):
    cases = []  # (dtype, b, hq, hk, sq, sk, d, causal, layout, strided, variant, sm90 expected)
    lengths = [1, 63, 64, 65, 127, 128, 129, 1000] if not quick else [1, 65, 129]
    for i, s in enumerate(lengths):
        for d in (64, 128, 256):
            for causal in (False, True):
                dt = ("bfloat16", "float16")[(i + d // 64) % 2]
                cases.append((dt, 2, 4, 2, s, s, d, causal, "bhsd", False, None, True))
    for sq, sk in [(1, 1000), (1000, 1), (129, 1000), (1000, 129), (65, 300), (300, 65)]:
        for d in (64, 128, 256):
            for causal in (False, True):
                cases.append(("bfloat16", 1, 8, 1, sq, sk, d, causal, "bhsd", False, None, True))
    for d in (8, 32, 40, 72, 96, 120, 136, 192, 248):  # between rows: the copy engine pads
        cases.append(("float16", 2, 6, 2, 200, 333, d, d % 16 == 0, "bhsd", False, None, True))
    for layout in ("bhsd", "bshd"):
        for d in (64, 128, 256):
            for causal in (False, True):
                cases.append(("bfloat16", 2, 6, 2, 257, 300, d, causal, layout, True, None, True))
    variants = [dict(window=(100, 0)), dict(window=(50, 30)), dict(window=(-1, 20)), dict(window=(70, -1)),
                dict(softcap=30.0), dict(alibi_slopes="per_head"), dict(alibi_slopes="per_batch_head")]
    for variant in variants:
        for causal in (False, True):
            for d in (128, 256):
                cases.append(("bfloat16", 2, 4, 2, 333, 517, d, causal, "bhsd", False, variant, True))
        # D64 rows serve no window, softcap or ALiBi; causal + (-1, 20) is plain causal once folded
        cases.append(("bfloat16", 2, 4, 2, 333, 517, 64, True, "bhsd", False, variant,
                      variant == dict(window=(-1, 20))))
    if not quick:
        cases.append(("float16", 1, 32, 4, 4096, 4096, 128, True, "bhsd", False, None, True))
        cases.append(("bfloat16", 2, 16, 16, 2048, 2048, 64, False, "bshd", False, None, True))
        cases.append(("bfloat16", 1, 8, 2, 2048, 2048, 256, True, "bshd", False, None, True))
    return cases


def run_varlen_case(dtype, hq, hk, lens_q, lens_k, d, causal, variant, gen, deterministic=False):
    """A packed batch ((1, H, T, D) views, cu_seqlens): gradients against float64 autograd of each
    sequence on its own, NaN-poisoned, two runs as run_case."""
    variant = dict(variant or {})
    batch = len(lens_q)
    if variant.get("alibi_slopes") == "per_batch_head":
        variant["alibi_slopes"] = torch.rand(batch, hq, device="cuda", generator=gen)
    cu_q, cu_k = (torch.tensor([sum(lens[:i]) for i in range(batch + 1)], dtype=torch.int32, device="cuda")
                  for lens in (lens_q, lens_k))
    tq, tk = sum(lens_q), sum(lens_k)
    q, dout = (torch.randn(1, hq, tq, d, generator=gen, device="cuda").to(dtype) for _ in range(2))
    k, v = (torch.randn(1, hk, tk, d, generator=gen, device="cuda").to(dtype) for _ in range(2))
    scale = 1 / math.sqrt(d)
    packed = dict(cu_seqlens=(cu_q, cu_k), max_seqlen=(max(lens_q), max(lens_k)))
    stream = torch.cuda.current_stream().cuda_stream
    out, lse = torch.empty_like(q), torch.empty(1, hq, tq, device="cuda")
    cuda.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream, **variant, **packed)
    runs, planned = [], []
    for _ in range(2):
        grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
        launch._plans.clear()
        cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=scale, deterministic=deterministic,
                      stream=stream, **variant, **packed)
        torch.cuda.synchronize()
        planned.append(cuda.sm90_backward_planned())
        runs.append(grads)
    ref = [torch.zeros_like(x, dtype=torch.float64) for x in (q, k, v)]
    for b in range(batch):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        q64, k64, v64 = (x[:, :, r].double().requires_grad_() for x, r in ((q, rq), (k, rk), (v, rk)))
        seq_variant = dict(variant)
        if "alibi_slopes" in seq_variant:
            seq_variant["alibi_slopes"] = variant["alibi_slopes"][b:b + 1]
        o = exact_out(q64, k64, v64, causal, scale, **seq_variant)
        for full, grad, r in zip(ref, torch.autograd.grad(o, (q64, k64, v64), dout[:, :, rq].double()),
                                 (rq, rk, rk)):
            full[:, :, r] = grad
    return (*judge(runs, ref, dtype, deterministic), planned[0])


def varlen_cases(quick: bool):
    """(dtype, hq, hk, lens_q, lens_k, d, causal, variant, sm90 expected)"""
    same = [1, 63, 64, 65, 300, 0, 129]
    cases = []
    for i, d in enumerate((128, 256)):
        for causal in (False, True):
            dt = ("bfloat16", "float16")[(i + causal) % 2]
            cases.append((dt, 4, 2, same, same, d, causal, None, True))
            cases.append((dt, 3, 1, [100, 7, 200], [50, 300, 129], d, causal, None, True))
    if not quick:
        for variant in (dict(window=(50, 30)), dict(softcap=30.0), dict(alibi_slopes="per_batch_head")):
            for d in (128, 256):
                cases.append(("bfloat16", 4, 2, [130, 65, 257], [200, 65, 100], d, True, variant, True))
        cases.append(("bfloat16", 8, 2, [2048, 1000, 3000], [2048, 1000, 3000], 128, True, None, True))
    cases.append(("bfloat16", 4, 2, same, same, 64, True, None, False))  # D64 packed: mma.sync
    return cases


def phase_varlen(args) -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = varlen_cases(args.quick)
    if args.sanitize:  # small packed batches per row: sequence ends inside tiles, an empty one
        cases = [("bfloat16", 2, 1, [65, 0, 130], [129, 1, 64], d, causal, None, True)
                 for d in (128, 256) for causal in (False, True)]
    failed = 0
    for dtype, hq, hk, lens_q, lens_k, d, causal, variant, expect_sm90 in cases:
        label = f"{dtype} H{hq}/{hk} q{lens_q} k{lens_k} D{d} {'causal' if causal else 'full'} {variant or ''}"
        print(f"... {label}", end="", flush=True)
        try:
            err, moved, problems, planned = run_varlen_case(DTYPES[dtype], hq, hk, lens_q, lens_k, d, causal,
                                                            variant, gen, args.deterministic)
            if planned != expect_sm90:
                problems.append(f"served by {'sm90' if planned else 'mma.sync'}, expected the other")
            info = f"  {'sm90' if planned else 'mma.sync'} err {err:.2e} dq-moved {moved:.1e}"
        except Exception as exc:
            info, problems = "", [f"{type(exc).__name__}: {str(exc)[:300]}"]
        failed += bool(problems)
        print(info, "FAIL " + "; ".join(problems) if problems else "ok", flush=True)
    print(f"SUMMARY varlen: {len(cases) - failed}/{len(cases)} cases passed", flush=True)
    return int(failed > 0)


def sanitize_cases():
    """Small shapes per row: a partial block on both axes, GQA 2:1, causal and not."""
    return [(dtype, 1, 2, 1, sq, sk, row.head_dim, row.causal, "bhsd", False, None, True)
            for row in sm90.BWD_ROWS for dtype, sq, sk in (("bfloat16", 65, 129), ("float16", 130, 200))]


def phase_check(args) -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = sanitize_cases() if args.sanitize else check_cases(args.quick)
    failed, worst, moved = 0, {}, 0.0
    for case in cases:
        dtype, b, hq, hk, sq, sk, d, causal, layout, strided, variant, expect_sm90 = case
        label = (f"{dtype} B{b} H{hq}/{hk} S{sq}x{sk} D{d} {'causal' if causal else 'full'} {layout}"
                 f"{' strided' if strided else ''} {variant or ''}")
        print(f"... {label}", end="", flush=True)
        try:
            err, dq_moved, problems, planned = run_case(DTYPES[dtype], b, hq, hk, sq, sk, d, causal, layout,
                                                        strided, variant, gen, args.deterministic)
            if planned != expect_sm90:
                problems.append(f"served by {'sm90' if planned else 'mma.sync'}, expected the other")
            worst[dtype] = max(worst.get(dtype, 0.0), err)
            moved = max(moved, dq_moved)
            info = f"  {'sm90' if planned else 'mma.sync'} err {err:.2e} dq-moved {dq_moved:.1e}"
        except Exception as exc:
            info, problems = "", [f"{type(exc).__name__}: {str(exc)[:300]}"]
        failed += bool(problems)
        print(info, "FAIL " + "; ".join(problems) if problems else "ok", flush=True)
    print(f"worst rel err {worst}, largest dQ move between two runs {moved:.1e}")
    # The sm90 backward variants this process compiled (the device's NVRTC): registers and local memory.
    for key, kernel in list(jit._modules.items()):
        if key[3] == BACKWARD.entry:
            defines = " ".join(o for o in key[2] if o.startswith("-D"))
            value = {o[2:].split("=")[0]: int(o.split("=")[1]) for o in key[2] if o.startswith("-D")}
            allowed = sm90.select_backward(value["HEAD_DIM"], bool(value["IS_CAUSAL"])).local_bytes
            print(f"compiled {defines}: regs {kernel.num_regs} local {kernel.local_size_bytes}")
            failed += kernel.local_size_bytes > allowed
    print(f"SUMMARY check[dq={args.dq}]: {len(cases) - failed}/{len(cases)} cases passed", flush=True)
    return int(failed > 0)


# ---- timing --------------------------------------------------------------------------------------

def bwd_tflops(b, h, s, d, causal, ms):
    return 2.5 * 4 * b * h * s * s * d / (2 if causal else 1) / ms / 1e9


def timers(q, k, v, dout, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = q.shape
    scale = 1 / math.sqrt(d)
    stream = torch.cuda.current_stream().cuda_stream
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    cuda.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream)
    grads = [torch.empty_like(x) for x in (q, k, v)]

    def ours(sm90_on, deterministic=False):
        def run():
            cuda.SM90_BACKWARD = sm90_on
            cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=scale,
                          deterministic=deterministic, stream=stream)
        return run

    def sdpa(backend):
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        return lambda: torch.autograd.grad(o, (qs, ks, vs), dout, retain_graph=True)

    def pinned(rows):
        # A plan of the sm90 kernel built with other rows, run on its own.
        launch._plans.clear()
        table, sm90.BWD_ROWS = sm90.BWD_ROWS, rows
        try:
            ours(True)()
        finally:
            sm90.BWD_ROWS = table
        steps, scratch = launch._plans.pop(next(key for key in launch._plans if key[0] == "bwd"))
        buffer = torch.empty(scratch.floats, device="cuda")  # held by the closure below
        ptrs = {"q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "o": out.data_ptr(),
                "dout": dout.data_ptr(), "lse": lse.data_ptr(), "dq": grads[0].data_ptr(),
                "dk": grads[1].data_ptr(), "dv": grads[2].data_ptr(), **scratch.pointers(buffer.data_ptr())}
        return lambda: (buffer, cuda._run(steps, ptrs, stream, q.device.index))

    timed = {"sm90": ours(True), "mma.sync": ours(False), "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
             "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
             # dK and dV by sm90 without dQ (COMPUTE_DQ = 0), dQ by flash_bwd_dq.cu
             "sm90-deterministic": ours(True, deterministic=True),
             "mma.sync-deterministic": ours(False, deterministic=True)}
    if d in (64, 128, 256):  # the other dQ path
        other = tuple(r._replace(dq_tma=not r.dq_tma) for r in sm90.BWD_ROWS)
        timed["sm90-other-dq"] = pinned(rows=other)
    if d in (64, 128):  # S^T issued early where the row does not (flash_bwd.cu's EARLY_SCORES), and late where it does
        timed["sm90-other-scores"] = pinned(rows=tuple(r._replace(early_scores=not r.early_scores)
                                                       for r in sm90.BWD_ROWS))
    return timed


def phase_bench(args) -> int:
    lengths = (4096, 8192) if args.quick else (2048, 4096, 8192, 16384)
    print(f"bench {time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name()}: backward TFLOP/s = 2.5 x 4 B H S^2 D "
          f"(halved causal) / time; xattn: delta + dK/dV/dQ kernel + dQ conversion; do_bench median, "
          f"median of 50 launches taken in turns; B S = 16384, H D = 2048, bf16")
    dq = {r.head_dim: "TMA reduce-add" if r.dq_tma else "red.global" for r in sm90.BWD_ROWS if not r.causal}
    print(f"sm90: dQ by {dq} (full rows); 'other dQ' = the sm90 kernel with the other dQ path")
    print("| D | causal | S | sm90 | mma.sync | sdpa-flash | cudnn | sm90/mma.sync | sm90/cudnn | "
          "sm90 other S^T timing | sm90 other dQ | deterministic: sm90 + flash_bwd_dq | deterministic: mma.sync |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in args.head_dims:
        for causal in (False, True):
            for s in lengths:
                b, h = 16384 // s, 2048 // d
                q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                launch._plans.clear()
                fns = timers(q, k, v, dout, causal)
                got = fair_tflops(fns, tuple(fns), lambda ms: bwd_tflops(b, h, s, d, causal, ms))
                cuda.SM90_BACKWARD = True
                extra = " | ".join(f"{got[n]:.0f}" if n in got else "-"
                                   for n in ("sm90-other-scores", "sm90-other-dq", "sm90-deterministic",
                                             "mma.sync-deterministic"))
                print(f"| {d} | {int(causal)} | {s} | {got['sm90']:.0f} | {got['mma.sync']:.0f} | "
                      f"{got['sdpa-flash']:.0f} | {got['cudnn']:.0f} | {got['sm90'] / got['mma.sync']:.2f} | "
                      f"{got['sm90'] / got['cudnn']:.2f} | {extra} |", flush=True)
                del q, k, v, dout, fns
    print("SUMMARY bench: done")
    return 0


def phase_varlen_bench(args) -> int:
    """Packed batches of 8 sequences (lengths 0.5x-1.5x of S, 8 S tokens in all), bf16, H D = 2048,
    causal and not: the sm90 backward against the mma.sync kernels (SM90_BACKWARD off)."""
    print(f"varlen bench {time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name()}: backward TFLOP/s of the packed "
          "batch's own work (2.5 x 4 H D sum S_b^2, halved causal), median of 50 launches taken in turns, bf16")
    print("| D | causal | S | sm90 packed | mma.sync packed | sm90/mma.sync |")
    print("|---|---|---|---|---|---|")
    for d in args.head_dims:
        for causal in (False, True):
            for s in (1024, 4096):
                lens = [s * f // 8 for f in (4, 12, 6, 10, 8, 5, 11, 8)]  # sums to 8 s
                h, total = 2048 // d, sum(lens)
                cu = torch.tensor([sum(lens[:i]) for i in range(len(lens) + 1)], dtype=torch.int32, device="cuda")
                q, k, v, dout = (torch.randn(1, h, total, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                packed = dict(cu_seqlens=(cu, cu), max_seqlen=(max(lens), max(lens)))
                scale, stream = 1 / math.sqrt(d), torch.cuda.current_stream().cuda_stream
                out, lse = torch.empty_like(q), torch.empty(1, h, total, device="cuda")
                cuda.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream, **packed)
                grads = [torch.empty_like(x) for x in (q, k, v)]

                def ours(sm90_on):
                    def run():
                        cuda.SM90_BACKWARD = sm90_on
                        cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=scale,
                                      deterministic=False, stream=stream, **packed)
                    return run
                launch._plans.clear()
                fns = {"sm90": ours(True), "mma.sync": ours(False)}
                flops = 2.5 * 4 * h * d * sum(n * n for n in lens) / (2 if causal else 1)
                got = fair_tflops(fns, tuple(fns), lambda ms: flops / ms / 1e9)
                cuda.SM90_BACKWARD = True
                print(f"| {d} | {int(causal)} | {s} | {got['sm90']:.0f} | {got['mma.sync']:.0f} | "
                      f"{got['sm90'] / got['mma.sync']:.2f} |", flush=True)
    print("SUMMARY varlen bench: done")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", required=True, choices=["compile", "check", "varlen", "bench", "varlen_bench"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sanitize", action="store_true", help="check, varlen: small shapes for compute-sanitizer")
    parser.add_argument("--deterministic", action="store_true",
                        help="check: deterministic=True (the kernel's dK/dV, flash_bwd_dq.cu's dQ)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="bench: head dims")
    parser.add_argument("--dq", choices=["table", "red"], default="table",
                        help="red: every row reduces dQ from registers (DQ_TMA = 0)")
    args = parser.parse_args()
    if args.dq == "red":
        sm90.BWD_ROWS = tuple(r._replace(dq_tma=False) for r in sm90.BWD_ROWS)
    return {"compile": phase_compile, "check": phase_check, "varlen": phase_varlen,
            "bench": phase_bench, "varlen_bench": phase_varlen_bench}[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
