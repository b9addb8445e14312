"""One GPU round for the sm90 forward (kernels_cuda/sm90/flash_fwd.cu, xattn/sm90.py), by phase:

  compile   every row (fp16/bf16, causal or not, the modifier flags): registers and local memory
            through CuPy, and the SASS of an NVRTC cubin (HGMMA count, LDL/STL count)
  check     xattn.sm90.forward against float64 exact attention on awkward shapes: S = 1, 63, 65,
            127, 129, 1000, Sq != Sk both ways, GQA 4:1, strided views (both layouts), head dims
            between rows, windows, softcap, ALiBi, more query blocks than SMs, and small shapes
            on a persistent grid of 3 CTAs; NaN-poisoned outputs, two runs bitwise equal
  host      host cost of a tensor map: encode vs re-point (xattn/tma.py)
  tune      candidate rows (tile, stages, overlaps) at S = 8192, bf16
  rows      the table's row against a few candidates and cuDNN timed in turns
  bench     TFLOP/s side by side with the same rows without the persistent grid (sm90-flat), SDPA
            flash and cuDNN: bf16/fp16, D 64/128/256, causal or not, S 1024..16384, B*S = 16384,
            H*D = 2048 (--seqlens, --head-dims: fewer)
A benchmark, not a test. Each phase prints one line per item and a summary line last.

    PYTHONPATH=. python ci/sm90_fwd_check.py --phase check [--variant simple|overlap|pingpong] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_check import compare, exact  # noqa: E402  (the float64 oracle on the GPU, and the verdict)
import sass  # noqa: E402  (SASS counts of a compiled variant)

from xattn import cuda, kernels, launch, sm90, tma  # noqa: E402
from xattn.bench import TURNS, in_turns  # noqa: E402

FORWARD = kernels.cuda("flash_fwd_sm90")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
VARIANTS = {"simple": dict(overlap=0, pingpong=0), "overlap": dict(overlap=1, pingpong=0),
            "pingpong": dict(overlap=1, pingpong=1), "flat": dict(persistent=0)}


def use_variant(name: str) -> None:
    sm90.ROWS = tuple(r._replace(**VARIANTS[name]) for r in sm90.ROWS)


# ---- compile -------------------------------------------------------------------------------------

FLAG_SETS = [dict(), dict(local=True), dict(softcap=True), dict(alibi=True), dict(persistent=True)]


def sass_counts(defines: dict) -> str:
    return sass.sass_counts(FORWARD.source, defines, ("HGMMA",))


def phase_compile(args) -> int:
    bad = 0
    for row in sm90.ROWS:
        for dtype in DTYPES:
            for flags in (FLAG_SETS if dtype == "bfloat16" else FLAG_SETS[:1]):
                variants = sm90.forward_variants(row, dtype, {
                    "IS_CAUSAL": int(row.causal), "IS_LOCAL": int(flags.get("local", False)),
                    "HAS_SOFTCAP": int(flags.get("softcap", False)), "HAS_ALIBI": int(flags.get("alibi", False)),
                    "PERSISTENT": int(flags.get("persistent", row.persistent > 0))})
                t0 = time.perf_counter()
                try:  # the variant a call runs: the first without local memory (sm90.plan)
                    for d in variants:
                        k = FORWARD.compile(d, 0)
                        if not k.local_size_bytes:
                            break
                    fallback = {key: v for key, v in d.items() if variants[0].get(key) != v}
                    info = f"regs {k.num_regs} local {k.local_size_bytes}{f' fallback {fallback}' if fallback else ''}"
                    bad += k.local_size_bytes != 0 or bool(fallback and not flags)
                except Exception as exc:
                    info, bad = f"FAILED {type(exc).__name__}: {str(exc)[:400]}", bad + 1
                dt = time.perf_counter() - t0
                sass = sass_counts(d) if not flags and dtype == "bfloat16" else ""
                print(f"compile D{row.head_dim} {'causal' if row.causal else 'full'} N{row.block_n} "
                      f"st{row.stages} {dtype} {flags or ''}: {info} {dt:.2f}s {sass}", flush=True)
    print(f"SUMMARY compile: {bad} bad variants", flush=True)
    return int(bad > 0)


# ---- check ------------------------------------------------------------------------------------------

def make(shape, dtype, layout, strided, gen):
    """A (B, H, S, D) view; strided: a slice of a larger tensor whose strides stay multiples of 16
    bytes (what the copy engine takes)."""
    b, h, s, d = shape
    ph, ps, pd = (1, 5, 8) if strided else (0, 0, 0)
    if layout == "bhsd":
        base = torch.randn(b, h + ph, s + ps, d + pd, generator=gen, device="cuda").to(dtype)
        return base[:, :h, :s, :d]
    base = torch.randn(b, s + ps, h + ph, d + pd, generator=gen, device="cuda").to(dtype)
    return base[:, :s, :h, :d].transpose(1, 2)


def run_case(dtype, b, hq, hk, sq, sk, d, causal, layout="bhsd", strided=False, variant=None, gen=None, ctas=None):
    variant = dict(variant or {})
    q = make((b, hq, sq, d), dtype, layout, strided, gen)
    k = make((b, hk, sk, d), dtype, layout, strided, gen)
    v = make((b, hk, sk, d), dtype, layout, strided, gen)
    scale = 1 / math.sqrt(d)
    if variant.get("alibi_slopes") == "per_head":
        variant["alibi_slopes"] = torch.rand(hq, device="cuda", generator=gen)
    elif variant.get("alibi_slopes") == "per_batch_head":
        variant["alibi_slopes"] = torch.rand(b, hq, device="cuda", generator=gen)
    if not sm90.supports(q, k, v, torch.empty_like(q), None, causal=causal, **variant):
        return None, ["supports() says no"]
    results = []
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        lse = torch.full((b, hq, sq), float("nan"), device="cuda")
        sm90.forward(q, k, v, out, lse, causal=causal, scale=scale,
                     stream=torch.cuda.current_stream().cuda_stream, ctas=ctas, **variant)
        torch.cuda.synchronize()
        results.append((out, lse))
    (out, lse), (out2, lse2) = results
    ref_out, ref_lse = exact(q, k, v, causal, scale, **variant)
    return compare(dtype, out, lse, out2, lse2, ref_out, ref_lse)


def check_cases(quick: bool):
    cases = []  # (dtype, b, hq, hk, sq, sk, d, causal, layout, strided, variant)
    lengths = [1, 63, 65, 127, 129, 1000] if not quick else [1, 65, 129]
    for i, s in enumerate(lengths):
        for d in (64, 128, 256):
            for causal in (False, True):
                dt = ("bfloat16", "float16")[(i + d // 64) % 2]
                cases.append((dt, 2, 4, 2, s, s, d, causal, "bhsd", False, None))
    for sq, sk in [(1, 1000), (1000, 1), (129, 1000), (1000, 129), (65, 300), (300, 65)]:
        for d in (64, 128, 256):
            for causal in (False, True):
                cases.append(("bfloat16", 1, 8, 2, sq, sk, d, causal, "bhsd", False, None))
    for d in (32, 40, 72, 80, 96, 120, 136, 200):  # between rows: the copy engine pads
        cases.append(("float16", 2, 4, 1, 200, 333, d, d % 16 == 0, "bhsd", False, None))
    for layout in ("bhsd", "bshd"):
        for d in (64, 128, 256):
            for causal in (False, True):
                cases.append(("bfloat16", 2, 8, 2, 257, 300, d, causal, layout, True, None))
    variants = [dict(window=(100, 0)), dict(window=(50, 30)), dict(window=(-1, 20)), dict(window=(70, -1)),
                dict(softcap=30.0), dict(alibi_slopes="per_head"), dict(alibi_slopes="per_batch_head")]
    for variant in variants:
        for d in (64, 128, 256):
            for causal in (False, True):
                cases.append(("bfloat16", 2, 4, 2, 333, 517, d, causal, "bhsd", False, variant))
    # Persistent grids: several query blocks per CTA (more blocks than SMs), among them blocks that
    # see no key (causal, Sq > Sk) between blocks that do, and windows.
    for d in (64, 128, 256):
        for causal in (False, True):
            cases.append(("bfloat16", 3, 16, 4, 1000, 1000, d, causal, "bhsd", False, None))
            cases.append(("float16", 4, 16, 16, 1000, 129, d, causal, "bhsd", False, None))
        cases.append(("bfloat16", 3, 16, 4, 700, 900, d, True, "bhsd", False, dict(window=(50, 30))))
    for row in sm90.ROWS:  # each row past a shorter sibling's lengths (select() sends shorter calls there)
        if first_query_length(row) > 1:
            cases.append(("float16", 1, 4, 2, first_query_length(row) + 51, 700, row.head_dim, row.causal, "bhsd",
                          False, None))
    if not quick:
        cases.append(("bfloat16", 65537, 1, 1, 3, 5, 64, False, "bhsd", False, None))  # gridDim.z chunks
        cases.append(("float16", 1, 32, 4, 4096, 4096, 128, True, "bhsd", False, None))
    return cases


def few_ctas_cases():
    """Small shapes on a persistent grid of 3 CTAs (sm90.forward's ctas): every CTA walks many
    query blocks, odd and even numbers of causal pairs, blocks without keys among them."""
    return [(dtype, 2, 3, 1, sq, sk, d, causal, "bhsd", False, None)
            for d, dtype in ((64, "bfloat16"), (128, "float16"), (256, "bfloat16"))
            for causal in (False, True) for sq, sk in ((300, 300), (500, 200))]


def first_query_length(row) -> int:
    """The shortest query length sm90.select gives this row: 1, or past its shorter siblings'."""
    return 1 + max((r.max_seqlen for r in sm90.ROWS if (r.head_dim, r.causal) == (row.head_dim, row.causal)
                    and r.max_seqlen and (not row.max_seqlen or r.max_seqlen < row.max_seqlen)), default=0)


def sanitize_cases():
    """One small shape per row and dtype: one key tile and one query row past the tiles (past the
    shorter sibling's lengths where the row has one); each on the row's grid and on a persistent
    grid of 2 CTAs (phase_check), which walk several blocks."""
    return [(dtype, 1, 2, 1, max(kernels.SM90_BLOCK_M + 1, first_query_length(row)), row.block_n + 1, row.head_dim,
             row.causal, "bhsd", False, None)
            for row in sm90.ROWS for dtype in DTYPES]


def phase_check(args) -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    use_tuned_rows()
    cases = sanitize_cases() if args.sanitize else check_cases(args.quick)
    few = sanitize_cases() if args.sanitize else few_ctas_cases()
    failed = 0
    for i, case in enumerate(cases + few):
        # the few-CTA cases on a persistent grid of a few CTAs, whatever the row says
        ctas = None if i < len(cases) else (2 if args.sanitize else 3)
        dtype, b, hq, hk, sq, sk, d, causal, layout, strided, variant = case
        label = (f"{dtype} B{b} H{hq}/{hk} S{sq}x{sk} D{d} {'causal' if causal else 'full'} {layout}"
                 f"{f' ctas{ctas}' if ctas else ''}"
                 f"{' strided' if strided else ''} {variant or ''}")
        print(f"... {label}", end="", flush=True)
        try:
            err, problems = run_case(DTYPES[dtype], b, hq, hk, sq, sk, d, causal, layout, strided, variant, gen, ctas)
        except Exception as exc:
            err, problems = None, [f"{type(exc).__name__}: {str(exc)[:300]}"]
        failed += bool(problems)
        print(f"  err {err:.2e}" if err is not None else "", "FAIL " + "; ".join(problems) if problems else "ok",
              flush=True)
    # A view the copy engine cannot address is refused (it stays on the mma.sync kernel).
    q = torch.randn(1, 2, 64, 72, device="cuda", dtype=torch.bfloat16)[..., 1:65]  # base 2 bytes off
    refused = not sm90.supports(q, q, q, q, None)
    failed += not refused
    print(f"unaligned view refused by supports(): {refused}")
    total = len(cases) + len(few) + 1
    print(f"SUMMARY check[{args.variant}]: {total - failed}/{total} cases passed", flush=True)
    return int(failed > 0)


# ---- host cost of tensor maps ------------------------------------------------------------------

def phase_host(args) -> int:
    q = torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    desc = launch.describe(q)
    n = 2000
    tmap = tma.plan_map(desc.ptr, desc.dtype, desc.shape, desc.strides, 128, desc.device)
    for name, step in (("encode", lambda: tma.plan_map(desc.ptr, desc.dtype, desc.shape, desc.strides, 128, desc.device)),
                       ("re-point", lambda: tma.repoint(tmap, desc.ptr))):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        print(f"host: tensor map {name}: {(time.perf_counter() - t0) / n * 1e6:.1f} us per map")
    out, lse = torch.empty_like(q), torch.empty(4, 16, 4096, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    sm90.forward(q, q, q, out, lse, causal=False, scale=0.1, stream=stream)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        sm90.forward(q[:, :, :1], q[:, :, :1], q[:, :, :1], out[:, :, :1], lse[:, :, :1], causal=False, scale=0.1,
                     stream=stream)
    torch.cuda.synchronize()
    print(f"host: sm90.forward call (S = 1, launch included): {(time.perf_counter() - t0) / 200 * 1e6:.1f} us")
    print("SUMMARY host: done")
    return 0


# ---- timing -----------------------------------------------------------------------------------------

def tflops(b, h, s, d, causal, ms):
    return 4 * b * h * s * s * d / (2 if causal else 1) / ms / 1e9


def timers(q, k, v, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = q.shape
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    scale = 1 / math.sqrt(d)

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    def flat():  # the table's rows without the persistent grid (one CTA per query block)
        rows = sm90.ROWS
        sm90.ROWS = tuple(r._replace(persistent=0) for r in rows)
        try:
            sm90.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream)
        finally:
            sm90.ROWS = rows

    return {"sm90": lambda: sm90.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream),
            "sm90-flat": flat,
            "mma.sync": lambda: cuda.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream),
            "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}


def measure(fn):
    from triton.testing import do_bench

    try:
        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as exc:
        print(f"    ({type(exc).__name__}: {str(exc)[:200]})")
        return float("nan")


TUNED = "tuned_rows.json"  # the tune phase's best rows, in $OUT: the bench phase runs them


def phase_tune(args) -> int:
    """Each candidate tile of a row (block_n, stages, overlaps, persistent grid or not) timed alone
    at each of --seqlens (default 8192) for --head-dims; writes the best per row at the last length."""
    import json

    P, O, S = dict(overlap=1, pingpong=1), dict(overlap=1, pingpong=0), dict(overlap=0, pingpong=0)
    candidates = {  # (head dim, causal): [(block_n, stages, overlaps)]
        (64, False): [(192, 2, O), (192, 2, P), (224, 2, O), (224, 2, P), (192, 3, O), (128, 2, S), (128, 2, P)],
        (64, True): [(128, 2, S), (128, 2, P), (192, 2, P), (224, 2, P), (192, 3, O)],
        (128, False): [(176, 2, P), (128, 2, O), (128, 2, P), (144, 2, P)],
        (128, True): [(176, 2, P), (128, 2, O), (144, 2, P)],
        (256, False): [(80, 2, O), (80, 2, P)], (256, True): [(80, 2, P), (80, 2, O)]}
    base, best_rows = sm90.ROWS, []
    for (d, causal), tiles in candidates.items():
        if d not in args.head_dims:
            continue
        for s in args.seqlens or [8192]:
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            results = []
            for block_n, stages, overlaps in tiles:
                for persistent in (0, 1):
                    row = sm90.Row(d, causal, block_n, stages, **overlaps, persistent=persistent)
                    if FORWARD.shared_memory(FORWARD.defines(row, "bfloat16", flags={})) > sm90.SMEM_LIMIT:
                        continue
                    sm90.ROWS = (row,)
                    results.append((tflops(b, h, s, d, causal, measure(timers(q, k, v, causal)["sm90"])), row))
                    print(f"tune S={s} {row}: {results[-1][0]:.1f} TFLOP/s", flush=True)
            best = max(results, key=lambda r: r[0] if r[0] == r[0] else -1)
            print(f"TUNE BEST S={s} {best[1]}: {best[0]:.1f}", flush=True)
            del q, k, v
        best_rows.append(best[1])
    sm90.ROWS = base
    Path(os.environ.get("OUT", "."), TUNED).write_text(json.dumps([r._asdict() for r in best_rows]))
    print("SUMMARY tune: done")
    return 0


def use_tuned_rows() -> None:
    import json

    path = Path(os.environ.get("OUT", "."), TUNED)
    if path.exists():
        sm90.ROWS = tuple(sm90.Row(**r) for r in json.loads(path.read_text()))
        print(f"rows from {path}: {sm90.ROWS}")


def fair_tflops(fns: dict, names, to_tflops) -> dict:
    """TFLOP/s per implementation, their launches taken in turns (xattn.bench.in_turns)."""
    ms = in_turns({name: fns[name] for name in names})
    return {name: to_tflops(t) for name, t in ms.items()}


def phase_bench(args) -> int:
    use_tuned_rows()
    lines = []
    dtypes = ("bfloat16", "float16") if not args.quick else ("bfloat16",)
    lengths = args.seqlens or ((1024, 2048, 4096, 8192, 16384) if not args.quick else (2048, 8192))
    print(f"bench {time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name()}: TFLOP/s = 4 B H S^2 D (halved "
          f"causal) / time; median of {TURNS} launches taken in turns (L2 flushed); B S = 16384, H D = 2048; "
          "sm90-flat: the same rows without the persistent grid")
    print("| dtype | D | causal | S | sm90 | sm90-flat | sdpa-flash | cudnn | sm90/cudnn | flat/cudnn | sm90 % of 790 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for d in args.head_dims:
            for causal in (False, True):
                for s in lengths:
                    b, h = 16384 // s, 2048 // d
                    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=DTYPES[dtype]) for _ in range(3))
                    got = fair_tflops(timers(q, k, v, causal), ("sm90", "sm90-flat", "sdpa-flash", "cudnn"),
                                      lambda ms: tflops(b, h, s, d, causal, ms))
                    line = (f"| {dtype} | {d} | {int(causal)} | {s} | {got['sm90']:.0f} | {got['sm90-flat']:.0f} | "
                            f"{got['sdpa-flash']:.0f} | {got['cudnn']:.0f} | {got['sm90'] / got['cudnn']:.2f} | "
                            f"{got['sm90-flat'] / got['cudnn']:.2f} | {100 * got['sm90'] / 790:.0f}% |")
                    print(line, flush=True)
                    lines.append(line)
                    del q, k, v
    print("SUMMARY bench: done")
    return 0


# rows: the classes timed, each with candidate tiles (block_n, overlap, pingpong, persistent) beside
# the table's row and, for an overlapped row, the same row with the other softmax placement
# (block_n, overlap, pingpong, persistent from S 1, softmax under P V[, K/V stages, default 2])
ROW_CANDIDATES = {(64, False): [(128, 1, 0, 1, True), (128, 1, 1, 1, True), (192, 1, 0, 1, True),
                                (176, 1, 0, 1, True), (192, 0, 0, 1, False), (160, 0, 0, 1, False),
                                (128, 0, 0, 1, False, 3), (128, 0, 0, 1, False, 4)],
                  (64, True): [(128, 1, 0, 1, True), (128, 1, 1, 1, True), (192, 1, 0, 1, True)],
                  (128, False): [(128, 1, 1, 1, True), (128, 1, 1, 0, True), (176, 1, 1, 0, True),
                                 (176, 1, 1, 1, True), (128, 1, 0, 1, True, 3), (192, 1, 1, 1, True)],
                  (128, True): [(128, 1, 0, 1, True), (176, 1, 1, 1, True), (128, 1, 1, 0, True),
                                (128, 1, 1, 1, True, 3)],
                  (192, False): [], (192, True): [],
                  (256, False): [(80, 1, 1, 0, True), (80, 1, 0, 1, True), (80, 1, 1, 1, True)],
                  (256, True): [(80, 1, 1, 0, True), (80, 1, 0, 1, True), (80, 1, 0, 0, True)]}


def time_rows(rows: dict, d: int, causal: bool, s: int) -> dict:
    """TFLOP/s of each row (name -> sm90.Row) pinned as the table's only row, and of cuDNN
    ("cudnn"), timed in turns on one bf16 input of B S = 16384, H D = 2048."""
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    stream, scale, table = torch.cuda.current_stream().cuda_stream, 1 / math.sqrt(d), sm90.ROWS

    def pinned(row):
        def run():
            sm90.ROWS = (row,)
            try:
                sm90.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream)
            finally:
                sm90.ROWS = table
        return run
    fns = {name: pinned(row) for name, row in rows.items()}
    fns["cudnn"] = timers(q, k, v, causal)["cudnn"]
    return fair_tflops(fns, tuple(fns), lambda ms: tflops(b, h, s, d, causal, ms))


def phase_rows(args) -> int:
    """The table's row and each candidate of ROW_CANDIDATES pinned as the only row, with cuDNN, in
    turns (xattn.bench.in_turns) (bf16, B S = 16384, H D = 2048): which tile wins at which length."""
    lengths = args.seqlens or (1024, 2048, 4096, 8192)
    print(f"rows {time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name()}: TFLOP/s, median of {TURNS} launches "
          "taken in turns; candidates are block_n/overlap pingpong/persistent from S 1, u: softmax under P V, sN: N stages")
    for (d, causal), candidates in ROW_CANDIDATES.items():
        if d not in args.head_dims:
            continue
        for s in lengths:
            rows = {"table": sm90.select(d, causal, s)}
            for n, o, pp, pers, under, *stages in candidates:
                stages = stages[0] if stages else 2
                rows[f"{n}/{o}{pp}/{pers}{'u' if under else ''}{f's{stages}' if stages != 2 else ''}"] = sm90.Row(
                    d, causal, n, stages, overlap=o, pingpong=pp, persistent=pers, softmax_under_pv=under,
                    rescale_slack=rows["table"].rescale_slack)  # the candidates rescale as the table's row
            row = rows["table"]
            if row.overlap:  # the softmax under P V or not (the loop's wait after it: OVERLAP_WAIT_LATE)
                rows["table, softmax under P V" if not row.softmax_under_pv else "table, wait late"] = \
                    row._replace(softmax_under_pv=not row.softmax_under_pv)
            got = time_rows(rows, d, causal, s)
            cells = " ".join(f"{name} {got[name]:.0f} ({got[name] / got['cudnn']:.2f})" for name in rows)
            print(f"D{d} {'causal' if causal else 'full'} S{s}: {cells} cudnn {got['cudnn']:.0f}", flush=True)
    print(f"table rows: {[r for r in sm90.ROWS if r.head_dim in args.head_dims]}")
    print("SUMMARY rows: done")
    return 0


def phase_stages(args) -> int:
    """The table's row at each length against the same row with more K/V stages in flight (where
    they fit in shared memory), cuDNN among them, timed in turns (bf16, B S = 16384, H D = 2048)."""
    lengths = args.seqlens or (2048, 8192)
    print(f"stages {time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name()}: TFLOP/s (ratio to cuDNN), "
          f"median of {TURNS} launches taken in turns; sN: the table's row with N stages, 'again': the table's row a second time")
    for d in args.head_dims:
        for causal in (False, True):
            for s in lengths:
                row = sm90.select(d, causal, s)
                rows = {f"s{row.stages} (table)": row, "again": row}
                for stages in (3, 4):
                    more = row._replace(stages=stages)
                    if FORWARD.shared_memory(FORWARD.defines(more, "bfloat16", flags={})) <= sm90.SMEM_LIMIT:
                        rows[f"s{stages}"] = more
                got = time_rows(rows, d, causal, s)
                cells = " ".join(f"{n} {got[n]:.0f} ({got[n] / got['cudnn']:.3f})" for n in rows)
                print(f"D{d} {'causal' if causal else 'full'} S{s} {row}: {cells} cudnn {got['cudnn']:.0f}", flush=True)
    print("SUMMARY stages: done")
    return 0


def phase_bench_old(args) -> int:
    """Today's mma.sync kernel (xattn.cuda.forward) on a few rows, in a process of its own."""
    print("| dtype | D | causal | S | mma.sync |")
    for d in (64, 128, 256):
        for causal in (False, True):
            for s in (4096, 16384):
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                ms = measure(timers(q, k, v, causal)["mma.sync"])
                print(f"| bfloat16 | {d} | {int(causal)} | {s} | {tflops(b, h, s, d, causal, ms):.0f} |", flush=True)
    print("SUMMARY bench_old: done")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", required=True, choices=["compile", "check", "host", "tune", "bench", "bench_old", "rows", "stages"])
    parser.add_argument("--variant", default="table", choices=["table", *VARIANTS],
                        help="overlaps of every row: the table's, or one variant for all")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sanitize", action="store_true", help="check: one small shape per row (block + 1)")
    parser.add_argument("--seqlens", type=int, nargs="*", help="bench: these sequence lengths")
    parser.add_argument("--head-dims", type=int, nargs="*", default=[64, 128, 256], help="bench: these head dims")
    args = parser.parse_args()
    if args.variant != "table":
        use_variant(args.variant)
    return {"compile": phase_compile, "check": phase_check, "host": phase_host, "tune": phase_tune,
            "bench": phase_bench, "bench_old": phase_bench_old, "rows": phase_rows,
            "stages": phase_stages}[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
