"""Direct check of the CUDA forward kernels on a GPU, below the public API: xattn.cuda.forward on
torch tensors against exact attention in float64 (computed on the GPU), over a grid of awkward
shapes. Outputs are poisoned with NaN before each launch; each case runs twice and must be bitwise
identical. Prints one line per failure and a summary line; exit 1 on any failure.

    PYTHONPATH=. python ci/kernel_check.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

from xattn import cuda

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def exact(q, k, v, causal, scale):
    """float64 softmax(scale q k^T) v with bottom-right causal mask; empty rows give 0 and -inf."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = scale * q @ k.transpose(-1, -2)
    sq, sk = q.shape[2], k.shape[2]
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, -math.inf)
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


def run_case(dtype, batch, hq, hk, sq, sk, d, causal, layout, strided, gen):
    q = make((batch, hq, sq, d), dtype, layout, strided, gen)
    k = make((batch, hk, sk, d), dtype, layout, strided, gen)
    v = make((batch, hk, sk, d), dtype, layout, strided, gen)
    scale = 1 / math.sqrt(d)
    results = []
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        lse = torch.full((batch, hq, sq), float("nan"), device="cuda")
        cuda.forward(q, k, v, out, lse, causal=causal, scale=scale,
                     stream=torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        results.append((out, lse))
    (out, lse), (out2, lse2) = results
    ref_out, ref_lse = exact(q, k, v, causal, scale)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="every fifth case")
    parser.add_argument("--sanitize", action="store_true",
                        help="a small representative subset, for compute-sanitizer")
    args = parser.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    head_dims = [1, 7, 32, 63, 64, 80, 96, 128, 129, 200, 256]
    lengths = [(1, 1), (0, 5), (5, 0), (63, 65), (64, 64), (65, 200), (200, 129), (128, 128), (300, 77)]
    cases = list(itertools.product(dtypes, head_dims, lengths, [False, True]))
    if args.quick:
        cases = cases[::5]
    if args.sanitize:
        cases = cases[::41]
    failures = 0
    worst = {}
    for i, (dtype, d, (sq, sk), causal) in enumerate(cases):
        layout = "bhsd" if i % 2 else "bshd"
        strided = i % 3 == 0
        hq, hk = ((7, 1), (4, 2), (3, 3))[i % 3]
        err, problems = run_case(dtype, 2, hq, hk, sq, sk, d, causal, layout, strided, gen)
        key = str(dtype).removeprefix("torch.")
        worst[key] = max(worst.get(key, 0.0), err)
        if problems:
            failures += 1
            print(f"FAIL {key} D={d} Sq={sq} Sk={sk} causal={causal} {layout} strided={strided} "
                  f"H={hq}/{hk}: {'; '.join(problems)}")
    worst_text = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    print(f"kernel check: {len(cases) - failures}/{len(cases)} cases passed; worst rel err {worst_text}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
