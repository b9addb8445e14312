"""The portable HIP kernels' logic on an NVIDIA GPU.

kernels_hip/flash_fwd_portable.hip, flash_bwd_portable.hip and flash_bwd_prep.hip are compiled by
CuPy's NVRTC with the test-only tests/hip_on_cuda.h in front (the HIP device API they use, mapped
onto CUDA), with the rows the table gives a device, and launched by xattn.hip.launch and
xattn.hip.launch_backward -- the hip backend's own launch arithmetic. The forward runs the wave32
rows of RDNA (gfx1030). The backward needs no wave-wide operation (block barriers and LDS only), so
it runs both its wave32 rows (gfx1030) and its wave64 rows (gfx906: GCN/CDNA without MFMA, the rows
CDNA uses for float32 and head dims past 128), a 64-lane "wave" being two warps here.

The same properties as the cuda backend then run against them: test_properties.py's forward tests,
test_grad.py's gradient tests (float64 gradient oracle), and test_variants.py's and
test_variants_grad.py's sliding windows, softcap, ALiBi and packed (varlen) batches, forward and
gradients, with attention()'s and attention_varlen()'s GPU forward and backward routed to these
kernels; and direct calls with NaN-poisoned outputs. What cannot run here: the MFMA kernels,
hiprtc itself.

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
from test_variants import (  # noqa: F401  (collected here again, against the HIP kernels)
    test_softcap_keeps_huge_scores_finite,
    test_variants_match_exact_oracle,
    test_varlen_matches_each_sequence_alone,
    test_window_edges,
)
from test_hip_sources import HIP_ON_CUDA_OPTIONS
from xattn import backends, configs, hip, jit, reference, torch_ops

try:  # the gradient properties need torch; without it the forward tests still run
    from test_grad import (  # noqa: F401  (collected here again, against the HIP kernels)
        assert_grads_match,
        error_scales,
        test_deterministic_gradients_are_bitwise_reproducible,
        test_empty_problems_and_keyless_rows_give_zero_gradients,
        test_gqa_gradients_equal_repeated_kv_gradients_summed,
        test_gradient_edge_lengths_and_head_dims,
        test_gradients_match_exact_oracle,
        tolerance_for,
    )
except pytest.skip.Exception:
    assert_grads_match = None
try:  # the variants' gradient properties need torch too
    from test_variants_grad import (  # noqa: F401  (collected here again, against the HIP kernels)
        test_variant_gradients_match_exact_oracle,
        test_varlen_gradients_match_each_sequence_alone,
    )
except pytest.skip.Exception:
    pass

pytestmark = pytest.mark.gpu

HIP_ON_CUDA = Path(__file__).with_name("hip_on_cuda.h")
WAVE32_TARGET = "gfx1030"  # whose rows (wave32) the portable kernels run with on NVIDIA
WAVE64_TARGET = "gfx906"   # gfx9 without MFMA: the wave64 rows of the portable backward
BACKWARD_TARGETS = (WAVE32_TARGET, WAVE64_TARGET)
SHARED_MEMORY_DEFAULT = 48 * 1024  # above it, a CUDA kernel must opt in


def portable_source(source: str = "flash_fwd_portable.hip") -> str:
    return HIP_ON_CUDA.read_text() + jit.preprocess("hip", source)


_kernels: dict = {}


def _compiled(cfg, defines: dict, device: int):
    """The NVRTC-compiled HIP kernel of table row `cfg` with these defines (a cupy.RawKernel),
    memoized: the `compile` argument of xattn.hip.launch and launch_backward."""
    import cupy

    assert cfg.kernel in ("flash_fwd_portable", "flash_bwd_preprocess", "flash_bwd_portable_dq",
                          "flash_bwd_portable_dkdv"), cfg  # the MFMA kernels cannot run here
    key = (device, cfg.kernel, tuple(jit.define_options(defines)))
    kernel = _kernels.get(key)
    if kernel is None:
        with cupy.cuda.Device(device):
            module = cupy.RawModule(code=portable_source(configs.hip_source(cfg.kernel)),
                                    options=(*HIP_ON_CUDA_OPTIONS, *key[2]))
            kernel = module.get_function(cfg.kernel)
            smem = configs.hip_shared_memory_bytes(cfg)
            if smem > SHARED_MEMORY_DEFAULT:  # AMD has 64 KB of LDS without asking; CUDA opts in
                kernel.max_dynamic_shared_size_bytes = smem
        _kernels[key] = kernel
    return kernel


def hip_on_cuda_forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int,
                        window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, cu_seqlens=None,
                        max_seqlen=None) -> None:
    """xattn.hip.forward -- the same launcher, xattn.hip.launch, variants and all -- with the
    wave32 (gfx1030) rows' portable kernel compiled for the NVIDIA GPU holding the arrays."""
    hip.launch(_compiled, WAVE32_TARGET, q, k, v, out, lse, causal=causal, scale=scale,
               stream=stream, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
               cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def hip_on_cuda_backward(q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool, scale: float,
                         deterministic: bool, stream: int, window=(-1, -1), softcap: float = 0.0,
                         alibi_slopes=None, cu_seqlens=None, max_seqlen=None,
                         target: str = WAVE32_TARGET) -> None:
    """xattn.hip.backward -- the same launcher, xattn.hip.launch_backward -- with the portable
    kernels of `target`'s rows compiled for the NVIDIA GPU holding the arrays (the same contract;
    deterministic changes nothing, as on AMD)."""
    hip.launch_backward(_compiled, target, q, k, v, out, dout, lse, dq, dk, dv, causal=causal,
                        scale=scale, stream=stream, window=window, softcap=softcap,
                        alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


@pytest.fixture(scope="module", params=BACKWARD_TARGETS, ids=("bwd_wave32", "bwd_wave64"))
def backend(request):
    """Overrides conftest's: the GPU forward and backward behind xattn.attention are the portable
    HIP kernels (the backward with the rows of request.param's wave size)."""
    reason = _cuda_skip_reason()
    if reason:
        pytest.skip(reason)

    def backward(*args, **kwargs):
        return hip_on_cuda_backward(*args, **kwargs, target=request.param)

    original_forward, original_backward = backends.gpu_forward, torch_ops.gpu_backward
    backends.gpu_forward = lambda name: hip_on_cuda_forward
    torch_ops.gpu_backward = lambda name: backward
    try:
        yield Backend("cuda", _cuda_kinds())
    finally:
        backends.gpu_forward, torch_ops.gpu_backward = original_forward, original_backward


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


# ---- the backward, called directly --------------------------------------------------------------

BACKWARD_SIZES = SIZES + [  # (B, Hq, Hk, Sq, Sk, D, causal): block + 1 of the rows, Sq > Sk, Sq < Sk
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


def _stream(library):
    if library == "torch":
        import torch
        return torch.cuda.current_stream().cuda_stream
    import cupy
    return cupy.cuda.get_current_stream().ptr


@pytest.mark.parametrize("size", BACKWARD_SIZES, ids=str)
def test_backward_writes_every_element(backend, size, request):
    """Direct calls with NaN-poisoned gradients, in contiguous, padded and (B, S, H, D) memory:
    every element of dq, dk, dv is written, nothing past them is (the padding stays NaN), and
    the gradients match the float64 oracle (tolerances of test_grad.py)."""
    if assert_grads_match is None:
        pytest.skip("torch is not installed (test_grad.py's tolerances)")
    target = request.node.callspec.params["backend"]
    batch, q_heads, kv_heads, sq, sk, head_dim, causal = size
    rng = np.random.default_rng(sum(size))
    for index, (library, dtype) in enumerate(backend.kinds):
        memory = MEMORY_KINDS[index % len(MEMORY_KINDS)]
        shapes = [(batch, q_heads, sq, head_dim), (batch, kv_heads, sk, head_dim),
                  (batch, kv_heads, sk, head_dim), (batch, q_heads, sq, head_dim)]
        q, k, v, dout = (_place(backend, rng.standard_normal(s), library, dtype, memory) for s in shapes)
        scale = 1 / math.sqrt(head_dim)
        stream = _stream(library)
        out = backend.make(np.zeros(shapes[0]), library, dtype)
        lse = backend.make(np.full((batch, q_heads, sq), -np.inf), library, "float32")
        if sk:
            hip_on_cuda_forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream)
        dq, dk, dv = (_place(backend, np.full(s, np.nan), library, dtype, memory) for s in shapes[:3])
        hip_on_cuda_backward(q, k, v, out, dout, lse, dq, dk, dv, causal=causal, scale=scale,
                             deterministic=False, stream=stream, target=target)

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


def test_every_backward_row_runs(backend, request):
    """One call per portable backward row of the fixture's wave size and per dtype, so every
    tile shape of the table has run once; head dim 3 below the row's (padded columns masked)."""
    import cupy

    if assert_grads_match is None:
        pytest.skip("torch is not installed (test_grad.py's tolerances)")
    target = request.node.callspec.params["backend"]
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
            stream = cupy.cuda.get_current_stream().ptr
            hip_on_cuda_forward(q, k, v, out, lse, causal=True, scale=0.3, stream=stream)
            grads = [cupy.full(x.shape, np.nan, dtype=dtype) for x in (q, k, v)]
            hip_on_cuda_backward(q, k, v, out, dout, lse, *grads, causal=True, scale=0.3,
                                 deterministic=True, stream=stream, target=target)
            seen = [to_float64(x) for x in (q, k, v, dout)]
            want = reference.exact_attention_grad_bhsd(*seen, causal=True, scale=0.3)
            magnitudes, largest = error_scales(*seen, causal=True, scale=0.3)
            assert_grads_match([to_float64(g) for g in grads], want, magnitudes,
                               tolerance_for(dtype, largest), f" ({target} D{head_dim} {dtype})")
