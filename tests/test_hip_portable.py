"""The portable HIP kernels on an NVIDIA GPU: what the shared properties do not cover.

conftest.py's `backend` fixture has two paths for them, "hip-on-cuda" (forward and backward with
the wave32 rows of RDNA, gfx1030) and "hip-on-cuda-wave64" (the backward with the wave64 rows of
gfx906: GCN/CDNA without MFMA, the rows CDNA uses for float32 and head dims past 128; the
forward's wave64 rows run in test_every_forward_row_runs): the
kernels are compiled by NVRTC with the test-only tests/hip_on_cuda.h in front and launched by
xattn.hip's own launch code (the hook xattn.hip.on_cuda). Every property file runs on them
through that fixture (forward, gradients, variants, poisoned outputs). Here: every tile row of
the table runs once, and the backward called directly with NaN-poisoned gradients in padded and
(B, S, H, D) memory. What cannot run here: the MFMA kernels, hiprtc itself.

    PYTHONPATH=. python -m pytest -m gpu tests/test_hip_portable.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import xattn
from conftest import (HIP_ON_CUDA, HIP_ON_CUDA_TARGETS, LSE_TOLERANCE, TOLERANCE, WAVE32_TARGET,
                      WAVE64_TARGET, _hip_on_cuda_skip_reason, to_float64)
from test_hip_sources import HIP_ON_CUDA_OPTIONS
from test_properties import FORWARD_SIZES
from xattn import configs, hip, reference

pytestmark = pytest.mark.gpu


def grad_checks():
    """test_grad.py's gradient comparison (it needs torch; the forward tests here do not)."""
    test_grad = pytest.importorskip("test_grad", reason="torch is not installed")
    return test_grad.assert_grads_match, test_grad.error_scales, test_grad.tolerance_for


@pytest.fixture
def portable(backend):
    """The fixture's HIP-on-CUDA paths only: (backend, backward target)."""
    if backend.name not in HIP_ON_CUDA_TARGETS:
        pytest.skip(f"the portable HIP kernels on NVIDIA only, not {backend.name!r}")
    return backend, HIP_ON_CUDA_TARGETS[backend.name][1]


@pytest.mark.parametrize("target", [WAVE32_TARGET, WAVE64_TARGET])
def test_every_forward_row_runs(target):
    """One call per portable forward row of the target's family and per dtype, so every tile
    shape of the table has run once: RDNA's wave32 rows, and gfx9's wave64 rows, whose waves are
    two NVIDIA warps meeting at a named barrier (tests/hip_on_cuda.h: wave_barrier). Its own
    hip.on_cuda: the fixture's paths run the forward in wave32 only (the decode has no wave64
    form on NVIDIA)."""
    reason = _hip_on_cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    import cupy

    family = configs.hip_family("flash_fwd_portable", target)
    rng = np.random.default_rng(7)
    with hip.on_cuda(prefix=HIP_ON_CUDA.read_text(), options=tuple(HIP_ON_CUDA_OPTIONS),
                     forward_target=target, backward_target=target):
        for cfg in (r for r in configs.HIP_TABLE if r.kernel == "flash_fwd_portable" and r.arch == family):
            head_dim = cfg.head_dim - 3  # padded columns masked
            for dtype in ("float16", "float32"):
                q, k, v = (cupy.asarray(rng.standard_normal((1, 2, 77, head_dim))).astype(dtype)
                           for _ in range(3))
                out = cupy.full(q.shape, np.nan, dtype=dtype)
                lse = cupy.full((1, 2, 77), np.nan, dtype="float32")
                hip.forward(q, k, v, out, lse, causal=True, scale=0.3,
                            stream=cupy.cuda.get_current_stream().ptr)
                want, want_lse = xattn.exact_attention(q, k, v, causal=True, scale=0.3)
                error = np.linalg.norm(to_float64(out) - want) / np.linalg.norm(want)
                assert error <= TOLERANCE[dtype], f"{cfg} {dtype}: relative error {error:.2e}"
                np.testing.assert_allclose(to_float64(lse), want_lse, rtol=LSE_TOLERANCE[dtype],
                                           atol=LSE_TOLERANCE[dtype], err_msg=f"{cfg} {dtype}")


# ---- the backward, called directly --------------------------------------------------------------

BACKWARD_SIZES = FORWARD_SIZES + [  # (B, Hq, Hk, Sq, Sk, D, causal): block + 1 of the rows, Sq > Sk, Sq < Sk
    (1, 4, 4, 33, 17, 33, True), (2, 6, 3, 17, 65, 64, True), (1, 2, 1, 1, 200, 1, True),
    (1, 2, 2, 300, 40, 129, False), (1, 8, 1, 9, 9, 256, True),
]
MEMORY_KINDS = ("contiguous", "padded", "bshd")


def _place(backend, data, library, dtype, memory):
    """data (B, H, S, D) as a `memory` view: contiguous; a slice of a NaN-filled buffer with 3 more
    columns (row stride D + 3); or the (B, H, S, D) view of a (B, S, H, D) buffer."""
    if memory == "padded":
        base = np.full(data.shape[:3] + (data.shape[3] + 3,), np.nan)
        base[..., :data.shape[3]] = data
        return backend.make(base, library, dtype)[..., :data.shape[3]]
    if memory == "bshd":
        return _swap_heads_and_rows(backend.make(np.ascontiguousarray(data.transpose(0, 2, 1, 3)),
                                                 library, dtype))
    return backend.make(data, library, dtype)


def _swap_heads_and_rows(x):
    return x.transpose(1, 2) if hasattr(x, "data_ptr") else x.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("size", BACKWARD_SIZES, ids=str)
def test_backward_writes_every_element(portable, size):
    """Direct calls with NaN-poisoned gradients, in contiguous, padded and (B, S, H, D) memory:
    every element of dq, dk, dv is written, nothing past them is (the padding stays NaN), and
    the gradients match the float64 oracle (tolerances of test_grad.py)."""
    backend, target = portable
    assert_grads_match, error_scales, tolerance_for = grad_checks()
    batch, q_heads, kv_heads, sq, sk, head_dim, causal = size
    rng = np.random.default_rng(sum(size))
    for index, (library, dtype) in enumerate(backend.kinds):
        memory = MEMORY_KINDS[index % len(MEMORY_KINDS)]
        shapes = [(batch, q_heads, sq, head_dim), (batch, kv_heads, sk, head_dim),
                  (batch, kv_heads, sk, head_dim), (batch, q_heads, sq, head_dim)]
        q, k, v, dout = (_place(backend, rng.standard_normal(s), library, dtype, memory) for s in shapes)
        scale = 1 / math.sqrt(head_dim)
        out = backend.make(np.zeros(shapes[0]), library, dtype)
        lse = backend.make(np.full((batch, q_heads, sq), -np.inf), library, "float32")
        if sk:
            backend.forward_into(q, k, v, out, lse, causal=causal, scale=scale)
        dq, dk, dv = (_place(backend, np.full(s, np.nan), library, dtype, memory) for s in shapes[:3])
        backend.backward_into(q, k, v, out, dout, lse, dq, dk, dv, causal=causal, scale=scale)

        seen = [to_float64(x) for x in (q, k, v, dout)]
        got = [to_float64(g) for g in (dq, dk, dv)]
        want = reference.exact_attention_grad_bhsd(*seen, causal=causal, scale=scale)
        magnitudes, largest = error_scales(*seen, causal=causal, scale=scale)
        assert_grads_match(got, want, magnitudes, tolerance_for(dtype, largest),
                           f" ({library} {dtype}, {memory}, {target})")
        if memory == "padded":  # the columns past D belong to someone else
            for g in (dq, dk, dv):
                base = g._base if hasattr(g, "_base") and g._base is not None else g.base
                assert np.isnan(to_float64(base)[..., head_dim:]).all(), "wrote past the last column"


def test_every_backward_row_runs(portable):
    """One call per portable backward row of the fixture's wave size and per dtype, so every
    tile shape of the table has run once; head dim 3 below the row's (padded columns masked)."""
    import cupy

    backend, target = portable
    assert_grads_match, error_scales, tolerance_for = grad_checks()
    family = configs.hip_family("flash_bwd_portable_dq", target)
    rng = np.random.default_rng(11)
    for head_dim in sorted({r.head_dim for r in configs.HIP_TABLE
                            if r.arch == family and r.kernel.startswith("flash_bwd_portable")}):
        head_dim -= 3
        for dtype in ("float16", "float32"):
            q, k, v, dout = (cupy.asarray(rng.standard_normal((1, 4, 77, head_dim))).astype(dtype)
                             for _ in range(4))
            k, v = k[:, :2], v[:, :2]  # GQA 2:1
            out = cupy.empty_like(q)
            lse = cupy.empty((1, 4, 77), dtype="float32")
            backend.forward_into(q, k, v, out, lse, causal=True, scale=0.3)
            grads = [cupy.full(x.shape, np.nan, dtype=dtype) for x in (q, k, v)]
            backend.backward_into(q, k, v, out, dout, lse, *grads, causal=True, scale=0.3,
                                  deterministic=True)
            seen = [to_float64(x) for x in (q, k, v, dout)]
            want = reference.exact_attention_grad_bhsd(*seen, causal=True, scale=0.3)
            magnitudes, largest = error_scales(*seen, causal=True, scale=0.3)
            assert_grads_match([to_float64(g) for g in grads], want, magnitudes,
                               tolerance_for(dtype, largest), f" ({target} D{head_dim} {dtype})")
