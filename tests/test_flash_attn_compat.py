"""flash-attn 2.8's functions on xattn (xattn.flash_attn_compat).

The same calls three ways: through the compat functions, through xattn's own API, and through
torch's scaled_dot_product_attention (math backend, float64, with an explicit bottom-right
mask where Sq != Sk), plus the float64 oracles. Covered: flash_attn_func (GQA, causal with
Sq < Sk and Sq > Sk, windows, softcap, ALiBi, return_attn_probs, gradients),
flash_attn_varlen_func (empty sequences, lse (H, total)), flash_attn_with_kvcache (in-place
cache update, int / tensor / None cache_seqlens), and the private _flash_attn_forward /
_flash_attn_backward (and _varlen_) that ring-flash-attention calls: poisoned dq/dk/dv
buffers are overwritten, softmax_d has flash-attn's padded shape. Unsupported arguments raise
ValueError naming them. CPU: xattn's reference backend, float32. GPU (`gpu`): the cuda backend,
bfloat16 and float16.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import xattn  # noqa: E402
import xattn.flash_attn_compat as fa  # noqa: E402
from xattn import reference  # noqa: E402

from conftest import TOLERANCE  # noqa: E402
from tolerances import TOLERANCES  # noqa: E402

DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16, torch.float16]}
NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def rel_error(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def f64(t) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _skip_unless_usable(device):
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("torch does not see a CUDA GPU")
        usable, why = xattn.available_backends()["cuda"]
        if not usable:
            pytest.skip(f"cuda backend unusable: {why}")


def _device_dtype_params():
    params = []
    for device, dtypes in DTYPES.items():
        marks = [pytest.mark.gpu] if device == "cuda" else []
        params += [pytest.param(device, dtype, id=f"{device}-{NAMES[dtype]}", marks=marks)
                   for dtype in dtypes]
    return params


DEVICE_DTYPE = pytest.mark.parametrize("device, dtype", _device_dtype_params())


def _bshd(b, s, h, d, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype)


def _sdpa_reference(q, k, v, causal, scale):
    """SDPA's math backend in float64 on (B, S, H, D) inputs, bottom-right causal mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sq, sk = q.shape[1], k.shape[1]
    mask = None
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    qt, kt, vt = (t.detach().double().transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=kt.shape[1] != qt.shape[1])
    out = out.transpose(1, 2)
    if mask is not None:  # rows that see no key: flash-attn and xattn give 0, math NaN
        out[:, ~mask.any(-1)] = 0
    return out


# ----------------------------------------------------------------------------- flash_attn_func

@DEVICE_DTYPE
@pytest.mark.parametrize("sq, sk", [(37, 37), (20, 45), (45, 20), (1, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_equals_xattn_and_sdpa(device, dtype, sq, sk, causal):
    _skip_unless_usable(device)
    q = _bshd(2, sq, 6, 40, device, dtype, 0)
    k, v = (_bshd(2, sk, 2, 40, device, dtype, seed) for seed in (1, 2))
    out, lse, probs = fa.flash_attn_func(q, k, v, softmax_scale=0.2, causal=causal,
                                         return_attn_probs=True)
    own, own_lse = xattn.attention(q, k, v, causal=causal, scale=0.2, layout="bshd",
                                   return_lse=True)
    assert torch.equal(out, own) and torch.equal(lse, own_lse)
    assert lse.shape == (2, 6, sq) and probs.numel() == 0
    tolerance = TOLERANCE[NAMES[dtype]]
    assert rel_error(f64(out), f64(_sdpa_reference(q, k, v, causal, 0.2))) <= tolerance
    want, want_lse = xattn.exact_attention(q, k, v, causal=causal, scale=0.2, layout="bshd")
    assert rel_error(f64(out), want) <= tolerance
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(f64(lse)[finite], want_lse[finite], rtol=tolerance, atol=tolerance)


@DEVICE_DTYPE
@pytest.mark.parametrize("options, xattn_options", [
    (dict(window_size=(8, 3)), dict(window=(8, 3))),
    (dict(window_size=(8, 5), causal=True), dict(window=(8, 0), causal=True)),
    (dict(window_size=(-1, 4)), dict(window=(-1, 4))),
    (dict(softcap=5.0, causal=True), dict(softcap=5.0, causal=True)),
])
def test_flash_attn_func_windows_and_softcap(device, dtype, options, xattn_options):
    _skip_unless_usable(device)
    q, k, v = (_bshd(1, 50, 4, 32, device, dtype, seed) for seed in range(3))
    out = fa.flash_attn_func(q, k, v, **options)
    assert torch.equal(out, xattn.attention(q, k, v, layout="bshd", **xattn_options))
    want = xattn.exact_attention(q, k, v, layout="bshd", **xattn_options)[0]
    assert rel_error(f64(out), want) <= TOLERANCE[NAMES[dtype]]


@DEVICE_DTYPE
def test_flash_attn_func_alibi(device, dtype):
    _skip_unless_usable(device)
    q, k, v = (_bshd(2, 33, 4, 16, device, dtype, seed) for seed in range(3))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    out = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    want = xattn.exact_attention(q, k, v, causal=True, alibi_slopes=slopes, layout="bshd")[0]
    assert rel_error(f64(out), want) <= TOLERANCE[NAMES[dtype]]


@DEVICE_DTYPE
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_gradients(device, dtype, causal):
    _skip_unless_usable(device)
    q = _bshd(2, 29, 4, 24, device, dtype, 0).requires_grad_()
    k, v = (_bshd(2, 41, 2, 24, device, dtype, s).requires_grad_() for s in (1, 2))
    dout = _bshd(2, 29, 4, 24, device, dtype, 3)
    fa.flash_attn_func(q, k, v, causal=causal, window_size=(20, -1)).backward(dout)
    window = fa.flash_window(causal, 20, -1)
    want = reference.exact_attention_grad_bhsd(
        *(f64(t).transpose(0, 2, 1, 3) for t in (q, k, v, dout)), causal=causal,
        scale=24 ** -0.5, window=window)
    for x, expected in zip((q, k, v), want):
        assert rel_error(f64(x.grad), expected.transpose(0, 2, 1, 3)) <= TOLERANCES["grad_plain"][NAMES[dtype]]


# ----------------------------------------------------------------------- flash_attn_varlen_func

def _packed(lengths_q, lengths_k, device, dtype, hq=4, hk=2, d=32):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(sum(lengths_q), hq, d, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(sum(lengths_k), hk, d, generator=g).to(device=device, dtype=dtype)
            for _ in range(2))
    cu_q, cu_k = (torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32,
                               device=device) for n in (lengths_q, lengths_k))
    return q, k, v, cu_q, cu_k


@DEVICE_DTYPE
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_func(device, dtype, causal):
    _skip_unless_usable(device)
    lengths_q, lengths_k = [5, 0, 33, 17], [9, 4, 33, 2]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, device, dtype)
    out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 33, causal=causal,
                                                return_attn_probs=True)
    own, own_lse = xattn.attention_varlen(q, k, v, cu_q, cu_k, 33, 33, causal=causal,
                                          return_lse=True)
    assert torch.equal(out, own) and torch.equal(lse, own_lse) and probs.numel() == 0
    assert lse.shape == (4, q.shape[0])
    for b in range(4):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if rows.start == rows.stop:
            continue
        want = _sdpa_reference(q[None, rows], k[None, keys], v[None, keys], causal, None)[0]
        assert rel_error(f64(out[rows]), f64(want)) <= TOLERANCE[NAMES[dtype]]


# ---------------------------------------------------------------------- flash_attn_with_kvcache

def _compat_and_own(q, k_cache, v_cache, k_new, v_new, **options):
    """One causal call through flash_attn_with_kvcache and through xattn's own API (on copies
    of the caches, as they were before the call): (compat's out, xattn's out, the copies after)."""
    caches = (k_cache.clone(), v_cache.clone())
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, causal=True, **options)
    own = xattn.attention_with_kvcache(q, *caches, k_new=k_new, v_new=v_new, causal=True,
                                       layout="bshd", **options)
    return out, own, caches


def _kvcache_step(device, dtype):
    """q (3, 2, 4, 32), caches (3, 64, 2, 32) and two new rows per sequence, flash-attn's layout."""
    b, smax, hk, d = 3, 64, 2, 32
    k_cache, v_cache = (_bshd(b, smax, hk, d, device, dtype, s) for s in (1, 2))
    k_new, v_new = (_bshd(b, 2, hk, d, device, dtype, s) for s in (3, 4))
    return _bshd(b, 2, 4, d, device, dtype, 0), k_cache, v_cache, k_new, v_new


@DEVICE_DTYPE
def test_flash_attn_with_kvcache_updates_in_place(device, dtype):
    _skip_unless_usable(device)
    q, k_cache, v_cache, k_new, v_new = _kvcache_step(device, dtype)
    b, smax = k_cache.shape[:2]
    lengths = torch.tensor([0, 17, 62], dtype=torch.int32, device=device)
    caches = (k_cache.clone(), v_cache.clone())
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                          cache_seqlens=lengths, causal=True,
                                          return_softmax_lse=True)
    own = xattn.attention_with_kvcache(q, *caches, cache_seqlens=lengths, k_new=k_new,
                                       v_new=v_new, causal=True, layout="bshd")
    assert torch.equal(out, own) and lse.shape == (b, 4, 2)
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(k_cache[i, n:n + 2], k_new[i])
        want = _sdpa_reference(q[i:i + 1], k_cache[i:i + 1, :n + 2], v_cache[i:i + 1, :n + 2],
                               True, None)
        assert rel_error(f64(out[i:i + 1]), f64(want)) <= TOLERANCE[NAMES[dtype]]
    # An int length, and no length (the whole cache), as flash-attn takes them.
    whole = fa.flash_attn_with_kvcache(q, k_cache, v_cache)
    assert torch.equal(whole, fa.flash_attn_with_kvcache(q, k_cache, v_cache,
                                                         cache_seqlens=smax))
    want = _sdpa_reference(q, k_cache, v_cache, False, None)
    assert rel_error(f64(whole), f64(want)) <= TOLERANCE[NAMES[dtype]]


@DEVICE_DTYPE
def test_flash_attn_with_kvcache_takes_cache_leftpad(device, dtype):
    """cache_leftpad as flash-attn takes it: the same call through xattn's own API gives the same
    bits, and each sequence matches SDPA on its rows [cache_leftpad[b], cache_seqlens[b] + 2)."""
    _skip_unless_usable(device)
    q, k_cache, v_cache, k_new, v_new = _kvcache_step(device, dtype)
    lengths = torch.tensor([5, 17, 62], dtype=torch.int32, device=device)
    pads = torch.tensor([5, 3, 0], dtype=torch.int32, device=device)
    out, own, _ = _compat_and_own(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths,
                                  cache_leftpad=pads)
    assert torch.equal(out, own)
    for i, (n, pad) in enumerate(zip(lengths.tolist(), pads.tolist())):
        want = _sdpa_reference(q[i:i + 1], k_cache[i:i + 1, pad:n + 2], v_cache[i:i + 1, pad:n + 2],
                               True, None)
        assert rel_error(f64(out[i:i + 1]), f64(want)) <= TOLERANCE[NAMES[dtype]]


# ---------------------------------------------------------- private forward/backward (ring-flash)

@DEVICE_DTYPE
@pytest.mark.parametrize("causal", [False, True])
def test_private_forward_backward_as_ring_flash_attention_calls_them(device, dtype, causal):
    _skip_unless_usable(device)
    q = _bshd(2, 30, 4, 16, device, dtype, 0)
    k, v = (_bshd(2, 30, 2, 16, device, dtype, s) for s in (1, 2))
    dout = _bshd(2, 30, 4, 16, device, dtype, 3)
    out, lse, probs, rng = fa._flash_attn_forward(q, k, v, 0.0, 0.25, causal, -1, -1, 0.0, None,
                                                  False)
    assert torch.equal(out, fa.flash_attn_func(q, k, v, softmax_scale=0.25, causal=causal))
    assert lse.shape == (2, 4, 30) and probs.numel() == 0 and rng.shape == (2,)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))  # poisoned
    # deterministic=True on both sides: bitwise comparable on a GPU (no float atomics in dQ).
    softmax_d = fa._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, 0.25, causal,
                                        -1, -1, 0.0, None, True, rng)
    assert softmax_d.shape == (2, 4, 128) and (softmax_d[:, :, 30:] == 0).all()
    np.testing.assert_allclose(f64(softmax_d[:, :, :30]),
                               (f64(dout) * f64(out)).sum(-1).transpose(0, 2, 1), rtol=1e-3,
                               atol=1e-3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fa.flash_attn_func(*leaves, softmax_scale=0.25, causal=causal,
                       deterministic=True).backward(dout)
    for got, x in zip((dq, dk, dv), leaves):
        assert torch.equal(got, x.grad)


@DEVICE_DTYPE
def test_private_varlen_forward_backward(device, dtype):
    _skip_unless_usable(device)
    q, k, v, cu_q, cu_k = _packed([7, 20, 1], [7, 25, 4], device, dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    out, lse, _, rng = fa._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 20, 25, 0.0, None, True)
    assert torch.equal(out, fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 25, causal=True))
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    softmax_d = fa._flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k,
                                               20, 25, 0.0, None, True, -1, -1, 0.0, None, True)
    assert softmax_d.shape == (4, q.shape[0] + 128 * 3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fa.flash_attn_varlen_func(*leaves, cu_q, cu_k, 20, 25, causal=True,
                              deterministic=True).backward(dout)
    for got, x in zip((dq, dk, dv), leaves):
        assert torch.equal(got, x.grad)


# ------------------------------------------------------------------------------- refusals

def test_dropout_raises_naming_the_argument():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="dropout_p"):
        fa.flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        fa._flash_attn_forward(q, q, q, 0.1, None, False, -1, -1, 0.0, None, False)
    packed, cu = q[0], torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="dropout_p"):
        fa.flash_attn_varlen_func(packed, packed, packed, cu, cu, 4, 4, dropout_p=0.5)


@pytest.mark.parametrize("name", ["rotary_cos", "cache_batch_idx", "alibi_slopes"])
def test_kvcache_refuses_what_xattn_lacks(name):
    q, cache = torch.randn(1, 1, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=name):
        fa.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=2,
                                   **{name: torch.zeros(1, dtype=torch.int32)})


@DEVICE_DTYPE
def test_flash_attn_with_kvcache_takes_paged_caches(device, dtype):
    """block_table as flash-attn takes it: the same call through xattn's own API gives the same
    bits, the new keys land in their pages, and each sequence matches SDPA on its gathered cache."""
    _skip_unless_usable(device)
    b, page, hk, d, pages_per_seq = 2, 16, 2, 32, 3
    num_pages = b * pages_per_seq + 1
    k_pages, v_pages = (_bshd(num_pages, page, hk, d, device, dtype, s) for s in (1, 2))
    table = torch.tensor([[6, 0, 3], [2, 5, 1]], dtype=torch.int32, device=device)
    q = _bshd(b, 1, 4, d, device, dtype, 0)
    k_new, v_new = (_bshd(b, 1, hk, d, device, dtype, s) for s in (3, 4))
    lengths = torch.tensor([20, 33], dtype=torch.int32, device=device)
    out, own, caches = _compat_and_own(q, k_pages, v_pages, k_new, v_new, cache_seqlens=lengths,
                                       block_table=table)
    assert torch.equal(out, own)
    assert torch.equal(k_pages, caches[0]) and torch.equal(v_pages, caches[1])
    for i, n in enumerate(lengths.tolist()):
        rows = [(int(table[i, r // page]), r % page) for r in range(n + 1)]
        gathered = [torch.stack([x[p_, r] for p_, r in rows])[None] for x in (k_pages, v_pages)]
        assert torch.equal(gathered[0][0, n], k_new[i, 0])
        want = _sdpa_reference(q[i:i + 1], *gathered, True, None)
        assert rel_error(f64(out[i:i + 1]), f64(want)) <= TOLERANCE[NAMES[dtype]]
    with pytest.raises(ValueError, match="cache_seqlens"):
        fa.flash_attn_with_kvcache(q, k_pages, v_pages, block_table=table)


def test_kvcache_new_keys_need_lengths():
    q, cache = torch.randn(1, 1, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="cache_seqlens"):
        fa.flash_attn_with_kvcache(q, cache, cache, k=q, v=q)


def test_signatures_follow_flash_attn():
    import inspect
    assert list(inspect.signature(fa.flash_attn_func).parameters) == [
        "q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
        "alibi_slopes", "deterministic", "return_attn_probs"]
    assert list(inspect.signature(fa._flash_attn_forward).parameters) == [
        "q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left",
        "window_size_right", "softcap", "alibi_slopes", "return_softmax"]
    assert list(inspect.signature(fa._flash_attn_backward).parameters) == [
        "dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
        "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
        "alibi_slopes", "deterministic", "rng_state"]
