"""The portable HIP kernel's logic on an NVIDIA GPU.

kernels_hip/flash_fwd_portable.hip is compiled by CuPy's NVRTC with the test-only
tests/hip_on_cuda.h in front (the HIP device API it uses, mapped onto CUDA), with the wave32 rows
the table gives RDNA (gfx1030), and launched by xattn.hip.launch -- the hip backend's own launch
arithmetic. The same properties as the cuda backend then run against it: test_properties.py's
backend tests, with attention()'s GPU forward routed to this kernel, and the direct calls with
poisoned outputs of test_gpu.py. What cannot run here: the MFMA kernel, wave64, hiprtc itself.

    PYTHONPATH=. python -m pytest -m gpu tests/test_hip_portable.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import xattn
from conftest import LSE_TOLERANCE, TOLERANCE, Backend, _cuda_kinds, _cuda_skip_reason, to_float64
from test_gpu import SIZES
from test_properties import (  # noqa: F401  (collected here again, against the HIP kernel)
    test_attention_matches_exact_oracle,
    test_edge_lengths_and_head_dims,
    test_empty_and_keyless_rows,
    test_gqa_equals_explicitly_repeated_kv,
    test_lse_is_logsumexp_of_scaled_masked_scores,
    test_output_lies_within_visible_values,
    test_permuting_keys_with_values_changes_nothing,
)
from xattn import backends, configs, cuda, hip, jit

pytestmark = pytest.mark.gpu

HIP_ON_CUDA = Path(__file__).with_name("hip_on_cuda.h")
WAVE32_TARGET = "gfx1030"  # whose rows (wave32) the portable kernel runs with on NVIDIA


def portable_source() -> str:
    return HIP_ON_CUDA.read_text() + jit.preprocess("hip", "flash_fwd_portable.hip")


_kernels: dict = {}


def hip_on_cuda_forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int) -> None:
    """xattn.hip.forward with the portable kernel compiled for the NVIDIA GPU holding the arrays."""
    import cupy

    Q = cuda._describe(q)
    if 0 in Q.shape[:3]:
        return
    cfg = configs.select_hip(Q.dtype, WAVE32_TARGET, Q.shape[3], causal)
    assert cfg.kernel == "flash_fwd_portable" and configs.hip_wave_size(cfg) == 32
    defines = configs.hip_defines(cfg, Q.dtype, causal, False)
    key = (Q.device, jit.define_options(defines))
    kernel = _kernels.get(key)
    if kernel is None:
        with cupy.cuda.Device(Q.device):
            module = cupy.RawModule(code=portable_source(), options=("-std=c++17", *key[1]))
            kernel = _kernels[key] = module.get_function("flash_fwd_portable")
    hip.launch(kernel, cfg, q, k, v, out, lse, scale=scale, stream=stream)


@pytest.fixture(scope="module")
def backend():
    """Overrides conftest's: the GPU forward behind xattn.attention is the portable HIP kernel."""
    reason = _cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    original = backends.gpu_forward
    backends.gpu_forward = lambda name: hip_on_cuda_forward
    try:
        yield Backend("cuda", _cuda_kinds())
    finally:
        backends.gpu_forward = original


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_forward_writes_every_element(backend, size):
    """Direct calls with NaN-poisoned outputs: every element of out and lse is written."""
    import cupy

    batch, q_heads, kv_heads, sq, sk, head_dim, causal = size
    rng = np.random.default_rng(sum(size))
    for library, dtype in backend.kinds:
        q, k, v = (backend.make(rng.standard_normal(s), library, dtype) for s in (
            (batch, q_heads, sq, head_dim), (batch, kv_heads, sk, head_dim),
            (batch, kv_heads, sk, head_dim)))
        out = backend.make(np.full((batch, q_heads, sq, head_dim), np.nan), library, dtype)
        lse = backend.make(np.full((batch, q_heads, sq), np.nan), library, "float32")
        scale = 1 / math.sqrt(head_dim)
        if library == "torch":
            import torch
            stream = torch.cuda.current_stream().cuda_stream
        else:
            stream = cupy.cuda.get_current_stream().ptr
        hip_on_cuda_forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream)
        got_out, got_lse = to_float64(out), to_float64(lse)
        want_out, want_lse = xattn.exact_attention(q, k, v, causal=causal, scale=scale)
        assert not np.isnan(got_out).any() and not np.isnan(got_lse).any(), "unwritten elements"
        empty = np.isneginf(want_lse)
        np.testing.assert_array_equal(np.isneginf(got_lse), empty)
        assert (got_out[empty] == 0).all()
        if want_out.size and np.linalg.norm(want_out):
            error = np.linalg.norm(got_out - want_out) / np.linalg.norm(want_out)
            assert error <= TOLERANCE[dtype], f"{library} {dtype}: relative error {error:.2e}"
            np.testing.assert_allclose(got_lse[~empty], want_lse[~empty],
                                       rtol=LSE_TOLERANCE[dtype], atol=LSE_TOLERANCE[dtype])


def test_every_wave32_row_runs(backend):
    """One call per wave32 row and dtype, so every tile shape of the table has run once."""
    import cupy

    rng = np.random.default_rng(7)
    for cfg in (r for r in configs.HIP_TABLE if r.arch == "rdna"):
        head_dim = cfg.head_dim - 3  # padded columns masked
        for dtype in ("float16", "float32"):
            q, k, v = (cupy.asarray(rng.standard_normal((1, 2, 77, head_dim))).astype(dtype)
                       for _ in range(3))
            out = cupy.full(q.shape, np.nan, dtype=dtype)
            lse = cupy.full((1, 2, 77), np.nan, dtype="float32")
            hip_on_cuda_forward(q, k, v, out, lse, causal=True, scale=0.3,
                                stream=cupy.cuda.get_current_stream().ptr)
            want, _ = xattn.exact_attention(q, k, v, causal=True, scale=0.3)
            error = np.linalg.norm(to_float64(out) - want) / np.linalg.norm(want)
            assert error <= TOLERANCE[dtype], f"{cfg} {dtype}: relative error {error:.2e}"
