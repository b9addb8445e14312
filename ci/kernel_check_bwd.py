"""Direct check of the CUDA backward kernels on a GPU, below the public API: xattn.cuda.backward on
torch tensors against float64 autograd of exact attention, over awkward shapes. Gradients are
poisoned with NaN before each launch; deterministic mode, and the CUDA-core kernels
(flash_bwd_simt.cu: float32, and fp16/bf16 at head dims past the tensor-core rows) always, must
repeat bitwise. Prints failures and a summary line per kernel path; exit 1 on any failure.

    PYTHONPATH=. python ci/kernel_check_bwd.py [--quick | --sanitize] [--simt] [--cases grid,tuned,odd,variants]

--cases as in kernel_check.py; tuned runs the dK/dV rows with dQ atomics and the dQ rows
deterministic; variants: kernel_check.py's windows, softcap and ALiBi (its packed batches are
checked through autograd by tests/test_variants_grad.py).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

from xattn import cuda

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_check import _bits, make, odd_cases, select_cases, tuned_cases, variant_cases  # noqa: E402

# float32 runs in exact float32 arithmetic (flash_bwd_simt.cu); its rounding error grows like
# 2^-24 times the score magnitude (P = exp(S - LSE), with S and the LSE in float32, |S| ~ 10 here)
# plus ~sqrt(length) roundings per dot product: ~1e-6 measured in a CPU emulation of the kernel.
# 1e-4 leaves room for ex2.approx (2^-22 relative) and for the cancellation in dS = P (dP - delta),
# and still fails any indexing, masking or scaling bug by orders of magnitude.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def exact_out(q, k, v, causal, scale, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """float64 attention output, differentiable everywhere: rows that see no key give 0 (their
    scores are zeroed before the softmax so that its backward stays finite, then P is zeroed)."""
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
        s = s - alibi_slopes.double().expand(q.shape[:2])[:, :, None, None] * distance.abs()
    left, right = window[0], 0 if causal else window[1]
    hidden = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if right >= 0:
        hidden |= distance > right
    if left >= 0:
        hidden |= distance < -left
    empty = hidden.all(-1, keepdim=True)
    s = s.masked_fill(hidden & ~empty, -math.inf).masked_fill(empty, 0.0)
    return torch.softmax(s, dim=-1).masked_fill(empty, 0.0) @ v


def on_cuda_cores(dtype, d, causal) -> bool:
    """Whether xattn.cuda.backward runs this call on flash_bwd_simt.cu (no atomics: bitwise repeatable)."""
    major, minor = torch.cuda.get_device_capability()
    return cuda._backward_on_cuda_cores(str(dtype).removeprefix("torch."), major * 10 + minor, d, causal)


def run_case(dtype, batch, hq, hk, sq, sk, d, causal, layout, strided, deterministic, gen,
             variant=None):
    variant = dict(variant or {})
    if variant.get("alibi_slopes") == "per_head":
        variant["alibi_slopes"] = torch.rand(hq, device="cuda", generator=gen)
    elif variant.get("alibi_slopes") == "per_batch_head":
        variant["alibi_slopes"] = torch.rand(batch, hq, device="cuda", generator=gen)
    q = make((batch, hq, sq, d), dtype, layout, strided, gen)
    k = make((batch, hk, sk, d), dtype, layout, strided, gen)
    v = make((batch, hk, sk, d), dtype, layout, strided, gen)
    dout = make((batch, hq, sq, d), dtype, layout, strided, gen)
    scale = 1 / math.sqrt(d)
    stream = torch.cuda.current_stream().cuda_stream
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, sq, device="cuda")
    cuda.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream, **variant)
    runs = []
    for _ in range(2):
        grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
        cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=scale,
                      deterministic=deterministic, stream=stream, **variant)
        torch.cuda.synchronize()
        runs.append(grads)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref_out = exact_out(q64, k64, v64, causal, scale, **variant)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    problems = []
    worst = 0.0
    for name, got, ref in zip(("dq", "dk", "dv"), runs[0], ref_grads):
        if got.isnan().any():
            problems.append(f"{name}: NaN left (unwritten or produced)")
            continue
        denom = ref.norm().item()
        err = (got.double() - ref).norm().item() / (denom if denom > 0 else 1)
        worst = max(worst, err)
        if err > TOLERANCE[dtype]:
            problems.append(f"{name} rel err {err:.2e}")
    repeatable = deterministic or on_cuda_cores(dtype, d, causal)
    if repeatable and not all(torch.equal(_bits(a), _bits(b)) for a, b in zip(*runs)):
        problems.append("repeated runs differ bitwise")
    return worst, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sanitize", action="store_true", help="small subset for compute-sanitizer")
    parser.add_argument("--simt", action="store_true", help="only the cases on the CUDA-core kernels")
    parser.add_argument("--cases", default="grid", help="grid, tuned, odd; comma-separated")
    args = parser.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    # fp16/bf16 on tensor cores at every head dim (129..255 on the next row up: 160, 192, 256,
    # the head dim of dK/dV split over warps past 128).
    head_dims = [1, 7, 32, 63, 64, 80, 96, 128, 129, 160, 192, 200, 256]
    # float32: flash_bwd_simt.cu at every head dim, each of its rows (32, 64, 128, 256) and between.
    f32_head_dims = [1, 7, 32, 63, 64, 96, 128, 129, 200, 256]
    lengths = [(1, 1), (63, 65), (64, 64), (65, 200), (200, 129), (128, 128), (300, 77)]
    halves = [torch.float16, torch.bfloat16]

    def grid():
        cases = list(itertools.product(halves, head_dims, lengths, [False, True]))
        cases += list(itertools.product([torch.float32], f32_head_dims, lengths, [False, True]))
        cases = [c + (None,) for c in cases]
        if args.simt:
            cases = [c for c in cases if on_cuda_cores(c[0], c[1], c[3])]
        if args.quick:
            cases = cases[::4]
        if args.sanitize:
            cases = cases[::23]
        return cases

    def tuned():  # dK/dV rows with dQ atomics; dQ rows run only when deterministic
        return [case + (kernel.endswith("_dq"),) for kernel, dtypes in (
            ("flash_bwd_dkdv", halves), ("flash_bwd_dq", halves),
            ("flash_bwd_simt_dkdv", [torch.float32]), ("flash_bwd_simt_dq", [torch.float32]))
            for case in tuned_cases([(kernel, dtypes)])]

    def variants():  # (..., deterministic, variant): both dQ paths take turns
        cases = [c for c in variant_cases(halves + [torch.float32]) if not c[-1].get("varlen")]
        return [c[:-1] + (i % 2 == 1, c[-1]) for i, c in enumerate(cases)][::4 if args.sanitize else 1]

    cases = select_cases(args.cases, grid, tuned,
                         lambda: odd_cases(halves) + odd_cases([torch.float32])[::3], variants)
    failures, worst = 0, {}
    for i, (dtype, d, (sq, sk), causal, heads, *det_variant) in enumerate(cases):
        layout = "bhsd" if i % 2 else "bshd"
        strided = i % 3 == 0
        hq, hk = heads or ((7, 1), (4, 2), (3, 3))[i % 3]
        det = det_variant[:1]
        variant = det_variant[1] if len(det_variant) > 1 else None
        deterministic = det[0] if det else i % 4 == 1 if heads is None else i % 2 == 1
        err, problems = run_case(dtype, 2, hq, hk, sq, sk, d, causal, layout, strided, deterministic,
                                 gen, variant)
        key = str(dtype).removeprefix("torch.") + (" simt" if on_cuda_cores(dtype, d, causal) else "")
        worst[key] = max(worst.get(key, 0.0), err)
        if problems:
            failures += 1
            print(f"FAIL {key} D={d} Sq={sq} Sk={sk} causal={causal} {layout} strided={strided} "
                  f"H={hq}/{hk} det={deterministic} {variant or ''}: {'; '.join(problems)}")
    worst_text = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    print(f"backward check: {len(cases) - failures}/{len(cases)} cases passed; worst rel err {worst_text}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
