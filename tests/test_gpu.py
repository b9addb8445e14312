"""GPU-only checks of the cuda backend: dtypes it refuses, streams, array types in and out.
The shared properties, the forward called directly with poisoned outputs included, run on the GPU
through test_properties.py's `backend` fixture."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import xattn
from conftest import TOLERANCE

pytestmark = pytest.mark.gpu

TORCH_ONLY = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="torch is not installed")


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
