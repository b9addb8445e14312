"""Tensors of more than 2**31 elements (gpu): every offset must be 64-bit.

B=1 keeps the whole size inside one batch entry (the launcher moves pointers per batch chunk in
Python, so only in-kernel offsets h * stride_h + s * stride_s are under test). Sampled rows, the
last row of the last head included, are checked against float64 attention computed for those
rows only. Skipped, with the reason, where the GPU lacks the memory.
"""

from __future__ import annotations

import gc
import math
import sys

import pytest

import xattn

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

ELEMENTS = 2**31 + 64 * 128 * 128  # more than 2**31


def need_gib(gib):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    # Earlier tests leave blocks cached in torch's and CuPy's pools: hand them back first.
    gc.collect()
    torch.cuda.empty_cache()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, has {free / 2**30:.1f}")


def sampled_rows(heads, rows, generator):
    picks = [(0, 0), (heads - 1, rows - 1), (heads // 2, rows // 2), (heads - 1, 0), (0, rows - 1)]
    picks += [(int(h), int(i)) for h, i in zip(torch.randint(0, heads, (11,), generator=generator),
                                                torch.randint(0, rows, (11,), generator=generator))]
    return picks


def exact_rows(q, k, v, picks, causal, scale):
    """float64 out and lse of the picked (head, row) pairs only."""
    sq, sk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for h, i in picks:
        keys = k[0, h // group].double()
        s = scale * (keys @ q[0, h, i].double())
        if causal:
            s[torch.arange(sk, device=s.device) > i + sk - sq] = -math.inf
        lse = torch.logsumexp(s, 0)
        p = torch.exp(s - lse) if torch.isfinite(lse) else torch.zeros_like(s)
        outs.append(p @ v[0, h // group].double())
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def check(q, k, v, out, lse, causal, picks):
    scale = 1 / math.sqrt(q.shape[-1])
    want_out, want_lse = exact_rows(q, k, v, picks, causal, scale)
    got_out = torch.stack([out[0, h, i] for h, i in picks]).double()
    got_lse = torch.stack([lse[0, h, i] for h, i in picks]).double()
    assert torch.equal(torch.isneginf(got_lse), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(got_lse[finite], want_lse[finite], rtol=1e-3, atol=1e-3)
    error = (got_out - want_out).norm() / want_out.norm()
    assert error <= 1e-2, f"relative error {error:.2e} on sampled rows"
    assert (got_out[~finite] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_more_than_2_31_query_elements(cuda_backend, causal):
    """q and out: (1, 64, 262272, 128) bf16, 2**31 + 2**20 elements each, 256 keys (GQA 64:1)."""
    need_gib(2 * ELEMENTS * 2 / 2**30 + 2)
    g = torch.Generator(device="cuda").manual_seed(0)
    sq = ELEMENTS // (64 * 128)
    q = torch.randn(1, 64, sq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 1, 256, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    assert q.numel() > 2**31
    out, lse = xattn.attention(q, k, v, causal=causal, return_lse=True)
    picks = sampled_rows(64, sq, torch.Generator().manual_seed(1))
    if causal:  # with Sq > Sk only the last 256 rows see keys: sample those too
        picks += [(63, sq - 1 - r) for r in (0, 7, 255, 256, 1000)]
    check(q, k, v, out, lse, causal, picks)
    del q, out


def test_more_than_2_31_key_elements(cuda_backend):
    """k and v: (1, 64, 262272, 128) bf16 each, 300 queries per head."""
    need_gib(2 * ELEMENTS * 2 / 2**30 + 2)
    g = torch.Generator(device="cuda").manual_seed(2)
    sk = ELEMENTS // (64 * 128)
    k, v = (torch.randn(1, 64, sk, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    q = torch.randn(1, 64, 300, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    out, lse = xattn.attention(q, k, v, causal=True, return_lse=True)
    check(q, k, v, out, lse, True, sampled_rows(64, 300, torch.Generator().manual_seed(3)))


def test_more_than_2_31_elements_backward(cuda_backend):
    """dq of a (1, 64, 262272, 128) bf16 q (through autograd), sampled rows against float64."""
    need_gib(5 * ELEMENTS * 2 / 2**30 + ELEMENTS * 4 / 2**30 + 4)
    g = torch.Generator(device="cuda").manual_seed(4)
    sq = ELEMENTS // (64 * 128)
    q = torch.randn(1, 64, sq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 1, 256, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    q.requires_grad_(True)
    out = xattn.attention(q, k, v)
    dout = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    out.backward(dout)
    del out
    scale = 1 / math.sqrt(128)
    for h, i in sampled_rows(64, sq, torch.Generator().manual_seed(5)):
        qi = q.detach()[0, h, i].double().requires_grad_(True)
        s = scale * (k[0, 0].double() @ qi)
        oi = torch.softmax(s, 0) @ v[0, 0].double()
        (want,) = torch.autograd.grad(oi, qi, dout[0, h, i].double())
        got = q.grad[0, h, i].double()
        assert (got - want).norm() <= 3e-2 * want.norm() + 1e-3, (h, i)
