"""GPU-only checks: the cuda backend's forward called directly with poisoned outputs, streams,
array types in and out. The shared properties run on the GPU through test_properties.py."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

import xattn
from conftest import LSE_TOLERANCE, TOLERANCE, to_float64

pytestmark = pytest.mark.gpu

SIZES = [  # (B, Hq, Hk, Sq, Sk, D, causal)
    (1, 2, 1, 1, 1, 1, False), (2, 7, 1, 65, 129, 63, True), (1, 4, 2, 200, 64, 128, True),
    (1, 2, 2, 64, 200, 256, True), (2, 2, 1, 127, 127, 80, False), (1, 3, 3, 5, 0, 32, False),
    (1, 2, 1, 0, 9, 64, True), (0, 2, 1, 4, 4, 64, False), (1, 1, 1, 129, 63, 200, True),
]
TORCH_ONLY = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="torch is not installed")


def _direct_forward_case(cuda_backend, library, dtype, size):
    from xattn import cuda
    batch, q_heads, kv_heads, sq, sk, head_dim, causal = size
    rng = np.random.default_rng(sum(size))
    q, k, v = (cuda_backend.make(rng.standard_normal(s), library, dtype) for s in (
        (batch, q_heads, sq, head_dim), (batch, kv_heads, sk, head_dim),
        (batch, kv_heads, sk, head_dim)))
    # Poison: every element of out and lse must be written by forward.
    out = cuda_backend.make(np.full((batch, q_heads, sq, head_dim), np.nan), library, dtype)
    lse = cuda_backend.make(np.full((batch, q_heads, sq), np.nan), library, "float32")
    scale = 1 / math.sqrt(head_dim)
    if library == "torch":
        import torch
        stream = torch.cuda.current_stream().cuda_stream
    else:
        import cupy
        stream = cupy.cuda.get_current_stream().ptr
    cuda.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream)
    got_out, got_lse = to_float64(out), to_float64(lse)
    want_out, want_lse = xattn.exact_attention(q, k, v, causal=causal, scale=scale)
    assert not np.isnan(got_out).any() and not np.isnan(got_lse).any(), "unwritten elements"
    empty = np.isneginf(want_lse)
    np.testing.assert_array_equal(np.isneginf(got_lse), empty)
    assert (got_out[empty] == 0).all()
    if want_out.size and np.linalg.norm(want_out):
        error = np.linalg.norm(got_out - want_out) / np.linalg.norm(want_out)
        assert error <= TOLERANCE[dtype], f"relative error {error:.2e}"
        np.testing.assert_allclose(got_lse[~empty], want_lse[~empty],
                                   rtol=LSE_TOLERANCE[dtype], atol=LSE_TOLERANCE[dtype])


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_forward_writes_every_element(cuda_backend, size):
    for library, dtype in cuda_backend.kinds:
        _direct_forward_case(cuda_backend, library, dtype, size)


def test_float64_is_rejected_by_the_cuda_backend(cuda_backend):
    library = cuda_backend.kinds[0][0]
    q = cuda_backend.make(np.ones((1, 1, 4, 8)), library, "float64")
    with pytest.raises(TypeError, match=r"q: expected dtype float16, bfloat16, float32 "
                                        r"for the cuda backend, got float64"):
        xattn.attention(q, q, q)


def test_reference_backend_refuses_gpu_arrays(cuda_backend):
    library = cuda_backend.kinds[0][0]
    q = cuda_backend.make(np.ones((1, 1, 4, 8)), library, "float32")
    with pytest.raises(ValueError, match=r"backend: .*cuda:0.*got 'reference'"):
        xattn.attention(q, q, q, backend="reference")


@TORCH_ONLY
def test_torch_launches_on_the_current_stream(cuda_backend):
    import torch
    rng = np.random.default_rng(5)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 8, 1024, 64))).cuda().half()
               for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = xattn.attention(q, k, v, causal=True)
        out.mul_(1.0)  # work queued behind the kernel on the same stream
    side.synchronize()
    want, _ = xattn.exact_attention(q, k, v, causal=True)
    error = np.linalg.norm(out.double().cpu().numpy() - want) / np.linalg.norm(want)
    assert error <= TOLERANCE["float16"]


@TORCH_ONLY
def test_torch_tensors_requiring_grad_are_accepted(cuda_backend):
    import torch
    q = torch.randn(1, 2, 16, 32, device="cuda", requires_grad=True)
    out = xattn.attention(q, q.detach(), q.detach())
    assert out.shape == q.shape and out.device == q.device


def test_jax_arrays_come_back_as_jax_arrays(cuda_backend):
    jnp = pytest.importorskip("jax.numpy")
    import jax
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX has no GPU here")
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 4, 70, 64)), dtype=jnp.float16)
               for _ in range(3))
    out = xattn.attention(q, k, v, causal=True)
    assert isinstance(out, jax.Array) and out.dtype == q.dtype and out.shape == q.shape
    want, _ = xattn.exact_attention(q, k, v, causal=True)
    error = np.linalg.norm(np.asarray(out, dtype=np.float64) - want) / np.linalg.norm(want)
    assert error <= TOLERANCE["float16"]
