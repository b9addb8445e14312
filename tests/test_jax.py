"""JAX arrays in, JAX arrays out (xattn.arrays' DLPack path).

CPU (wherever `jax` imports): JAX CPU arrays run the reference backend and come back as JAX
arrays on the same device and in the same dtype, equal to the float64 oracle; the inputs reach
the backend without a copy. GPU (`gpu` marker, JAX with CUDA and a usable cuda backend): the
inputs reach the kernel and the output leaves it without a copy (the pointers are compared),
and the work is ordered with JAX's asynchronous dispatch on both sides — inputs still being
computed by JAX when xattn is called, the result consumed by JAX right away, also from a
non-default CuPy stream.

xattn is not a JAX primitive: it runs eagerly on concrete arrays; inside jax.jit it gets
tracers and says so (TypeError naming q).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# JAX takes 75% of GPU memory at its first GPU use unless told not to; the rest of the suite
# shares the process (and the GPU) with it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

jax = pytest.importorskip("jax", reason="jax is not installed (pip install jax)")
jnp = pytest.importorskip("jax.numpy")

import xattn  # noqa: E402
from tolerances import TOLERANCES  # noqa: E402
from xattn import backends, reference  # noqa: E402

TOLERANCE = TOLERANCES["out"]


def rel_error(got, want) -> float:
    got = np.asarray(jnp.asarray(got, dtype=jnp.float32), dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def make(shape, dtype, seed, device=None):
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jax.device_put(jnp.asarray(data, dtype=dtype), device)


def pointer(array) -> int:
    return array.unsafe_buffer_pointer()


# ------------------------------------------------------------------------------------ CPU

CPU = jax.devices("cpu")[0]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cpu_jax_arrays_come_back_as_jax_arrays(dtype, layout):
    q_shape, kv_shape = (2, 4, 33, 16), (2, 2, 40, 16)  # GQA, Sq != Sk
    if layout == "bshd":
        q_shape, kv_shape = (2, 33, 4, 16), (2, 40, 2, 16)
    q, k, v = (make(s, dtype, i, CPU) for i, s in enumerate((q_shape, kv_shape, kv_shape)))
    out, lse = xattn.attention(q, k, v, causal=True, layout=layout, return_lse=True)
    assert isinstance(out, jax.Array) and isinstance(lse, jax.Array)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (2, 4, 33)
    assert out.devices() == {CPU}
    want_out, want_lse = xattn.exact_attention(q, k, v, causal=True, layout=layout)
    assert rel_error(out, want_out) <= TOLERANCE[dtype]
    assert rel_error(lse, want_lse) <= TOLERANCE[dtype]


def test_cpu_inputs_reach_the_reference_without_a_copy(monkeypatch):
    seen = {}
    forward = reference.flash_attention_forward

    def recording(q, k, v, **kwargs):
        seen.update(q=q.ctypes.data, k=k.ctypes.data, v=v.ctypes.data)
        return forward(q, k, v, **kwargs)

    monkeypatch.setattr(reference, "flash_attention_forward", recording)
    q, k, v = (make((1, 2, 20, 8), "float32", i, CPU) for i in range(3))
    out = xattn.attention(q, k, v)
    assert seen == {"q": pointer(q), "k": pointer(k), "v": pointer(v)}
    assert rel_error(out, xattn.exact_attention(q, k, v)[0]) <= TOLERANCE["float32"]


def test_inside_jit_xattn_says_it_needs_concrete_arrays():
    q = make((1, 1, 4, 8), "float32", 0, CPU)
    with pytest.raises(TypeError, match=r"^q: expected an array .* got .*Tracer"):
        jax.jit(lambda x: xattn.attention(x, x, x))(q)


# ------------------------------------------------------------------------------------ GPU

def _jax_gpu():
    try:
        devices = jax.devices("gpu")
    except RuntimeError as error:
        pytest.skip(f"JAX has no GPU here ({error})")
    usable, why = backends.backend_status("cuda")
    if not usable:
        pytest.skip(f"cuda backend unusable: {why}")
    return devices[0]


def _recording_forward(monkeypatch):
    """Wrap the cuda forward so the test sees the arrays the kernel was given."""
    seen = {}
    forward = backends.gpu_forward("cuda")

    def recording(q, k, v, out, lse, **kwargs):
        seen.update(q=q.data.ptr, k=k.data.ptr, v=v.data.ptr, out=out.data.ptr,
                    lse=lse.data.ptr, stream=kwargs["stream"])
        return forward(q, k, v, out, lse, **kwargs)

    monkeypatch.setattr(backends, "gpu_forward", lambda name: recording)
    return seen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_gpu_zero_copy_both_ways(dtype, monkeypatch):
    gpu = _jax_gpu()
    seen = _recording_forward(monkeypatch)
    q = make((2, 8, 130, 64), dtype, 0, gpu)
    k, v = (make((2, 2, 130, 64), dtype, i, gpu) for i in (1, 2))
    out, lse = xattn.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, jax.Array) and out.devices() == {gpu} and out.dtype == q.dtype
    # In: the kernel read JAX's own buffers. Out: JAX's result is the buffer the kernel wrote.
    assert (seen["q"], seen["k"], seen["v"]) == (pointer(q), pointer(k), pointer(v))
    assert pointer(out) == seen["out"] and pointer(lse) == seen["lse"]
    want, _ = xattn.exact_attention(q, k, v, causal=True)
    assert rel_error(out, want) <= TOLERANCE[dtype]


@pytest.mark.gpu
def test_gpu_ordering_with_jax_async_dispatch():
    """q is produced by a JAX computation still in flight when xattn is called, and xattn's
    output is consumed by JAX at once: both hand-overs must wait for the producer."""
    gpu = _jax_gpu()
    import cupy

    big = make((4096, 4096), "float32", 3, gpu)

    @jax.jit
    def slow_q(x, seed):
        for _ in range(8):  # long enough to be running still when xattn launches
            x = jnp.tanh(x @ x * 1e-3)
        return (x[:1024, :1024].reshape(1, 4, 256, 1024)[..., :64] + seed).astype(jnp.float16)

    k, v = (make((1, 4, 256, 64), "float16", i, gpu) for i in (4, 5))
    for stream in (None, cupy.cuda.Stream(non_blocking=True)):
        q = slow_q(big, 1.0)  # dispatched, not finished
        if stream is None:
            out = xattn.attention(q, k, v)
        else:
            with stream:
                out = xattn.attention(q, k, v)
        doubled = out * 2  # JAX work on xattn's result, queued immediately
        want, _ = xattn.exact_attention(q, k, v)
        assert rel_error(doubled / 2, want) <= TOLERANCE["float16"]
