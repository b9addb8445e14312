"""Gradients of the variants (window, softcap, ALiBi, packed batches) through torch autograd on
every backend, against the float64 gradient oracle. Draws come from test_variants.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xattn
from xattn import reference
from conftest import to_float64
from problems import Problem, problems, to_bhsd
from test_grad import assert_grads_match, effective_scale, error_scales, grad_kinds, tolerance_for
from test_variants import cumulative, draw_variant, varlen_case

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------ every backend, gradients

def _normalized(problem: Problem, exact: dict) -> dict:
    """The oracle's keyword arguments for a drawn variant (causal folds the window's right)."""
    window = exact.get("window") or (-1, -1)
    if problem.causal:
        window = (window[0], 0)
    return dict(window=window, softcap=exact.get("softcap") or 0.0,
                alibi_slopes=exact.get("alibi_slopes"))


@settings(max_examples=12)
@given(data=st.data())
def test_variant_gradients_match_exact_oracle(backend, data):
    problem = data.draw(problems(backend, kinds=grad_kinds(backend)))
    call, exact = draw_variant(backend, problem, data)
    q, k, v = problem.arrays(backend)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = xattn.attention(q, k, v, **problem.kwargs(), **call)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    got = tuple(to_bhsd(to_float64(g), problem.layout) for g in grads)
    seen = [to_bhsd(to_float64(x), problem.layout) for x in (q, k, v, dout)]
    variant = _normalized(problem, exact)
    scale = effective_scale(problem)
    want = reference.exact_attention_grad_bhsd(*seen, causal=problem.causal, scale=scale, **variant)
    magnitudes, largest_score = error_scales(*seen, causal=problem.causal, scale=scale, **variant)
    assert_grads_match(got, want, magnitudes, tolerance_for(problem.dtype, largest_score),
                       f" ({problem.dtype}, {call})")


@settings(max_examples=12)
@given(data=st.data())
def test_varlen_gradients_match_each_sequence_alone(backend, data):
    host, (q, k, v), (cu_q, cu_k), lengths, dtype = varlen_case(backend, data, grad_kinds(backend))
    causal = data.draw(st.booleans())
    window = (data.draw(st.integers(-1, 40)), 0 if causal else data.draw(st.integers(-1, 40)))
    for x in (q, k, v):
        x.requires_grad_(True)
    out = xattn.attention_varlen(q, k, v, cu_q, cu_k, max(lengths[0]), max(lengths[1]),
                                 causal=causal, window=window,
                                 deterministic=data.draw(st.booleans()))
    dout = torch.randn_like(out)
    grads = [to_float64(g) for g in torch.autograd.grad(out, (q, k, v), dout)]
    seen = [to_float64(x) for x in (q, k, v, dout)]
    scale = 1 / math.sqrt(seen[0].shape[-1])
    cu = [cumulative(n) for n in lengths]
    want = [np.zeros_like(g) for g in grads]
    magnitudes = [np.zeros_like(g) for g in grads]
    largest = 0.0
    for b in range(len(lengths[0])):
        qs, ks = slice(cu[0][b], cu[0][b + 1]), slice(cu[1][b], cu[1][b + 1])
        parts = [x[s].transpose(1, 0, 2)[None] for x, s in zip(seen, (qs, ks, ks, qs))]
        options = dict(causal=causal, scale=scale, window=window)
        for total, part, s in zip(want, reference.exact_attention_grad_bhsd(*parts, **options),
                                  (qs, ks, ks)):
            total[s] = part[0].transpose(1, 0, 2)
        sizes, score = error_scales(*parts, **options)
        largest = max(largest, score)
        for total, part, s in zip(magnitudes, sizes, (qs, ks, ks)):
            total[s] = part[0].transpose(1, 0, 2)
    assert_grads_match(grads, want, magnitudes, tolerance_for(dtype, largest), f" ({dtype})")
