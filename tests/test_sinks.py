"""Attention sinks in the reference pieces: the float64 oracles and the tiled NumPy algorithm.

A sink is a per-query-head logit sink_h that joins every row's softmax denominator as exp(sink_h)
and contributes no value (GPT-OSS). These tests give the wiring of `sinks=` through the public
functions an oracle to meet:
- the oracle with sinks equals the oracle without them, rescaled: lse' = logaddexp(lse, sink),
  out' = out * exp(lse - lse') (an independent formula, not the oracle's extra column);
- the gradient oracle's dq, dk, dv and dsinks equal central finite differences of the forward
  oracle;
- the tiled forward and backward (reference.flash_attention_forward/backward, per-sequence
  reference.forward/backward) equal the oracles in float64 within 1e-10, over awkward shapes,
  empty rows, and sinks of +-large magnitude;
- NaN inputs give NaN where the NaN reaches and raise no NumPy warning.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import finite_difference_grads
from xattn import reference

SINK_VALUES = (0.0, 1.5, -2.0, 30.0, -30.0, 1e4, -1e4)


@st.composite
def problems(draw):
    heads_k = draw(st.integers(1, 2))
    heads_q = heads_k * draw(st.sampled_from((1, 2, 3)))
    sq, sk = draw(st.sampled_from((0, 1, 5, 17))), draw(st.sampled_from((0, 1, 6, 19)))
    d = draw(st.sampled_from((1, 3, 8)))
    batch = draw(st.integers(1, 2))
    causal = draw(st.booleans())
    window = draw(st.sampled_from(((-1, -1), (2, -1), (0, 0), (3, 1))))
    if causal and window[1] > 0:
        window = (window[0], 0)
    sinks = np.array([draw(st.sampled_from(SINK_VALUES) | st.floats(-8, 8)) for _ in range(heads_q)])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.standard_normal((batch, heads_q, sq, d))
    k, v = (rng.standard_normal((batch, heads_k, sk, d)) for _ in range(2))
    dout = rng.standard_normal((batch, heads_q, sq, d))
    options = dict(causal=causal, window=window, scale=draw(st.sampled_from((0.3, 1.0))),
                   softcap=draw(st.sampled_from((0.0, 0.0, 2.0))))
    return q, k, v, dout, sinks, options


@settings(max_examples=60)
@given(problem=problems())
def test_oracle_with_sinks_is_the_rescaled_oracle(problem):
    q, k, v, _, sinks, options = problem
    out, lse = reference.exact_attention_bhsd(q, k, v, **options)
    out_s, lse_s = reference.exact_attention_bhsd(q, k, v, sinks=sinks, **options)
    want_lse = np.logaddexp(lse, sinks[None, :, None])
    np.testing.assert_allclose(lse_s, want_lse, rtol=1e-12, atol=1e-12)
    weight = np.exp(np.where(np.isneginf(lse), -np.inf, lse - want_lse))  # 0 for rows with no key
    np.testing.assert_allclose(out_s, out * weight[..., None], rtol=1e-10, atol=1e-12)
    assert np.isfinite(lse_s).all()  # a finite sink: no row is empty any more


def test_gradient_oracle_with_sinks_matches_finite_differences():
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal(s) for s in ((1, 4, 5, 3), (1, 2, 7, 3), (1, 2, 7, 3))]
    inputs.append(np.array([0.4, -1.2, 2.0, 0.0]))  # the sinks
    dout = rng.standard_normal((1, 4, 5, 3))
    for options in (dict(causal=False), dict(causal=True), dict(causal=False, window=(1, 2)),
                    dict(causal=False, softcap=0.9)):
        options = dict(scale=0.7, **options)
        *grads, = reference.exact_attention_grad_bhsd(*inputs[:3], dout, sinks=inputs[3], **options)
        assert len(grads) == 4

        def loss(q, k, v, sinks):
            return (reference.exact_attention_bhsd(q, k, v, sinks=sinks, **options)[0] * dout).sum()

        for grad, numeric in zip(grads, finite_difference_grads(loss, inputs)):
            np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_gradient_oracle_without_sinks_is_unchanged():
    rng = np.random.default_rng(6)
    q, k, v, dout = (rng.standard_normal((1, 2, 4, 3)) for _ in range(4))
    assert len(reference.exact_attention_grad_bhsd(q, k, v, dout, causal=True, scale=0.5)) == 3


@settings(max_examples=60)
@given(problem=problems(), tiles=st.sampled_from(((4, 4), (3, 5), (256, 512))))
def test_tiled_reference_with_sinks_equals_the_oracles(problem, tiles):
    q, k, v, dout, sinks, options = problem
    block_m, block_n = tiles
    want_out, want_lse = reference.exact_attention_bhsd(q, k, v, sinks=sinks, **options)
    out, lse = reference.flash_attention_forward(q, k, v, sinks=sinks, block_m=block_m,
                                                 block_n=block_n, **options)
    np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-10)

    want = reference.exact_attention_grad_bhsd(q, k, v, dout, sinks=sinks, **options)
    got = reference.flash_attention_backward(q, k, v, out, dout, lse, sinks=sinks,
                                             block_m=block_m, block_n=block_n, **options)
    assert len(got) == 4
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9, err_msg=name)


def test_varlen_reference_with_sinks_is_per_sequence():
    """reference.forward/backward on a packed batch equal the oracle sequence by sequence, and
    dsinks is the sum over the sequences (an empty sequence adds nothing)."""
    rng = np.random.default_rng(8)
    lengths_q, lengths_k = [3, 0, 5], [4, 2, 6]
    cu_q, cu_k = np.cumsum([0] + lengths_q), np.cumsum([0] + lengths_k)
    q = rng.standard_normal((1, 4, cu_q[-1], 8))
    k, v = (rng.standard_normal((1, 2, cu_k[-1], 8)) for _ in range(2))
    dout = rng.standard_normal(q.shape)
    sinks = np.array([0.5, -1.0, 3.0, 0.0])
    options = dict(causal=True, scale=0.4, sinks=sinks)
    out, lse = np.empty_like(q), np.empty(q.shape[:3])
    reference.forward(q, k, v, cu_seqlens=(cu_q, cu_k), out=out, lse=lse, **options)
    grads = [np.empty_like(x) for x in (q, k, v)]
    dq, dk, dv, dsinks = reference.backward(q, k, v, out, dout, lse, cu_seqlens=(cu_q, cu_k),
                                            dq=grads[0], dk=grads[1], dv=grads[2], **options)
    want_dsinks = np.zeros(4)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want_out, want_lse = reference.exact_attention_bhsd(q[:, :, qs], k[:, :, ks], v[:, :, ks], **options)
        np.testing.assert_allclose(out[:, :, qs], want_out, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(lse[:, :, qs], want_lse, rtol=1e-10, atol=1e-10)
        wq, wk, wv, ws = reference.exact_attention_grad_bhsd(q[:, :, qs], k[:, :, ks], v[:, :, ks],
                                                             dout[:, :, qs], **options)
        np.testing.assert_allclose(dq[:, :, qs], wq, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(dk[:, :, ks], wk, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(dv[:, :, ks], wv, rtol=1e-9, atol=1e-9)
        want_dsinks += ws
    np.testing.assert_allclose(dsinks, want_dsinks, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("sinks", [None, np.array([0.5, -3.0])])
def test_nan_input_gives_nan_without_numpy_warnings(dtype, where, sinks):
    """The NaN is the documented result; producing it must not warn (no RuntimeWarning from
    exp/log/subtract on NaN or -inf), in the oracles and the tiled forward and backward."""
    rng = np.random.default_rng(9)
    x = {name: rng.standard_normal((1, 2, 6, 4) if name == "q" else (1, 1, 6, 4)).astype(dtype)
         for name in "qkv"}
    x[where][0, 0, 2, 1] = np.nan
    dout = rng.standard_normal((1, 2, 6, 4)).astype(dtype)
    options = dict(causal=True, scale=0.5, sinks=sinks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = reference.flash_attention_forward(x["q"], x["k"], x["v"], **options)
        reference.flash_attention_backward(x["q"], x["k"], x["v"], out, dout, lse, **options)
        want_out, _ = reference.exact_attention_bhsd(x["q"], x["k"], x["v"], **options)
        reference.exact_attention_grad_bhsd(x["q"], x["k"], x["v"], dout, **options)
    assert np.isnan(out).any() and np.array_equal(np.isnan(out), np.isnan(want_out))
