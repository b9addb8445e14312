"""Direct check of the CUDA forward kernels on a GPU, below the public API: xattn.cuda.forward on
torch tensors against exact attention in float64 (computed on the GPU), over a grid of awkward
shapes. Outputs are poisoned with NaN before each launch; each case runs twice and must be bitwise
identical. Prints one line per failure and a summary line; exit 1 on any failure.

    PYTHONPATH=. python ci/kernel_check.py [--quick | --sanitize] [--cases grid,tuned,odd]

--cases picks the case lists (comma-separated): grid (the default, awkward shapes), tuned (every
table row this GPU selects, both causal values, at block + 1 lengths), odd (S = 1, block + 1,
D = 1, D = 200, GQA 7:1), variants (windows, softcap, ALiBi, and packed batches with empty
sequences, every dtype). ci/sanitize.sh runs tuned,odd,variants under compute-sanitizer.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

from xattn import configs, cuda

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def exact(q, k, v, causal, scale, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """float64 softmax(scale q k^T + modifiers) v with the bottom-right band mask (causal: right
    = 0); empty rows give 0 and -inf."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = scale * q @ k.transpose(-1, -2)
    sq, sk = q.shape[2], k.shape[2]
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    distance = j - (i + sk - sq)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().expand(q.shape[0], q.shape[1])
        s = s - slopes[:, :, None, None] * distance.abs()
    left, right = window[0], 0 if causal else window[1]
    if right >= 0:
        s = s.masked_fill(distance > right, -math.inf)
    if left >= 0:
        s = s.masked_fill(distance < -left, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p @ v, lse


def make(shape, dtype, layout, strided, gen):
    """A (B, H, S, D) view in the requested memory layout, optionally a slice of a larger tensor."""
    b, h, s, d = shape
    pad = 3 if strided else 0
    if layout == "bhsd":
        base = torch.randn(b, h + pad, s + pad, d + pad, generator=gen, device="cuda", dtype=torch.float32)
        x = base[:, :h, :s, :d] if strided else base
    else:
        base = torch.randn(b, s + pad, h + pad, d + pad, generator=gen, device="cuda", dtype=torch.float32)
        x = (base[:, :s, :h, :d] if strided else base).transpose(1, 2)
    return x.to(dtype) if not strided else _cast_view(x, dtype)


def _cast_view(x, dtype):
    # keep the strided view: cast the storage, then take the same view of it
    base = x._base if x._base is not None else x
    return torch.as_strided(base.to(dtype), x.shape, x.stride(), x.storage_offset())


def _bits(x):
    return x.contiguous().view(torch.uint8)


def run_case(dtype, batch, hq, hk, sq, sk, d, causal, layout, strided, gen, variant=None):
    """One launch pair; variant: window/softcap/alibi_slopes keyword arguments, or "varlen": the
    batch packed into one (1, H, B*S, D) tensor whose sequences get lengths 0..S (cu_seqlens)."""
    variant = dict(variant or {})
    varlen = variant.pop("varlen", False)
    q = make((batch, hq, sq, d), dtype, layout, strided, gen)
    k = make((batch, hk, sk, d), dtype, layout, strided, gen)
    v = make((batch, hk, sk, d), dtype, layout, strided, gen)
    scale = 1 / math.sqrt(d)
    if varlen:
        return run_varlen_case(q, k, v, causal, scale, gen, variant)
    if variant.get("alibi_slopes") == "per_head":
        variant["alibi_slopes"] = torch.rand(hq, device="cuda", generator=gen)
    elif variant.get("alibi_slopes") == "per_batch_head":
        variant["alibi_slopes"] = torch.rand(batch, hq, device="cuda", generator=gen)
    results = []
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        lse = torch.full((batch, hq, sq), float("nan"), device="cuda")
        cuda.forward(q, k, v, out, lse, causal=causal, scale=scale,
                     stream=torch.cuda.current_stream().cuda_stream, **variant)
        torch.cuda.synchronize()
        results.append((out, lse))
    (out, lse), (out2, lse2) = results
    ref_out, ref_lse = exact(q, k, v, causal, scale, **variant)
    return compare(dtype, out, lse, out2, lse2, ref_out, ref_lse)


def run_varlen_case(q, k, v, causal, scale, gen, variant):
    """The batch's sequences cut to random lengths (0 included) and packed back to back; each
    sequence is checked against exact attention on its own."""
    batch = q.shape[0]
    lengths_q = torch.randint(0, q.shape[2] + 1, (batch,), generator=gen, device="cuda").tolist()
    lengths_k = torch.randint(0, k.shape[2] + 1, (batch,), generator=gen, device="cuda").tolist()
    lengths_q[0], lengths_k[-1] = q.shape[2], 0  # the longest query sequence; one without keys
    pack = lambda x, lengths: torch.cat([x[b, :, :n] for b, n in enumerate(lengths)], dim=1)[None]
    pq, pk, pv = pack(q, lengths_q), pack(k, lengths_k), pack(v, lengths_k)
    cu = [torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device="cuda")
          for n in (lengths_q, lengths_k)]
    results = []
    for _ in range(2):
        out = torch.full_like(pq, float("nan"))
        lse = torch.full(pq.shape[:3], float("nan"), device="cuda")
        cuda.forward(pq, pk, pv, out, lse, causal=causal, scale=scale,
                     stream=torch.cuda.current_stream().cuda_stream, cu_seqlens=cu,
                     max_seqlen=(max(lengths_q), max(lengths_k)), **variant)
        torch.cuda.synchronize()
        results.append((out, lse))
    ref_out, ref_lse = torch.empty_like(pq, dtype=torch.float64), torch.empty(pq.shape[:3], dtype=torch.float64, device="cuda")
    for b in range(batch):
        qs = slice(int(cu[0][b]), int(cu[0][b + 1]))
        ks = slice(int(cu[1][b]), int(cu[1][b + 1]))
        ref_out[:, :, qs], ref_lse[:, :, qs] = exact(pq[:, :, qs], pk[:, :, ks], pv[:, :, ks], causal, scale, **variant)
    (out, lse), (out2, lse2) = results
    return compare(q.dtype, out, lse, out2, lse2, ref_out, ref_lse)


def compare(dtype, out, lse, out2, lse2, ref_out, ref_lse):
    problems = []
    if out.isnan().any() or lse.isnan().any():
        problems.append("NaN left in output (unwritten or NaN produced)")
    denom = ref_out.norm().item()
    err = (out.double() - ref_out).norm().item() / (denom if denom > 0 else 1)
    finite = torch.isfinite(ref_lse)
    if not torch.equal(torch.isfinite(lse), finite):
        problems.append("lse -inf pattern differs")
    lse_err = ((lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0)
    tol = TOLERANCE[dtype]
    if err > tol:
        problems.append(f"out rel err {err:.2e} > {tol}")
    if lse_err > tol * 4:
        problems.append(f"lse abs err {lse_err:.2e}")
    if not (torch.equal(_bits(out), _bits(out2)) and torch.equal(_bits(lse), _bits(lse2))):
        problems.append("two runs differ bitwise")
    return err, problems


def tuned_cases(kernels_and_dtypes, max_head_dim=configs.MAX_HEAD_DIM):
    """(dtype, D, (Sq, Sk), causal, (Hq, Hk)) for every table row this GPU selects, at lengths
    one past its tiles (a partial last block on both axes)."""
    arch = cuda._arch(torch.cuda.current_device())
    cases = []
    for kernel, dtypes in kernels_and_dtypes:
        head_dims = sorted({r.head_dim for r in configs.TABLE if r.kernel == kernel})
        rows = {configs.select(kernel, arch, d, c) for d in head_dims if d <= max_head_dim
                for c in (False, True)}
        for n, row in enumerate(sorted(rows)):
            for causal in ((False, True) if row.causal is None else (row.causal,)):
                cases.append((dtypes[n % len(dtypes)], row.head_dim,
                              (row.block_m + 1, row.block_n + 1), causal, (4, 2)))
    return cases


def odd_cases(dtypes):
    """S = 1, block + 1 (64 and 128 tiles), D = 1, D = 200, GQA 7:1."""
    shapes = [(64, (1, 1), (2, 1)), (1, (65, 65), (2, 2)), (200, (129, 129), (7, 1)),
              (128, (129, 65), (7, 1)), (64, (65, 1), (7, 1)), (7, (1, 200), (3, 3))]
    return [(dtypes[i % len(dtypes)], d, lengths, causal, heads)
            for i, (d, lengths, heads) in enumerate(shapes) for causal in (False, True)]


def variant_cases(dtypes):
    """Windows (left = 0, narrower and wider than a tile, asymmetric), softcap, ALiBi per head and
    per (batch, head), packed batches with and without a window; every dtype, tuned and padded
    head dims, block + 1 lengths."""
    variants = [dict(window=(0, 0)), dict(window=(0, -1)), dict(window=(37, 5)), dict(window=(200, 1000)),
                dict(window=(70, 0)), dict(softcap=5.0), dict(softcap=30.0, window=(90, -1)),
                dict(alibi_slopes="per_head"), dict(alibi_slopes="per_batch_head"),
                dict(varlen=True), dict(varlen=True, window=(50, 0)), dict(varlen=True, softcap=8.0)]
    shapes = [(64, (129, 129)), (128, (65, 200)), (96, (200, 65)), (256, (65, 129)), (40, (129, 257))]
    cases = []
    for i, variant in enumerate(variants):
        for j, (d, lengths) in enumerate(shapes):
            causal = (i + j) % 2 == 0 and variant.get("window", (0, 0))[1] <= 0
            cases.append((dtypes[(i + j) % len(dtypes)], d, lengths, causal, ((4, 2), (3, 1))[j % 2], variant))
    return cases


def select_cases(names, grid, tuned, odd, variants):
    chosen = []
    for name in names.split(","):
        if name not in ("grid", "tuned", "odd", "variants"):
            raise SystemExit(f"--cases: expected grid, tuned, odd or variants (comma-separated), got {name!r}")
        chosen += {"grid": grid, "tuned": tuned, "odd": odd, "variants": variants}[name]()
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="every fifth case")
    parser.add_argument("--sanitize", action="store_true",
                        help="a small representative subset, for compute-sanitizer")
    parser.add_argument("--cases", default="grid", help="grid, tuned, odd; comma-separated")
    args = parser.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    head_dims = [1, 7, 32, 63, 64, 80, 96, 128, 129, 200, 256]
    lengths = [(1, 1), (0, 5), (5, 0), (63, 65), (64, 64), (65, 200), (200, 129), (128, 128), (300, 77)]

    def grid():
        cases = [c + (None,) for c in itertools.product(dtypes, head_dims, lengths, [False, True])]
        if args.quick:
            cases = cases[::5]
        if args.sanitize:
            cases = cases[::41]
        return cases

    cases = select_cases(args.cases, grid, lambda: tuned_cases(
        [("flash_fwd", dtypes[:2]), ("flash_fwd_f32", dtypes[2:])]), lambda: odd_cases(dtypes),
        lambda: variant_cases(dtypes)[::5 if args.sanitize else 1])
    failures = 0
    worst = {}
    for i, (dtype, d, (sq, sk), causal, heads, *variant) in enumerate(cases):
        layout = "bhsd" if i % 2 else "bshd"
        strided = i % 3 == 0
        hq, hk = heads or ((7, 1), (4, 2), (3, 3))[i % 3]
        variant = variant[0] if variant else None
        err, problems = run_case(dtype, 3 if variant else 2, hq, hk, sq, sk, d, causal, layout,
                                 strided, gen, variant)
        key = str(dtype).removeprefix("torch.")
        worst[key] = max(worst.get(key, 0.0), err)
        if problems:
            failures += 1
            print(f"FAIL {key} D={d} Sq={sq} Sk={sk} causal={causal} {layout} strided={strided} "
                  f"H={hq}/{hk} {variant or ''}: {'; '.join(problems)}")
    worst_text = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    print(f"kernel check: {len(cases) - failures}/{len(cases)} cases passed; worst rel err {worst_text}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
