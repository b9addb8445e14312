"""Type in, same type out, on the host; backend listing; the command line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xattn
from conftest import TOLERANCE

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
ROOT = Path(__file__).resolve().parents[1]


def data(layout="bhsd", dtype="float32"):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 4, 33, 16)), rng.standard_normal((2, 2, 40, 16)),
               rng.standard_normal((2, 2, 40, 16)))
    if layout == "bshd":
        q, k, v = (x.transpose(0, 2, 1, 3).copy() for x in (q, k, v))
    return tuple(x.astype(dtype) for x in (q, k, v))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_numpy_in_numpy_out(layout, dtype):
    q, k, v = data(layout, dtype)
    out, lse = xattn.attention(q, k, v, layout=layout, causal=True, return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == q.dtype and out.shape == q.shape
    assert out.flags.c_contiguous  # q's layout, not a transposed view of another
    assert lse.dtype == np.float32 and lse.shape == (2, 4, 33)
    want, _ = xattn.exact_attention(q, k, v, layout=layout, causal=True)
    error = np.linalg.norm(out - want) / np.linalg.norm(want)
    assert error <= TOLERANCE[dtype if dtype != "float64" else "float32"]


def test_return_lse_false_returns_only_out():
    q, k, v = data()
    assert isinstance(xattn.attention(q, k, v), np.ndarray)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = data()
    np.testing.assert_allclose(xattn.attention(q, k, v),
                               xattn.attention(q, k, v, scale=1 / 4.0), rtol=0, atol=0)


def test_numpy_scalar_arguments_are_accepted():
    """NumPy scalars mean what the Python scalars of the same value mean."""
    q, k, v = data()
    got = xattn.attention(q, k, v, causal=np.bool_(True), scale=np.float32(0.3))
    want = xattn.attention(q, k, v, causal=True, scale=float(np.float32(0.3)))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, xattn.attention(q, k, v, causal=False, scale=0.3))


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cpu_torch_in_torch_out(dtype, layout):
    import torch
    q, k, v = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in data(layout, "float64"))
    q.requires_grad_(True)  # goes through the autograd op (tests/test_grad.py checks gradients)
    out, lse = xattn.attention(q, k, v, layout=layout, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and out.device.type == "cpu"
    assert out.requires_grad and not lse.requires_grad
    want, _ = xattn.exact_attention(q, k, v, layout=layout)
    error = np.linalg.norm(out.detach().double().numpy() - want) / np.linalg.norm(want)
    assert error <= TOLERANCE[dtype]


def test_other_dlpack_producers_on_the_host():
    """An object that only speaks DLPack comes back as NumPy (its library has no from_dlpack)."""
    class Wrapped:
        def __init__(self, array):
            self.array, self.shape, self.dtype = array, array.shape, array.dtype

        def __dlpack__(self, **kwargs):
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.array.__dlpack_device__()

    q, k, v = data()
    out = xattn.attention(Wrapped(q), Wrapped(k), Wrapped(v))
    np.testing.assert_array_equal(out, xattn.attention(q, k, v))


def test_available_backends_lists_all_with_reasons():
    listed = xattn.available_backends()
    assert list(listed) == ["reference", "cuda", "hip"]
    assert listed["reference"].usable
    for usable, reason in listed.values():
        assert isinstance(usable, bool) and reason


def test_kernel_sources_are_found():
    for vendor in ("cuda", "hip"):
        files = xattn.kernel_files(vendor)
        assert files, vendor
        assert xattn.kernel_source(vendor, files[0]).strip()


@pytest.mark.parametrize("command", ["info", "demo"])
def test_command_line(command):
    result = subprocess.run([sys.executable, "-m", "xattn", command], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert ("backend reference" if command == "info" else "ok") in result.stdout


def test_import_needs_neither_cupy_nor_torch():
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['torch'] = None\n"
            "import numpy as np, xattn\n"
            "q = np.ones((1, 1, 3, 4), np.float32)\n"
            "assert xattn.attention(q, q, q).shape == q.shape\n"
            "print(xattn.available_backends()['cuda'].reason)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "cupy" in result.stdout.lower()
