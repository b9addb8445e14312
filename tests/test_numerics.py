"""Numerics at the edges, on every backend: large scores, NaN propagation, empty rows, overflow.

The documented rules (README, "Reliability"):
- Scaled scores up to +-1e4 (and float16 inputs near 65504) give no inf or NaN and match the oracle.
- A NaN in q[b, h, i, :] makes out[b, h, i, :] and lse[b, h, i] NaN, and nothing else.
- A NaN in k[b, g, j, :] makes out and lse NaN for every row that sees key j (query heads of
  group g, rows i with j visible under the causal rule), and nothing else.
- A NaN in v[b, g, j, d] makes out[..., i, d] NaN for every row i that sees key j; lse stays
  finite. Rows that do not see key j are not guaranteed finite in column d: the product P V
  multiplies the NaN by their probability 0, and 0 * NaN = NaN, in the oracle as in the tiles.
- A row that sees no key gives out 0 and lse -inf.
- The output never exceeds max|v| in exact arithmetic; where it lies within rounding of the
  dtype's largest value, an element may round to +-inf (IEEE overflow, visible to isinf), but
  never to NaN, to the other sign, or to a finite wrong value.
"""

from __future__ import annotations

import numpy as np
import pytest

import xattn
from conftest import to_float64
from tolerances import TOLERANCES
from xattn import reference

FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")
LARGE_TOLERANCE = TOLERANCES["large_scores"]  # scores of magnitude 1e4
DTYPE_MAX = {"float16": 65504.0}


def kinds(backend):
    return [(library, dtype) for library, dtype in backend.kinds if dtype in FLOAT_KINDS]


def make(backend, library, dtype, *arrays):
    """Backend arrays, and the float64 values they actually hold."""
    made = tuple(backend.make(np.ascontiguousarray(a), library, dtype) for a in arrays)
    return made, tuple(to_float64(m) for m in made)


def run(q, k, v, **kwargs):
    out, lse = xattn.attention(q, k, v, return_lse=True, **kwargs)
    return to_float64(out), to_float64(lse)


@pytest.mark.parametrize("causal", [False, True])
def test_scores_up_to_1e4_stay_finite_and_match(backend, causal):
    rng = np.random.default_rng(1)
    shape_q, shape_kv = (1, 4, 100, 64), (1, 2, 130, 64)
    for library, dtype in kinds(backend):
        (q, k, v), (q64, k64, v64) = make(backend, library, dtype, rng.standard_normal(shape_q),
                                          rng.standard_normal(shape_kv),
                                          rng.standard_normal(shape_kv))
        raw = q64 @ np.repeat(k64, 2, axis=1).swapaxes(-1, -2)
        scale = 1e4 / np.abs(raw).max()  # the largest scaled score is exactly +-1e4
        out, lse = run(q, k, v, causal=causal, scale=scale)
        want_out, want_lse = reference.exact_attention_bhsd(q64, k64, v64, causal=causal,
                                                            scale=scale)
        assert np.isfinite(out).all() and np.isfinite(lse).all(), (library, dtype)
        error = np.linalg.norm(out - want_out) / np.linalg.norm(want_out)
        assert error <= LARGE_TOLERANCE[dtype], (library, dtype, error)
        np.testing.assert_allclose(lse, want_lse, rtol=2e-6, atol=2e-2)


def test_float16_values_near_the_maximum_stay_finite(backend):
    """q, k near 3e4 and v near 6e4 in float16, scaled so scores reach +-1e4."""
    if not any(dtype == "float16" for _, dtype in kinds(backend)):
        pytest.skip("no float16 kind on this backend")
    rng = np.random.default_rng(2)
    library = next(lib for lib, dtype in kinds(backend) if dtype == "float16")
    big = lambda shape, top: np.clip(rng.standard_normal(shape) * top / 3, -top, top)  # noqa: E731
    (q, k, v), (q64, k64, v64) = make(backend, library, "float16", big((1, 2, 65, 32), 3e4),
                                      big((1, 2, 80, 32), 3e4), big((1, 2, 80, 32), 6e4))
    scale = 1e4 / np.abs(q64 @ k64.swapaxes(-1, -2)).max()
    out, lse = run(q, k, v, scale=scale)
    want_out, want_lse = reference.exact_attention_bhsd(q64, k64, v64, causal=False, scale=scale)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert np.linalg.norm(out - want_out) <= LARGE_TOLERANCE["float16"] * np.linalg.norm(want_out)


# ---------------------------------------------------------------------------- NaN propagation

SHAPES = [(70, 90), (90, 70)]  # (Sq, Sk): causal offset +20 and -20 (20 rows see no key)


def _nan_problem(backend, library, dtype, sq, sk, where):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 4, sq, 32))
    k = rng.standard_normal((1, 2, sk, 32))
    v = rng.standard_normal((1, 2, sk, 32))
    row, key = 45, 50
    {"q": lambda: q.__setitem__((0, 1, row, 5), np.nan),
     "k": lambda: k.__setitem__((0, 0, key, 3), np.nan),
     "v": lambda: v.__setitem__((0, 1, key, 7), np.nan),
     None: lambda: None}[where]()  # None: the same data without a NaN
    (cq, ck, cv), _ = make(backend, library, dtype, q, k, v)
    return (cq, ck, cv), row, key


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq, sk", SHAPES)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_nan_reaches_exactly_the_rows_that_attend_to_it(backend, where, sq, sk, causal):
    sees = reference.visible_keys(sq, sk, causal)  # [i, j]: query i sees key j
    empty_rows = ~sees.any(axis=1)
    for library, dtype in kinds(backend):
        (q, k, v), row, key = _nan_problem(backend, library, dtype, sq, sk, where)
        out, lse = run(q, k, v, causal=causal)
        nan_rows = np.zeros((1, 4, sq), dtype=bool)  # rows whose whole output must be NaN
        if where == "q":
            nan_rows[0, 1, row] = True
        elif where == "k":
            nan_rows[0, 0:2, sees[:, key]] = True  # query heads 0 and 1 read kv head 0
        label = (library, dtype, where)
        if where in ("q", "k"):
            assert np.isnan(out[nan_rows]).all() and np.isnan(lse[nan_rows]).all(), label
            assert np.isfinite(out[~nan_rows]).all(), label
            assert not np.isnan(lse[~nan_rows]).any(), label
        else:
            seen = sees[:, key]
            column = out[0, 2:4, :, 7]  # query heads 2 and 3 read kv head 1
            assert np.isnan(column[:, seen]).all(), label
            other_columns = np.delete(out, 7, axis=3)
            assert np.isfinite(other_columns[:, :, ~empty_rows]).all(), label
            assert np.isfinite(out[0, 0:2]).all(), label  # the other kv group
            assert not np.isnan(lse).any(), label  # lse does not read v
        # Rows that see no key: 0 and -inf whatever the NaN (none of their keys is read).
        if where != "v":
            assert (out[:, :, empty_rows] == 0).all() and np.isneginf(lse[:, :, empty_rows]).all()


@pytest.mark.parametrize("sq, sk", SHAPES)
def test_a_nan_in_v_reaches_other_rows_only_as_nan_in_its_column(backend, sq, sk):
    """The documented rule for rows that do not see key j: a NaN in v[b, g, j, d] may reach
    their column d (P V multiplies it by their probability 0, and 0 * NaN = NaN), but nothing
    else: each such element is NaN or the value it has without the NaN, and the other columns
    are untouched."""
    sees = reference.visible_keys(sq, sk, True)
    for library, dtype in kinds(backend):
        (q, k, v), _, key = _nan_problem(backend, library, dtype, sq, sk, "v")
        out, _ = run(q, k, v, causal=True)
        (cq, ck, cv), _, _ = _nan_problem(backend, library, dtype, sq, sk, None)
        clean, _ = run(cq, ck, cv, causal=True)
        unseen = ~sees[:, key]
        label = (library, dtype)
        column = out[0, 2:4, unseen, 7]  # query heads 2 and 3 read kv head 1
        leaked = np.isnan(column)
        np.testing.assert_array_equal(column[~leaked], clean[0, 2:4, unseen, 7][~leaked],
                                      err_msg=str(label))
        np.testing.assert_array_equal(np.delete(out, 7, axis=3), np.delete(clean, 7, axis=3),
                                      err_msg=str(label))


# ------------------------------------------------------------------------------ empty rows

@pytest.mark.parametrize("sq, sk", [(90, 70), (5, 0), (129, 1), (1, 0)])
def test_rows_that_see_no_key_give_zero_and_minus_inf(backend, sq, sk):
    sees = reference.visible_keys(sq, sk, True)
    empty = ~sees.any(axis=1)
    assert empty.any()
    rng = np.random.default_rng(4)
    for library, dtype in kinds(backend):
        (q, k, v), _ = make(backend, library, dtype, 100 * rng.standard_normal((2, 2, sq, 16)),
                            rng.standard_normal((2, 1, sk, 16)), rng.standard_normal((2, 1, sk, 16)))
        out, lse = run(q, k, v, causal=True)
        assert (out[:, :, empty] == 0).all() and not np.signbit(out[:, :, empty]).any()
        assert np.isneginf(lse[:, :, empty]).all()
        assert np.isfinite(out[:, :, ~empty]).all() and np.isfinite(lse[:, :, ~empty]).all()


# ---------------------------------------------------------------------------------- overflow

@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_outputs_at_the_dtype_maximum_round_to_inf_or_stay_but_never_wrap(backend, sign):
    """float16 (bfloat16 and float32 share the float32 accumulator's range: there, keep
    |v| * Sk below 3.4e38). v is 65504 everywhere, so the exact output is 65504; weights
    near 0.25 (the worst relative rounding of P in 16 bits) push rounding up. Allowed: the value
    within tolerance, or inf of the same sign. Never NaN, the other sign, or a small number."""
    rng = np.random.default_rng(5)
    sk = 257
    # One key at score 0 (P = 1), the rest near log(0.25) with jitter: many P just above 1/4.
    scores = np.log(0.25) + 1e-3 * rng.random(sk)
    scores[0] = 0.0
    q = np.zeros((1, 1, 8, 2))
    q[..., 0] = 1.0
    k = np.zeros((1, 1, sk, 2))
    k[0, 0, :, 0] = scores
    float16 = [(library, dtype) for library, dtype in kinds(backend) if dtype == "float16"]
    if not float16:
        pytest.skip("no float16 kind on this backend")
    for library, dtype in float16:
        want = sign * DTYPE_MAX[dtype]
        (cq, ck, cv), _ = make(backend, library, dtype, q, k, np.full((1, 1, sk, 2), want))
        out, lse = run(cq, ck, cv, scale=1.0)
        assert not np.isnan(out).any(), (library, dtype)
        finite = np.isfinite(out)
        assert (out[~finite] == np.copysign(np.inf, want)).all(), (library, dtype)
        np.testing.assert_allclose(out[finite], want, rtol=4e-3)
        assert np.isfinite(lse).all()
