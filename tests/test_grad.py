"""Gradients of xattn.attention (torch autograd), checked on every backend against the float64
gradient oracle, plus the tiled NumPy backward against the oracle in float64.

The backward kernels are reached the way users reach them: torch tensors that require grad,
torch.autograd.grad. Problems come from problems.py (awkward lengths, head dims, GQA ratios,
layouts, sliced/transposed/strided views with NaN padding), restricted to torch tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xattn
from xattn import reference
from conftest import Backend, finite_difference_grads, to_float64
from tolerances import TOLERANCES
from problems import EDGE_HEAD_DIMS, EDGE_LENGTHS, MEMORY, Problem, present, problems, to_bhsd

torch = pytest.importorskip("torch")

EXAMPLES = 12

# Bounds on ‖g - g_exact‖ / ‖|terms|‖. The denominator is the norm of the gradient computed with
# every term of every sum in absolute value (error_scales below): rounding error is proportional
# to that, not to ‖g_exact‖, which cancellation can make arbitrarily small (dS = P ∘ (dP - delta)
# cancels whenever the softmax is peaky; Sk = 1 makes dQ exactly 0). Where nothing cancels, the
# two norms are equal. The bound has two parts:
#  * GRAD_TOLERANCE[dtype], ~8 units of roundoff u of the dtype (tests/tolerances.py, "grad").
#  * SCORE_ROUNDING * max|S|: P = exp(S - lse) is recomputed from S and the lse held in float32
#    (the lse by contract, for float64 inputs too), whose absolute rounding 2^-24 * |S| becomes
#    a relative error of P; 8 * 2^-24 allows for S, lse and the exp. Scores reach ~100 here.
GRAD_TOLERANCE = TOLERANCES["grad"]
SCORE_ROUNDING = 8 * 2.0**-24


def grad_kinds(backend: Backend) -> tuple:
    """The (library, dtype) pairs of `backend` that have autograd: torch tensors only."""
    kinds = tuple(kind for kind in backend.kinds if kind[0] == "torch")
    if backend.name == "reference" and kinds:
        kinds += (("torch", "float64"),)
    if not kinds:
        pytest.skip(f"{backend.name}: no torch tensors to differentiate here")
    return kinds


def effective_scale(problem: Problem) -> float:
    return 1 / math.sqrt(problem.q.shape[-1]) if problem.scale is None else problem.scale


def run_grad(backend, problem: Problem, *, dout=None, dout_memory="contiguous",
             deterministic=False, **arrays):
    """Gradients of sum(attention(q, k, v) * dout) on the backend.

    Returns ((dq, dk, dv), (q, k, v), dout), all float64 (B, H, S, D) NumPy arrays holding
    exactly the values the backend saw (inputs rounded to the problem's dtype).
    """
    q, k, v = problem.arrays(backend, **arrays)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = xattn.attention(q, k, v, **problem.kwargs(), deterministic=deterministic)
    assert out.requires_grad and out.shape == q.shape and out.dtype == q.dtype
    if dout is None:
        dout = np.random.default_rng(problem.q.size).standard_normal(problem.q.shape)
    dout_t = present(backend, dout, problem.layout, problem.library, problem.dtype, dout_memory)
    grads = torch.autograd.grad(out, (q, k, v), dout_t)
    for grad, x in zip(grads, (q, k, v)):
        assert grad.shape == x.shape and grad.dtype == x.dtype and grad.device == x.device
    seen = tuple(to_bhsd(to_float64(x), problem.layout) for x in (q, k, v, dout_t))
    return tuple(to_bhsd(to_float64(g), problem.layout) for g in grads), seen[:3], seen[3]


def error_scales(q, k, v, dout, *, causal, scale, **variant):
    """((dq, dk, dv) computed with |terms| everywhere, max |S| over visible scores).

    The first are elementwise upper bounds on the exact gradients and the scale of their
    rounding errors, zero exactly where nothing contributes. variant: window, softcap,
    alibi_slopes, as the oracle takes them (the softcap's factor 1 - t^2 <= 1 is bounded by 1)."""
    batch, q_heads, sq, head_dim = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    k_rep, v_rep = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    visible = reference.visible_keys(sq, sk, causal, variant.get("window", reference.UNBOUNDED))
    scores = scale * (q @ k_rep.swapaxes(-1, -2))
    largest_score = np.abs(scores[..., visible]).max(initial=0.0)
    reference.modify_scores(scores, softcap=variant.get("softcap", 0.0), sq=sq, sk=sk,
                            slopes=reference.slopes_bh(variant.get("alibi_slopes"), batch, q_heads))
    _, lse = reference.exact_attention_bhsd(q, k, v, causal=causal, scale=scale, **variant)
    p = np.exp(np.where(visible, scores, -np.inf)
               - np.where(np.isneginf(lse), np.inf, lse)[..., None])
    abs_dp = np.abs(dout) @ np.abs(v_rep).swapaxes(-1, -2)
    abs_ds = p * (abs_dp + (p * abs_dp).sum(axis=-1, keepdims=True))
    dq = scale * (abs_ds @ np.abs(k_rep))
    dk = scale * (abs_ds.swapaxes(-1, -2) @ np.abs(q))
    dv = p.swapaxes(-1, -2) @ np.abs(dout)
    fold = (batch, kv_heads, group, sk, head_dim)
    return (dq, dk.reshape(fold).sum(axis=2), dv.reshape(fold).sum(axis=2)), largest_score


def tolerance_for(dtype, largest_score):
    return GRAD_TOLERANCE[dtype] + SCORE_ROUNDING * largest_score


def assert_grads_match(got, want, magnitudes, tolerance, what=""):
    for name, g, w, m in zip(("dq", "dk", "dv"), got, want, magnitudes):
        assert g.shape == w.shape, f"{name}{what}: shape {g.shape}, expected {w.shape}"
        assert not np.isnan(g).any(), f"{name}{what}: NaN"
        assert (g[m == 0] == 0).all(), f"{name}{what}: nonzero where nothing contributes"
        error, size = np.linalg.norm(g - w), np.linalg.norm(m)
        assert error <= tolerance * size, (
            f"{name}{what}: error {error / size:.3e} of the terms' magnitude, above "
            f"{tolerance:.1e}")


def check_against_oracle(backend, problem: Problem, **options):
    got, (q, k, v), dout = run_grad(backend, problem, **options)
    scale = effective_scale(problem)
    want = reference.exact_attention_grad_bhsd(q, k, v, dout, causal=problem.causal,
                                               scale=scale)
    magnitudes, largest_score = error_scales(q, k, v, dout, causal=problem.causal, scale=scale)
    assert_grads_match(got, want, magnitudes, tolerance_for(problem.dtype, largest_score),
                       f" ({problem.dtype})")


# ---------------------------------------------------------------- every backend, via autograd

@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_gradients_match_exact_oracle(backend, data):
    problem = data.draw(problems(backend, kinds=grad_kinds(backend)))
    check_against_oracle(backend, problem, dout_memory=data.draw(st.sampled_from(MEMORY)))


@pytest.mark.parametrize("sq, sk", [(a, b) for a in EDGE_LENGTHS for b in EDGE_LENGTHS
                                    if a and b and (a == b or {a, b} <= {1, 64, 65, 129, 200})])
def test_gradient_edge_lengths_and_head_dims(backend, sq, sk):
    """Edge lengths (block sizes, block + 1, 1) with edge head dims and GQA 7:1 cycling."""
    kinds = grad_kinds(backend)
    index = EDGE_LENGTHS.index(sq) * len(EDGE_LENGTHS) + EDGE_LENGTHS.index(sk)
    head_dim = EDGE_HEAD_DIMS[index % len(EDGE_HEAD_DIMS)]
    library, dtype = kinds[index % len(kinds)]
    rng = np.random.default_rng(index)
    problem = Problem(
        q=rng.standard_normal((1, 7, sq, head_dim)), k=rng.standard_normal((1, 1, sk, head_dim)),
        v=rng.standard_normal((1, 1, sk, head_dim)), causal=index % 2 == 0, scale=None,
        layout=("bhsd", "bshd")[index // 2 % 2], library=library, dtype=dtype,
        memory=("sliced", "transposed", "contiguous"))
    check_against_oracle(backend, problem, dout_memory=MEMORY[index % len(MEMORY)])


@pytest.mark.parametrize("batch, q_heads, sq, sk", [(0, 2, 5, 5), (1, 0, 5, 5), (2, 2, 0, 5),
                                                   (2, 2, 5, 0), (1, 2, 9, 3)])
def test_empty_problems_and_keyless_rows_give_zero_gradients(backend, batch, q_heads, sq, sk):
    """Zero sizes and causal Sq > Sk: gradients exist, are 0 where nothing flows, never NaN."""
    library, dtype = grad_kinds(backend)[0]
    rng = np.random.default_rng(0)
    problem = Problem(q=rng.standard_normal((batch, q_heads, sq, 8)),
                      k=rng.standard_normal((batch, 1, sk, 8)),
                      v=rng.standard_normal((batch, 1, sk, 8)), causal=True, scale=None,
                      layout="bhsd", library=library, dtype=dtype, memory=("contiguous",) * 3)
    (dq, dk, dv), _, _ = run_grad(backend, problem)
    assert not any(np.isnan(g).any() for g in (dq, dk, dv))
    keyless = ~reference.visible_keys(sq, sk, causal=True).any(axis=1)
    assert (dq[:, :, keyless] == 0).all()
    if batch == 0 or q_heads == 0 or sq == 0 or sk == 0:
        assert not any(g.any() for g in (dq, dk, dv))
    check_against_oracle(backend, problem)


@settings(max_examples=EXAMPLES // 2)
@given(data=st.data())
def test_gqa_gradients_equal_repeated_kv_gradients_summed(backend, data):
    """dK, dV of a shared key head = the sum of the dK, dV its query heads get from their own
    copies; and the same data in the other layout gives the same gradients."""
    problem = data.draw(problems(backend, kinds=grad_kinds(backend)))
    kv_heads = problem.k.shape[1]
    group = problem.q.shape[1] // kv_heads
    dout = np.random.default_rng(1).standard_normal(problem.q.shape)
    (dq, dk, dv), seen, seen_dout = run_grad(backend, problem, dout=dout)
    repeated = problem.with_(k=np.repeat(problem.k, group, axis=1),
                             v=np.repeat(problem.v, group, axis=1))
    (dq_r, dk_r, dv_r), _, _ = run_grad(backend, repeated, dout=dout)
    fold = (dk.shape[0], kv_heads, group) + dk.shape[2:]
    other = problem.with_(layout="bshd" if problem.layout == "bhsd" else "bhsd")
    other_grads, _, _ = run_grad(backend, other, dout=dout)
    # Each side is within GRAD_TOLERANCE of the exact gradient (relative to the magnitudes of
    # the GQA problem, which are the sums of the repeated problem's), so they are within twice
    # that of each other.
    magnitudes, largest_score = error_scales(*seen, seen_dout, causal=problem.causal,
                                             scale=effective_scale(problem))
    tolerance = 2 * tolerance_for(problem.dtype, largest_score)
    summed = (dq_r, dk_r.reshape(fold).sum(axis=2), dv_r.reshape(fold).sum(axis=2))
    assert_grads_match(summed, (dq, dk, dv), magnitudes, tolerance, " (repeated K/V, summed)")
    assert_grads_match(other_grads, (dq, dk, dv), magnitudes, tolerance, " (other layout)")


def test_deterministic_gradients_are_bitwise_reproducible(backend):
    """deterministic=True: the same inputs give bit-identical gradients, run after run.
    Long enough for many key blocks to add into each dQ row (where atomics would race)."""
    library, dtype = grad_kinds(backend)[0]
    sq, sk = (300, 500) if backend.name == "reference" else (3000, 5000)
    rng = np.random.default_rng(7)
    problem = Problem(q=rng.standard_normal((2, 8, sq, 64)), k=rng.standard_normal((2, 2, sk, 64)),
                      v=rng.standard_normal((2, 2, sk, 64)), causal=True, scale=None,
                      layout="bshd", library=library, dtype=dtype, memory=("contiguous",) * 3)
    first, _, _ = run_grad(backend, problem, deterministic=True)
    for _ in range(2):
        again, _, _ = run_grad(backend, problem, deterministic=True)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert np.array_equal(a, b), f"{name} differs between identical runs"


# ------------------------------------------------------------------ the autograd interface

def _leaves(shape_q=(1, 2, 9, 8), shape_kv=(1, 1, 11, 8), dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=generator, dtype=dtype).requires_grad_()
                 for s in (shape_q, shape_kv, shape_kv))


def test_lse_is_returned_and_not_differentiable():
    q, k, v = _leaves()
    out, lse = xattn.attention(q, k, v, causal=True, return_lse=True)
    assert out.requires_grad and not lse.requires_grad and lse.dtype == torch.float32
    (out.sum() + lse.sum()).backward()  # lse contributes nothing, and does not break backward
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    xattn.attention(q2, k2, v2, causal=True).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.equal(a.grad, b.grad)


def test_only_inputs_that_require_grad_get_gradients():
    q, k, v = _leaves()
    k.requires_grad_(False)
    xattn.attention(q, k, v).square().sum().backward()
    assert q.grad is not None and v.grad is not None and k.grad is None


def test_plain_path_when_no_gradient_is_needed(monkeypatch):
    """No input requires grad, or grad mode is off: the op is skipped (cheaper per call)."""
    from xattn import torch_ops

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op was used without autograd")
    monkeypatch.setattr(torch_ops, "attention", refuse)
    q, k, v = _leaves()
    with torch.no_grad():
        assert xattn.attention(q, k, v).grad_fn is None
    assert xattn.attention(*(x.detach() for x in (q, k, v))).grad_fn is None
    with pytest.raises(AssertionError, match="custom op"):
        xattn.attention(q, k, v)


def test_deterministic_must_be_a_bool():
    q, k, v = _leaves()
    with pytest.raises(TypeError, match=r"deterministic: expected a bool, got 'yes'"):
        xattn.attention(q, k, v, deterministic="yes")


# ------------------------------------------------------------- the tiled reference algorithm

@settings(max_examples=25)
@given(data=st.data(), block_m=st.sampled_from((1, 16, 64, 128)),
       block_n=st.sampled_from((1, 16, 64, 256)))
def test_tiled_backward_equals_exact_in_float64(data, block_m, block_n):
    """The NumPy FlashAttention-2 backward agrees with the oracle, any tiling, every element
    written (destinations poisoned with NaN). All in float64, the lse included."""
    host = Backend("reference", (("numpy", "float64"),))
    problem = data.draw(problems(host))
    q, k, v = (to_bhsd(x, problem.layout) for x in problem.arrays(host))
    scale = effective_scale(problem)
    out, lse = reference.exact_attention_bhsd(q, k, v, causal=problem.causal, scale=scale)
    dout = np.random.default_rng(3).standard_normal(q.shape)
    grads = tuple(np.full(x.shape, np.nan) for x in (q, k, v))
    reference.flash_attention_backward(q, k, v, out, dout, lse, causal=problem.causal,
                                       scale=scale, dq=grads[0], dk=grads[1], dv=grads[2],
                                       block_m=block_m, block_n=block_n)
    want = reference.exact_attention_grad_bhsd(q, k, v, dout, causal=problem.causal,
                                               scale=scale)
    magnitudes, _ = error_scales(q, k, v, dout, causal=problem.causal, scale=scale)
    assert_grads_match(grads, want, magnitudes, GRAD_TOLERANCE["float64"])


def test_tiled_backward_bounds_tile_memory(monkeypatch):
    """Many heads are processed in chunks; results do not depend on the chunking."""
    rng = np.random.default_rng(1)
    q, k, v, dout = (rng.standard_normal(s) for s in ((3, 6, 70, 5), (3, 2, 90, 5),
                                                      (3, 2, 90, 5), (3, 6, 70, 5)))
    out, lse = reference.exact_attention_bhsd(q, k, v, causal=True, scale=0.5)
    whole = reference.flash_attention_backward(q, k, v, out, dout, lse, causal=True, scale=0.5)
    monkeypatch.setattr(reference, "TILE_ELEMENTS", 1)
    chunked = reference.flash_attention_backward(q, k, v, out, dout, lse, causal=True,
                                                 scale=0.5, block_m=16, block_n=16)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


def test_gradient_oracle_matches_finite_differences():
    """The oracle against central differences of the forward oracle, every element."""
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((1, 2, 7, 3)), rng.standard_normal((1, 2, 7, 3))
    for causal, sq in ((False, 5), (True, 5), (True, 9)):
        q_now, dout_now = rng.standard_normal((1, 4, sq, 3)), rng.standard_normal((1, 4, sq, 3))
        inputs = [q_now, k, v]
        grads = reference.exact_attention_grad_bhsd(*inputs, dout_now, causal=causal, scale=0.7)

        def loss(q_, k_, v_):
            out, _ = reference.exact_attention_bhsd(q_, k_, v_, causal=causal, scale=0.7)
            return (out * dout_now).sum()
        for grad, numeric in zip(grads, finite_difference_grads(loss, inputs)):
            np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)



# ------------------------------------------------- the cuda backward kernels, called directly

BACKWARD_SIZES = [  # (B, Hq, Hk, Sq, Sk, D, causal); empty problems never reach the kernels
    (1, 2, 1, 1, 1, 1, False), (2, 7, 1, 65, 129, 63, True), (1, 4, 2, 200, 64, 128, True),
    (1, 2, 2, 64, 200, 256, True), (2, 2, 1, 127, 127, 80, False), (1, 1, 1, 129, 63, 200, True),
    (1, 8, 2, 1000, 1500, 64, True), (2, 4, 4, 300, 300, 96, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("size", BACKWARD_SIZES, ids=str)
def test_cuda_backward_writes_every_element(cuda_backend, size, deterministic):
    """xattn.cuda.backward on (B, H, S, D) torch tensors, dq/dk/dv poisoned with NaN."""
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from xattn import cuda
    batch, q_heads, kv_heads, sq, sk, head_dim, causal = size
    scale = 1 / math.sqrt(head_dim)
    rng = np.random.default_rng(sum(size))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, k, v, dout = (torch.from_numpy(rng.standard_normal(s)).to("cuda", dtype) for s in (
            (batch, q_heads, sq, head_dim), (batch, kv_heads, sk, head_dim),
            (batch, kv_heads, sk, head_dim), (batch, q_heads, sq, head_dim)))
        out, lse = xattn.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
        grads = tuple(torch.full_like(x, float("nan")) for x in (q, k, v))
        cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=scale,
                      deterministic=deterministic,
                      stream=torch.cuda.current_stream().cuda_stream)
        seen = tuple(to_float64(x) for x in (q, k, v, dout))
        want = reference.exact_attention_grad_bhsd(*seen, causal=causal, scale=scale)
        magnitudes, largest_score = error_scales(*seen, causal=causal, scale=scale)
        name = str(dtype).removeprefix("torch.")
        assert_grads_match(tuple(to_float64(g) for g in grads), want, magnitudes,
                           tolerance_for(name, largest_score), f" ({name})")
