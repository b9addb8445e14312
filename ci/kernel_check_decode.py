"""Direct check of the KV-cache decoding kernels (kernels_cuda/flash_decode.cu) on a GPU: the
launcher below the public API (xattn.kvcache.launch_for_check) on torch tensors against exact
attention in float64 (computed on the GPU), over many shapes. out, lse and the split workspace are
poisoned with NaN before each launch; cache rows past each sequence's keys are NaN too (a kernel
that reads them turns its output NaN). Checks the appended rows and that the caches are otherwise
bitwise unchanged, and that a second run is bitwise identical. Prints one line per failure and a
summary line; exit 1 on any failure.

    PYTHONPATH=. python ci/kernel_check_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

from xattn import kvcache

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def exact(q, k, v, causal, window, softcap, scale):
    """float64 attention of one sequence, bottom-right aligned masks; empty rows 0 and -inf."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = scale * q @ k.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[2], k.shape[2]
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    left, right = window
    if causal:
        right = 0
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= i + sk - sq - left
    if right >= 0:
        visible &= j <= i + sk - sq + right
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p @ v, lse


def run_case(dtype, batch, hq, hk, sq, smax, snew, d, causal, window, softcap, layout, splits, gen):
    lengths = torch.randint(0, smax - snew + 1, (batch,), generator=gen, device="cuda").to(torch.int32)
    lengths[0] = smax - snew  # a full cache
    if batch > 1:
        lengths[1] = 0        # an empty one
    scale = 1 / math.sqrt(d)

    def tensor(b, h, s):  # (B, H, S, D) view in the layout's memory order
        x = torch.randn((b, h, s, d) if layout == "bhsd" else (b, s, h, d), generator=gen,
                        device="cuda").to(dtype)
        return x if layout == "bhsd" else x.transpose(1, 2)

    q, k_new, v_new = tensor(batch, hq, sq), tensor(batch, hk, snew), tensor(batch, hk, snew)
    k0, v0 = tensor(batch, hk, smax), tensor(batch, hk, smax)
    rows = torch.arange(smax, device="cuda")[None, None, :, None]
    for cache in (k0, v0):  # rows past each old length: NaN until the append lands
        cache.masked_fill_(rows >= lengths[:, None, None, None], float("nan"))

    kvcache._FORCED_SPLITS = splits
    kvcache.num_splits.cache_clear()
    results = []
    for _ in range(2):
        k_cache, v_cache = k0.clone(memory_format=torch.preserve_format), v0.clone(memory_format=torch.preserve_format)
        if layout == "bshd":  # clone keeps the strides of the transposed view
            assert k_cache.stride() == k0.stride()
        out = torch.full_like(q, float("nan"))
        lse = torch.full((batch, hq, sq), float("nan"), device="cuda")
        def workspace(n):
            return torch.full((n,), float("nan"), device="cuda")

        # the kernels read the device lengths
        kvcache.launch_for_check(q, k_cache, v_cache, lengths, out, lse, workspace, k_new=k_new,
                                 v_new=v_new, causal=causal, window=window, softcap=softcap)
        torch.cuda.synchronize()
        results.append((out, lse, k_cache, v_cache))

    problems = []
    (out, lse, k_cache, v_cache), (out2, lse2, _, _) = results
    want_k, want_v = k0.clone(), v0.clone()
    for b in range(batch):
        n = int(lengths[b])
        want_k[b, :, n:n + snew], want_v[b, :, n:n + snew] = k_new[b], v_new[b]
    for name, got, want in (("k_cache", k_cache, want_k), ("v_cache", v_cache, want_v)):
        same = (got == want) | (got.isnan() & want.isnan())
        if not same.all():
            problems.append(f"{name}: {int((~same).sum())} elements differ after the append")
    errors, denominators, lse_error = 0.0, 0.0, 0.0
    for b in range(batch):
        n = int(lengths[b]) + snew
        ref_out, ref_lse = exact(q[b:b + 1], want_k[b:b + 1, :, :n], want_v[b:b + 1, :, :n], causal,
                                 window, softcap, scale)
        errors += (out[b:b + 1].double() - ref_out).norm().item() ** 2
        denominators += ref_out.norm().item() ** 2
        finite = torch.isfinite(ref_lse)
        if not torch.equal(torch.isfinite(lse[b:b + 1]), finite):
            problems.append(f"lse -inf pattern differs in batch {b}")
        elif finite.any():
            lse_error = max(lse_error, (lse[b:b + 1].double() - ref_lse)[finite].abs().max().item())
        if (~finite).any() and (out[b:b + 1][~finite] != 0).any():
            problems.append(f"rows that see no key are not 0 in batch {b}")
    if out.isnan().any() or lse.isnan().any():
        problems.append("NaN in out or lse (unwritten, or a row read it should not)")
    err = math.sqrt(errors) / (math.sqrt(denominators) if denominators > 0 else 1)
    tol = TOLERANCE[dtype]
    if err > tol:
        problems.append(f"out rel err {err:.2e} > {tol}")
    if lse_error > 4 * tol:
        problems.append(f"lse abs err {lse_error:.2e}")
    if not (torch.equal(out.contiguous().view(torch.uint8), out2.contiguous().view(torch.uint8))
            and torch.equal(lse.view(torch.uint8), lse2.view(torch.uint8))):
        problems.append("two runs differ bitwise")
    return err, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="every fifth case")
    args = parser.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    heads = [(32, 8), (32, 32), (8, 1), (4, 4), (16, 2)]
    lengths = [(1, 4096, 1), (1, 777, 0), (4, 300, 3), (16, 129, 16), (33, 200, 0), (1, 1, 1), (2, 0, 0)]
    head_dims = [128, 64, 256, 7, 96, 33, 200, 32]
    variants = [(True, (-1, -1), 0.0), (False, (-1, -1), 0.0), (True, (100, -1), 0.0),
                (False, (20, 5), 0.0), (True, (-1, -1), 30.0)]
    cases = []
    # Every (dtype, heads, lengths) at D = 128 (the decode benchmark's) and at one more head dim,
    # cycling through the awkward ones; masks, layouts and split counts cycle too.
    shapes = [(dtype, h, ls, d) for n, (dtype, h, ls) in enumerate(itertools.product(dtypes, heads, lengths))
              for d in (128, head_dims[1 + n % (len(head_dims) - 1)])]
    for n, (dtype, (hq, hk), (sq, smax, snew), d) in enumerate(shapes):
        causal, window, softcap = variants[n % len(variants)]
        layout = ("bhsd", "bshd")[n // len(variants) % 2]
        splits = (0, 1, 3)[n % 3]  # 0: the heuristic's choice
        batch = 3 if smax < 1000 else 2
        cases.append((dtype, batch, hq, hk, sq, smax, snew, d, causal, window, softcap, layout, splits))
    if args.quick:
        cases = cases[::5]
    failures, worst = 0, {}
    for case in cases:
        try:
            err, problems = run_case(*case, gen)
        except Exception as exc:  # a launch failure is a failure of this case, not of the script
            err, problems = float("nan"), [f"{type(exc).__name__}: {exc}"]
        worst[case[0]] = max(worst.get(case[0], 0.0), err if err == err else 0.0)
        if problems:
            failures += 1
            print("FAIL", case, "; ".join(problems), flush=True)
    summary = ", ".join(f"{str(k).removeprefix('torch.')} max rel err {v:.1e}" for k, v in worst.items())
    print(f"decode kernel check: {len(cases) - failures}/{len(cases)} cases passed ({summary})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
