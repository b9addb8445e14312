"""Sliding windows, softcap, ALiBi and packed (varlen) batches, on every backend, against the
float64 oracle; and the oracle itself against definitions written out element by element.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xattn
from xattn import reference
from conftest import finite_difference_grads, to_float64
from problems import Problem, problems, to_bhsd
from test_properties import assert_matches, check_result_type, score_rounding

EXAMPLES = 25

windows = st.one_of(
    st.none(),
    st.tuples(st.integers(-1, 80), st.integers(-1, 80)),
    st.sampled_from([(0, 0), (0, -1), (-1, 0), (1000, 1000), (3, 500)]),  # left=0, wider than S
)


def slopes_for(backend, problem: Problem, data, per_batch: bool):
    batch, q_heads = problem.q.shape[:2]
    shape = (batch, q_heads) if per_batch else (q_heads,)
    values = np.random.default_rng(data.draw(st.integers(0, 2**31))).uniform(0.0, 1.0, shape)
    dtype = "float64" if problem.library == "numpy" else "float32"
    return values, backend.make(values, problem.library, dtype)


def draw_variant(backend, problem: Problem, data) -> tuple[dict, dict]:
    """(kwargs for the backend's call, kwargs for the oracle): window, softcap or ALiBi."""
    window = data.draw(windows)
    if problem.causal and window is not None and window[1] > 0:
        window = (window[0], data.draw(st.sampled_from((-1, 0))))
    kind = data.draw(st.sampled_from(("window", "softcap", "alibi")))
    call = dict(window=window)
    if kind == "softcap":
        call["softcap"] = data.draw(st.sampled_from((0.5, 5.0, 30.0)))
    elif kind == "alibi":
        _, device = slopes_for(backend, problem, data, data.draw(st.booleans()))
        call["alibi_slopes"] = device
        return call, dict(call, alibi_slopes=to_float64(device))  # the values the backend saw
    return call, dict(call)


def oracle_bhsd(problem: Problem, q, k, v, **variant):
    seen = [to_bhsd(to_float64(x), problem.layout) for x in (q, k, v)]
    scale = problem.scale if problem.scale is not None else 1 / math.sqrt(seen[0].shape[-1])
    window = variant.pop("window", None) or (-1, -1)
    if problem.causal:
        window = (window[0], 0)
    softcap = variant.pop("softcap", None) or 0.0
    return reference.exact_attention_bhsd(*seen, causal=problem.causal, scale=scale,
                                          window=window, softcap=softcap, **variant)


# ------------------------------------------------------------------- every backend, forward

@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_variants_match_exact_oracle(backend, data):
    problem = data.draw(problems(backend))
    call, exact = draw_variant(backend, problem, data)
    q, k, v = problem.arrays(backend)
    out, lse = xattn.attention(q, k, v, **problem.kwargs(), **call, return_lse=True)
    check_result_type(q, out, lse)
    want_out, want_lse = oracle_bhsd(problem, q, k, v, **exact)
    rounding = score_rounding(problem, q, k) if problem.dtype != "float64" else 0.0
    if "softcap" in call:  # the cap bounds the scores; tanh's slope is at most 1
        rounding = min(rounding, 2.0**-24 * 4 * call["softcap"]) if rounding else 0.0
    assert_matches(to_bhsd(to_float64(out), problem.layout), to_float64(lse), want_out, want_lse,
                   problem.dtype, score_error=rounding)


@pytest.mark.parametrize("sq, sk, window, causal", [
    (200, 200, (0, 0), False),        # each query sees only its own key
    (129, 200, (0, -1), False),       # left = 0: the diagonal and everything right of it
    (200, 129, (5, 3), False),        # Sq > Sk: the band runs off the left edge of the keys
    (65, 300, (64, 0), True),         # a window narrower than a tile, causal
    (300, 300, (1000, 1000), False),  # wider than the sequence: plain attention
    (257, 257, (17, 200), False),     # asymmetric
    (100, 40, (3, 0), True),          # causal Sq > Sk: the first 60 rows see no key
    (64, 64, (-1, -1), True),
])
def test_window_edges(backend, sq, sk, window, causal):
    library, dtype = backend.kinds[-1]
    rng = np.random.default_rng(sq * 1000 + sk)
    problem = Problem(q=rng.standard_normal((1, 4, sq, 64)), k=rng.standard_normal((1, 2, sk, 64)),
                      v=rng.standard_normal((1, 2, sk, 64)), causal=causal, scale=None,
                      layout="bhsd", library=library, dtype=dtype, memory=("contiguous",) * 3)
    q, k, v = problem.arrays(backend)
    out, lse = xattn.attention(q, k, v, causal=causal, window=window, return_lse=True)
    want_out, want_lse = oracle_bhsd(problem, q, k, v, window=window)
    assert_matches(to_float64(out), to_float64(lse), want_out, want_lse, dtype)


def test_softcap_keeps_huge_scores_finite(backend):
    """Scores of +-1e4 under a softcap of 20 are within +-20: the softmax stays soft."""
    library, dtype = backend.kinds[-1]
    rng = np.random.default_rng(1)
    problem = Problem(q=100 * rng.standard_normal((1, 2, 70, 64)),
                      k=100 * rng.standard_normal((1, 2, 90, 64)),
                      v=rng.standard_normal((1, 2, 90, 64)), causal=False, scale=1.0,
                      layout="bhsd", library=library, dtype=dtype, memory=("contiguous",) * 3)
    q, k, v = problem.arrays(backend)
    out, lse = xattn.attention(q, k, v, scale=1.0, softcap=20.0, return_lse=True)
    want_out, want_lse = oracle_bhsd(problem, q, k, v, softcap=20.0)
    assert np.abs(want_lse).max() < 20 + math.log(90) + 1e-9
    assert_matches(to_float64(out), to_float64(lse), want_out, want_lse, dtype)


# ------------------------------------------------------------------- every backend, varlen

def draw_lengths(data, count_max=5, length_max=150):
    count = data.draw(st.integers(1, count_max))
    return [data.draw(st.one_of(st.just(0), st.integers(0, length_max))) for _ in range(count)]


def cumulative(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def varlen_case(backend, data, kinds=None):
    """Packed q, k, v (float64 host data and the backend's arrays) and their cu_seqlens."""
    lengths_q = draw_lengths(data)
    lengths_k = [data.draw(st.one_of(st.just(n), st.integers(0, 150))) for n in lengths_q]
    kv_heads = data.draw(st.integers(1, 2))
    q_heads = kv_heads * data.draw(st.sampled_from((1, 3)))
    head_dim = data.draw(st.sampled_from((8, 40, 64, 128)))
    library, dtype = data.draw(st.sampled_from(kinds or backend.kinds))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    host = [rng.standard_normal((sum(lengths), heads, head_dim))
            for lengths, heads in ((lengths_q, q_heads), (lengths_k, kv_heads), (lengths_k, kv_heads))]
    arrays = [backend.make(np.ascontiguousarray(x), library, dtype) for x in host]
    cu = [backend.make(cumulative(n), library, "int32") if library != "numpy" else cumulative(n)
          for n in (lengths_q, lengths_k)]
    return host, arrays, cu, (lengths_q, lengths_k), dtype


def per_sequence_oracle(host, lengths, *, causal, scale, window, softcap=0.0):
    """(out (Tq, Hq, D), lse (Hq, Tq)): the oracle on each sequence alone, in float64."""
    (q, k, v), (lengths_q, lengths_k) = host, lengths
    cu_q, cu_k = cumulative(lengths_q), cumulative(lengths_k)
    out = np.zeros(q.shape)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for b in range(len(lengths_q)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, l = reference.exact_attention_bhsd(
            q[qs].transpose(1, 0, 2)[None], k[ks].transpose(1, 0, 2)[None],
            v[ks].transpose(1, 0, 2)[None], causal=causal, scale=scale, window=window,
            softcap=softcap)
        out[qs] = o[0].transpose(1, 0, 2)
        lse[:, qs] = l[0]
    return out, lse


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_varlen_matches_each_sequence_alone(backend, data):
    host, (q, k, v), (cu_q, cu_k), lengths, dtype = varlen_case(backend, data)
    causal = data.draw(st.booleans())
    window = data.draw(windows)
    if causal and window is not None and window[1] > 0:
        window = (window[0], 0)
    softcap = data.draw(st.sampled_from((None, 10.0)))
    max_q, max_k = max(lengths[0]), max(lengths[1])
    extra = data.draw(st.integers(0, 3))  # a larger maximum than needed is allowed
    out, lse = xattn.attention_varlen(q, k, v, cu_q, cu_k, max_q + extra, max_k, causal=causal,
                                      window=window, softcap=softcap, return_lse=True)
    assert type(out) is type(q) and tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype
    assert tuple(lse.shape) == (q.shape[1], q.shape[0])
    seen = [to_float64(x) for x in (q, k, v)]
    want_out, want_lse = per_sequence_oracle(
        seen, lengths, causal=causal, scale=1 / math.sqrt(seen[0].shape[-1]),
        window=(window or (-1, -1))[0:1] + ((0,) if causal else (window or (-1, -1))[1:]),
        softcap=softcap or 0.0)
    # assert_matches wants (B, H, S, D) / (B, H, S): one batch entry of all the rows.
    assert_matches(to_float64(out).transpose(1, 0, 2)[None], to_float64(lse)[None],
                   want_out.transpose(1, 0, 2)[None], want_lse[None], dtype,
                   score_error=8 * 2.0**-24 * 64 if dtype != "float64" else 0.0)


# ---------------------------------------------------------------- the oracle's definitions

def test_oracle_window_is_the_definition():
    """Element by element: query i sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right."""
    for sq, sk, window, causal in ((5, 9, (2, 1), False), (9, 5, (0, 3), False), (7, 7, (1, 0), True),
                                   (6, 4, (-1, 2), False), (4, 6, (3, -1), True)):
        visible = reference.visible_keys(sq, sk, causal, window)
        left, right = window
        for i in range(sq):
            for j in range(sk):
                d = j - (i + sk - sq)
                expected = (left < 0 or d >= -left) and ((0 if causal else right) < 0 or
                                                          d <= (0 if causal else right))
                assert visible[i, j] == expected, (sq, sk, window, causal, i, j)


def test_oracle_softcap_and_alibi_are_the_definitions():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s) for s in ((2, 2, 5, 4), (2, 1, 7, 4), (2, 1, 7, 4)))
    slopes = rng.uniform(0, 1, (2, 2))
    for softcap, alibi in ((3.0, None), (0.0, slopes)):
        out, _ = reference.exact_attention_bhsd(q, k, v, causal=False, scale=0.6, softcap=softcap,
                                                alibi_slopes=alibi)
        for b in range(2):
            for h in range(2):
                s = 0.6 * q[b, h] @ k[b, 0].T
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                if alibi is not None:
                    i, j = np.arange(5)[:, None], np.arange(7)[None, :]
                    s = s - alibi[b, h] * np.abs(i + 7 - 5 - j)
                p = np.exp(s - s.max(axis=1, keepdims=True))
                np.testing.assert_allclose(out[b, h], (p / p.sum(axis=1, keepdims=True)) @ v[b, 0],
                                           rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", [dict(window=(1, 2)), dict(softcap=0.9),
                                     dict(alibi_slopes=np.array([0.3, 0.7, 0.1, 0.5]))])
def test_gradient_oracle_matches_finite_differences_for_variants(variant):
    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal(s) for s in ((1, 4, 5, 3), (1, 2, 7, 3), (1, 2, 7, 3))]
    dout = rng.standard_normal((1, 4, 5, 3))
    options = dict(causal=False, scale=0.7, **variant)
    grads = reference.exact_attention_grad_bhsd(*inputs, dout, **options)

    def loss(*x):
        return (reference.exact_attention_bhsd(*x, **options)[0] * dout).sum()
    for grad, numeric in zip(grads, finite_difference_grads(loss, inputs)):
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@settings(max_examples=40)
@given(data=st.data())
def test_tiled_reference_equals_oracle_with_variants(data):
    """The tiled NumPy algorithm (tile skipping outside the band, masking on its edges) in
    float64 with small tiles, forward and backward."""
    sq, sk = data.draw(st.integers(0, 40)), data.draw(st.integers(0, 40))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    q, k, v, dout = (rng.standard_normal(s) for s in ((2, 4, sq, 5), (2, 2, sk, 5), (2, 2, sk, 5),
                                                      (2, 4, sq, 5)))
    causal = data.draw(st.booleans())
    window = data.draw(st.tuples(st.integers(-1, 12), st.integers(-1, 12)))
    if causal:
        window = (window[0], 0)
    softcap = data.draw(st.sampled_from((0.0, 2.0)))
    slopes = None if softcap else data.draw(st.sampled_from((None, rng.uniform(0, 1, (2, 4)))))
    options = dict(causal=causal, scale=0.5, window=window, softcap=softcap, alibi_slopes=slopes)
    want_out, want_lse = reference.exact_attention_bhsd(q, k, v, **options)
    out, lse = reference.flash_attention_forward(q, k, v, block_m=8, block_n=8, **options)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)
    want = reference.exact_attention_grad_bhsd(q, k, v, dout, **options)
    got = reference.flash_attention_backward(q, k, v, out, dout, lse, block_m=8, block_n=8,
                                             **options)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ bad input

def small():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in ((1, 2, 5, 8), (1, 1, 6, 8), (1, 1, 6, 8))]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(window=3), TypeError, r"window: expected None or a pair of ints"),
    (dict(window=(1.5, 2)), TypeError, r"window: expected None or a pair of ints"),
    (dict(window=(-2, 0)), ValueError, r"window: expected each side >= 0, or -1"),
    (dict(window=(2, 3), causal=True), ValueError, r"with causal=True the right side must be 0"),
    (dict(softcap=-1.0), ValueError, r"softcap: expected a finite positive number"),
    (dict(softcap=float("inf")), ValueError, r"softcap: expected a finite positive number"),
    (dict(softcap="5"), TypeError, r"softcap: expected a positive number, 0.0 or None"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, r"alibi_slopes: expected shape \(2,\) or \(1, 2\)"),
    (dict(alibi_slopes=np.ones(2, np.int32)), TypeError, r"alibi_slopes: expected a float dtype"),
    (dict(alibi_slopes=np.ones(2, np.float32), softcap=2.0), ValueError, r"cannot be combined with softcap"),
])
def test_bad_variant_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        xattn.attention(*small(), **kwargs)


def packed():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in ((7, 2, 8), (9, 1, 8), (9, 1, 8))]


@pytest.mark.parametrize("cu_q, cu_k, max_q, error, message", [
    ([0, 3, 2, 7], [0, 4, 5, 9], 5, ValueError, r"cu_seqlens_q: expected non-decreasing entries"),
    ([0, 3, 7], [0, 4, 5, 9], 4, ValueError, r"cu_seqlens_k: expected 3 entries \(as cu_seqlens_q\)"),
    ([0, 3, 6], [0, 4, 9], 3, ValueError, r"cu_seqlens_q: expected last entry 7"),
    ([1, 3, 7], [0, 4, 9], 4, ValueError, r"cu_seqlens_q: expected first entry 0"),
    ([0, 3, 7], [0, 4, 9], 3, ValueError, r"max_seqlen_q: expected at least 4"),
])
def test_bad_cu_seqlens_raise(cu_q, cu_k, max_q, error, message):
    with pytest.raises(error, match=message):
        xattn.attention_varlen(*packed(), np.array(cu_q, np.int32), np.array(cu_k, np.int32),
                               max_q, 9)


def test_cu_seqlens_must_be_int32_and_one_dimensional():
    with pytest.raises(ValueError, match=r"cu_seqlens_q: expected dtype int32, got int64"):
        xattn.attention_varlen(*packed(), np.array([0, 7]), np.array([0, 9], np.int32), 7, 9)
    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected a 1-d array"):
        xattn.attention_varlen(*packed(), np.array([0, 7], np.int32),
                               np.array([[0, 9]], np.int32), 7, 9)
    with pytest.raises(ValueError, match=r"q: expected a 3-d array \(total_tokens, H, D\)"):
        xattn.attention_varlen(packed()[0][None], *packed()[1:], np.array([0, 7], np.int32),
                               np.array([0, 9], np.int32), 7, 9)


@pytest.mark.gpu
def test_cu_seqlens_read_back_once_but_changes_are_seen(cuda_backend):
    """A GPU torch cu_seqlens is read back to the host once per version: the second call with
    the same tensor needs no copy, and an in-place change through torch is validated again."""
    torch = pytest.importorskip("torch")
    from xattn import api
    q = torch.randn(7, 2, 8, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device="cuda")
    xattn.attention_varlen(q, q, q, cu, cu, 4, 4)
    reads = []
    original = api.arrays.to_host_ints
    api.arrays.to_host_ints = lambda *a: reads.append(1) or original(*a)
    try:
        xattn.attention_varlen(q, q, q, cu, cu, 4, 4)
        assert not reads, "the unchanged cu_seqlens was read back again"
        cu[1] = 5  # in place: cu is now [0, 5, 7], whose longest sequence is 5 > max_seqlen 4
        with pytest.raises(ValueError, match=r"max_seqlen_q: expected at least 5"):
            xattn.attention_varlen(q, q, q, cu, cu, 4, 4)
        assert reads
    finally:
        api.arrays.to_host_ints = original
