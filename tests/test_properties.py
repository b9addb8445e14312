"""Properties of attention, checked on every backend against the float64 oracle.

Each test takes the `backend` fixture (conftest.py): the same properties face the NumPy reference
and the GPU kernels, with per-dtype tolerances.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xattn
from xattn import reference
from conftest import LSE_TOLERANCE, TOLERANCE, to_float64
from tolerances import output_resolution
from problems import EDGE_HEAD_DIMS, EDGE_LENGTHS, Problem, present, problems, to_bhsd

EXAMPLES = 30


def run(backend, problem: Problem, **arrays):
    """attention(...) on the backend: (out (B,Hq,Sq,D), lse) as float64, plus the inputs."""
    q, k, v = problem.arrays(backend, **arrays)
    out, lse = xattn.attention(q, k, v, **problem.kwargs(), return_lse=True)
    check_result_type(q, out, lse)
    return to_bhsd(to_float64(out), problem.layout), to_float64(lse), (q, k, v)


def check_result_type(q, out, lse):
    """out has q's library, device, dtype and shape (its layout); lse is float32 (B, Hq, Sq)."""
    assert type(out) is type(q)
    assert tuple(out.shape) == tuple(q.shape)
    assert out.dtype == q.dtype
    assert "float32" in str(lse.dtype)
    if hasattr(q, "device"):
        assert out.device == q.device and lse.device == q.device


def oracle(problem: Problem, q, k, v):
    out, lse = xattn.exact_attention(q, k, v, **problem.kwargs())
    return to_bhsd(out, problem.layout), lse


def score_rounding(problem: Problem, q, k) -> float:
    """Absolute rounding error to expect in float32 scores: eps32 * scale * max_ij sum_d |q_id k_jd|.

    The softmax turns an absolute error d in a row's scores into a relative error of about d in its
    output and an absolute error d in its lse, so large scales and long head dims earn a
    proportionally larger float32 bound; at the default scale on unit-variance data this term stays
    far below the fixed tolerance.
    """
    q64, k64 = (to_bhsd(to_float64(x), problem.layout) for x in (q, k))
    if q64.size == 0 or k64.size == 0:
        return 0.0
    scale = problem.scale if problem.scale is not None else 1 / math.sqrt(q64.shape[-1])
    k64 = np.repeat(k64, q64.shape[1] // k64.shape[1], axis=1)  # GQA: each query head's keys
    largest = np.abs(q64) @ np.abs(k64).swapaxes(-1, -2)  # sum_d |q_id k_jd| for every pair
    return 2.0**-24 * scale * float(largest.max())


def assert_matches(got_out, got_lse, want_out, want_lse, dtype, lse_tolerance=None, score_error=0.0):
    tolerance = TOLERANCE[dtype] + score_error
    lse_tolerance = (lse_tolerance or LSE_TOLERANCE[dtype]) + score_error
    assert not np.isnan(got_out).any(), "NaN in out"
    assert not np.isnan(got_lse).any(), "NaN in lse"
    # Rows that see no key: exactly 0 and -inf.
    empty = np.isneginf(want_lse)
    np.testing.assert_array_equal(np.isneginf(got_lse), empty, "lse -inf pattern differs")
    assert (got_out[empty] == 0).all(), "rows that see no key must be 0"
    reference_norm = np.linalg.norm(want_out)
    error = np.linalg.norm(got_out - want_out)
    assert error <= tolerance * reference_norm + output_resolution(dtype, want_out.size), (
        f"relative error {error / reference_norm:.3e} above {tolerance:.0e} ({dtype})")
    np.testing.assert_allclose(got_lse[~empty], want_lse[~empty], rtol=lse_tolerance,
                               atol=lse_tolerance)


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_attention_matches_exact_oracle(backend, data):
    problem = data.draw(problems(backend))
    out, lse, inputs = run(backend, problem)
    assert_matches(out, lse, *oracle(problem, *inputs), problem.dtype,
                   score_error=score_rounding(problem, *inputs[:2]) if problem.dtype != "float64" else 0.0)


@pytest.mark.parametrize("sq, sk", list(itertools.product(EDGE_LENGTHS, repeat=2)))
def test_edge_lengths_and_head_dims(backend, sq, sk):
    """Every pair of edge lengths, with the edge head dims and GQA 7:1 cycling through."""
    index = EDGE_LENGTHS.index(sq) * len(EDGE_LENGTHS) + EDGE_LENGTHS.index(sk)
    head_dim = EDGE_HEAD_DIMS[index % len(EDGE_HEAD_DIMS)]
    library, dtype = backend.kinds[index % len(backend.kinds)]
    rng = np.random.default_rng(index)
    problem = Problem(
        q=rng.standard_normal((1, 7, sq, head_dim)), k=rng.standard_normal((1, 1, sk, head_dim)),
        v=rng.standard_normal((1, 1, sk, head_dim)), causal=index % 2 == 0, scale=None,
        layout=("bhsd", "bshd")[index // 2 % 2], library=library, dtype=dtype,
        memory=("sliced", "transposed", "contiguous"))
    out, lse, inputs = run(backend, problem)
    assert_matches(out, lse, *oracle(problem, *inputs), dtype)


@pytest.mark.parametrize("batch, q_heads, sq, sk", [(0, 2, 5, 5), (1, 0, 5, 5), (2, 2, 0, 5),
                                                   (2, 2, 5, 0), (1, 2, 9, 3)])
def test_empty_and_keyless_rows(backend, batch, q_heads, sq, sk):
    """Zero-sized problems, Sk == 0 and causal Sq > Sk: out 0 and lse -inf, never NaN."""
    library, dtype = backend.kinds[-1]
    rng = np.random.default_rng(0)
    problem = Problem(q=rng.standard_normal((batch, q_heads, sq, 8)),
                      k=rng.standard_normal((batch, 1, sk, 8)),
                      v=rng.standard_normal((batch, 1, sk, 8)), causal=True, scale=None,
                      layout="bhsd", library=library, dtype=dtype, memory=("contiguous",) * 3)
    out, lse, _ = run(backend, problem)
    assert out.shape == (batch, q_heads, sq, 8) and lse.shape == (batch, q_heads, sq)
    visible = reference.visible_keys(sq, sk, causal=True).any(axis=1)
    assert np.isneginf(lse[..., ~visible]).all() and (out[..., ~visible, :] == 0).all()
    assert np.isfinite(lse[..., visible]).all()


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_permuting_keys_with_values_changes_nothing(backend, data):
    problem = data.draw(problems(backend, causal=False))
    permutation = np.random.default_rng(0).permutation(problem.k.shape[2])
    out, lse, _ = run(backend, problem)
    permuted_out, permuted_lse, _ = run(backend, problem, k=problem.k[:, :, permutation],
                                        v=problem.v[:, :, permutation])
    assert_matches(permuted_out, permuted_lse, out, lse, problem.dtype)


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_output_lies_within_visible_values(backend, data):
    """Each output is a convex combination of the V rows its query sees."""
    problem = data.draw(problems(backend))
    out, _, (_, _, v) = run(backend, problem)
    v = to_bhsd(to_float64(v), problem.layout)
    group = problem.q.shape[1] // problem.k.shape[1]
    v = np.repeat(v, group, axis=1)[:, :, None]                # (B, Hq, 1, Sk, D)
    sq, sk = problem.q.shape[2], problem.k.shape[2]
    visible = reference.visible_keys(sq, sk, problem.causal)[None, None, :, :, None]
    low = np.where(visible, v, np.inf).min(axis=3, initial=np.inf)
    high = np.where(visible, v, -np.inf).max(axis=3, initial=-np.inf)
    slack = TOLERANCE[problem.dtype] * max(1.0, np.abs(v).max(initial=0.0))
    seen = np.broadcast_to(visible.any(axis=3), out.shape)  # elements of rows that see a key
    assert (out[seen] >= low[seen] - slack).all() and (out[seen] <= high[seen] + slack).all()
    assert (out[~seen] == 0).all()


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_lse_is_logsumexp_of_scaled_masked_scores(backend, data):
    problem = data.draw(problems(backend))
    _, lse, inputs = run(backend, problem)
    q, k = (to_bhsd(to_float64(x), problem.layout) for x in inputs[:2])
    head_dim = q.shape[-1]
    scale = 1 / math.sqrt(head_dim) if problem.scale is None else problem.scale
    kv_head = np.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    scores = scale * np.matmul(q, k[:, kv_head].swapaxes(-1, -2))
    visible = reference.visible_keys(q.shape[2], k.shape[2], problem.causal)
    expected = np.logaddexp.reduce(np.where(visible, scores, -np.inf), axis=-1)
    empty = np.isneginf(expected)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    # A float32 score carries the rounding of its sum, which the lse takes over (score_rounding;
    # a row of one key of sum_d |q_d k_d| ~ 580 at scale 1 was off by 2.4e-5: 0.7 * 2^-24 of it).
    tolerance = LSE_TOLERANCE[problem.dtype]
    rounding = score_rounding(problem, *inputs[:2]) if problem.dtype != "float64" else 0.0
    np.testing.assert_allclose(lse[~empty], expected[~empty], rtol=tolerance,
                               atol=tolerance + rounding)


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_gqa_equals_explicitly_repeated_kv(backend, data):
    problem = data.draw(problems(backend))
    group = problem.q.shape[1] // problem.k.shape[1]
    out, lse, _ = run(backend, problem)
    repeated_out, repeated_lse, _ = run(backend, problem, k=np.repeat(problem.k, group, axis=1),
                                        v=np.repeat(problem.v, group, axis=1))
    assert_matches(out, lse, repeated_out, repeated_lse, problem.dtype)


# ------------------------------------------------------------ the tiled reference algorithm

@settings(max_examples=60)
@given(data=st.data(), block_m=st.sampled_from((1, 16, 64, 256)),
       block_n=st.sampled_from((1, 16, 64, 512)))
def test_tiled_forward_equals_exact_in_float64(data, block_m, block_n):
    """The NumPy FlashAttention twin agrees with the oracle to 1e-10 relative, any tiling."""
    from conftest import Backend
    host = Backend("reference", (("numpy", "float64"),))
    problem = data.draw(problems(host))
    q, k, v = (to_bhsd(x, problem.layout) for x in problem.arrays(host))
    head_dim = q.shape[-1]
    scale = 1 / math.sqrt(head_dim) if problem.scale is None else problem.scale
    out = np.full(q.shape, np.nan)       # poisoned: every element must be written
    lse = np.full(q.shape[:3], np.nan)
    reference.flash_attention_forward(q, k, v, causal=problem.causal, scale=scale, out=out,
                                      lse=lse, block_m=block_m, block_n=block_n)
    want_out, want_lse = reference.exact_attention_bhsd(q, k, v, causal=problem.causal,
                                                        scale=scale)
    assert_matches(out, lse, want_out, want_lse, "float64", lse_tolerance=1e-10)


def test_tiled_forward_bounds_tile_memory(monkeypatch):
    """Many heads are processed in chunks; results do not depend on the chunking."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s) for s in ((3, 6, 70, 5), (3, 2, 90, 5), (3, 2, 90, 5)))
    whole = reference.flash_attention_forward(q, k, v, causal=True, scale=0.5)
    monkeypatch.setattr(reference, "TILE_ELEMENTS", 1)
    chunked = reference.flash_attention_forward(q, k, v, causal=True, scale=0.5,
                                                block_m=16, block_n=16)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-12, atol=1e-12)


def test_exact_oracle_matches_the_definition():
    """The oracle against plain loops over every (batch, head, query)."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 4, 5, 3))
    k, v = rng.standard_normal((2, 2, 7, 3)), rng.standard_normal((2, 2, 7, 3))
    for causal, sq in ((False, 5), (True, 5), (True, 9)):
        q_now = rng.standard_normal((2, 4, sq, 3))
        out, lse = xattn.exact_attention(q_now, k, v, causal=causal, scale=0.7)
        for b, h, i in np.ndindex(2, 4, sq):
            keys = [j for j in range(7) if not causal or j <= i + 7 - sq]
            if not keys:
                assert lse[b, h, i] == -np.inf and (out[b, h, i] == 0).all()
                continue
            scores = np.array([0.7 * q_now[b, h, i] @ k[b, h // 2, j] for j in keys])
            weights = np.exp(scores - scores.max())
            expected = sum(w * v[b, h // 2, j] for w, j in zip(weights, keys)) / weights.sum()
            np.testing.assert_allclose(out[b, h, i], expected, rtol=1e-12)
            np.testing.assert_allclose(lse[b, h, i],
                                       scores.max() + math.log(weights.sum()), rtol=1e-12)
    del q


# ------------------------------------------------- the backends' forward, called directly

FORWARD_SIZES = [  # (B, Hq, Hk, Sq, Sk, D, causal)
    (1, 2, 1, 1, 1, 1, False), (2, 7, 1, 65, 129, 63, True), (1, 4, 2, 200, 64, 128, True),
    (1, 2, 2, 64, 200, 256, True), (2, 2, 1, 127, 127, 80, False), (1, 3, 3, 5, 0, 32, False),
    (1, 2, 1, 0, 9, 64, True), (0, 2, 1, 4, 4, 64, False), (1, 1, 1, 129, 63, 200, True),
]


def direct_kinds(backend):
    """The kinds a backend's forward takes directly: the GPU paths take every one of theirs; the
    reference takes NumPy arrays (torch tensors reach it through the public functions)."""
    if backend.name == "reference":
        return [(library, dtype) for library, dtype in backend.kinds if library == "numpy"]
    return list(backend.kinds)


@pytest.mark.parametrize("size", FORWARD_SIZES, ids=str)
def test_forward_writes_every_element(backend, size):
    """Direct calls with NaN-poisoned outputs: every element of out and lse is written, rows that
    see no key get 0 and -inf, and the rest matches the oracle."""
    batch, q_heads, kv_heads, sq, sk, head_dim, causal = size
    rng = np.random.default_rng(sum(size))
    for library, dtype in direct_kinds(backend):
        q, k, v = (backend.make(rng.standard_normal(s), library, dtype) for s in (
            (batch, q_heads, sq, head_dim), (batch, kv_heads, sk, head_dim),
            (batch, kv_heads, sk, head_dim)))
        out = backend.make(np.full((batch, q_heads, sq, head_dim), np.nan), library, dtype)
        lse = backend.make(np.full((batch, q_heads, sq), np.nan), library, "float32")
        scale = 1 / math.sqrt(head_dim)
        backend.forward_into(q, k, v, out, lse, causal=causal, scale=scale)
        got_out, got_lse = to_float64(out), to_float64(lse)
        want_out, want_lse = xattn.exact_attention(q, k, v, causal=causal, scale=scale)
        label = f"{backend.name} {library} {dtype}"
        assert not np.isnan(got_out).any() and not np.isnan(got_lse).any(), f"unwritten ({label})"
        empty = np.isneginf(want_lse)
        np.testing.assert_array_equal(np.isneginf(got_lse), empty, label)
        assert (got_out[empty] == 0).all(), label
        if want_out.size and np.linalg.norm(want_out):
            error = np.linalg.norm(got_out - want_out) / np.linalg.norm(want_out)
            assert error <= TOLERANCE[dtype], f"{label}: relative error {error:.2e}"
            np.testing.assert_allclose(got_lse[~empty], want_lse[~empty],
                                       rtol=LSE_TOLERANCE[dtype], atol=LSE_TOLERANCE[dtype],
                                       err_msg=label)
