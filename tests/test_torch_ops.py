"""The torch.library registration (xattn/torch_ops.py): gradcheck, opcheck, fake tensors,
torch.compile, the GPU backward adapter (on the CPU, with a stand-in kernel), and the
memory of forward + backward on a GPU."""

from __future__ import annotations

import numpy as np
import pytest

import xattn
from xattn import reference
from conftest import TOLERANCE

torch = pytest.importorskip("torch")
from xattn import torch_ops  # noqa: E402  (needs torch)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def leaves(q_shape, kv_shape, *, dtype=torch.float64, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=generator, dtype=torch.float64).to(device, dtype)
                 .requires_grad_() for s in (q_shape, kv_shape, kv_shape))


def dtype_for(backend):
    return torch.float32 if backend.name == "reference" else torch.float16


def op_args(device, dtype, layout="bhsd", causal=True, window=(-1, -1), softcap=0.0,
            alibi=False):
    """Arguments of attention_forward / attention_backward on `device`."""
    q_shape, kv_shape = (2, 4, 37, 16), (2, 2, 45, 16)
    if layout == "bshd":
        q_shape, kv_shape = (2, 37, 4, 16), (2, 45, 2, 16)
    q, k, v = leaves(q_shape, kv_shape, dtype=dtype, device=device)
    slopes = torch.rand(4, device=device) if alibi else None
    options = (None, None, slopes, causal, 0.3, window[0], 0 if causal else window[1], softcap,
               0, 0, layout, False)
    forward = (q, k, v) + options
    out, lse = torch_ops.attention_forward(*(x.detach() for x in (q, k, v)), *options)
    dout = torch.randn_like(out)
    backward = (dout, q.detach(), k.detach(), v.detach(), out, lse) + options
    return forward, backward


def varlen_op_args(device, dtype):
    """Op arguments for a packed batch of three sequences (one empty), GQA 2:1."""
    cu_q = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 9, 9], dtype=torch.int32, device=device)
    q, k, v = leaves((1, 12, 4, 16), (1, 9, 2, 16), dtype=dtype, device=device)
    options = (cu_q, cu_k, None, True, 0.3, 3, 0, 0.0, 7, 7, "bshd", False)
    out, lse = torch_ops.attention_forward(*(x.detach() for x in (q, k, v)), *options)
    backward = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse) + options
    return (q, k, v) + options, backward


# ------------------------------------------------------------------------- CPU, float64

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout, q_shape, kv_shape", [
    ("bhsd", (1, 2, 5, 3), (1, 2, 7, 3)),     # Sq < Sk
    ("bhsd", (2, 4, 6, 4), (2, 2, 4, 4)),     # GQA 2:1, causal Sq > Sk (two keyless rows)
    ("bshd", (1, 5, 3, 2), (1, 6, 1, 2)),     # MQA 3:1
])
def test_gradcheck_float64(causal, layout, q_shape, kv_shape):
    """Analytic gradients (the reference backward) against finite differences of the forward.
    The saved lse is float32 by contract, so gradients carry ~1e-7 relative error: hence
    gradcheck's default rtol (1e-3), with atol tightened from 1e-5 to 1e-6."""
    q, k, v = leaves(q_shape, kv_shape)
    assert torch.autograd.gradcheck(
        lambda q, k, v: xattn.attention(q, k, v, causal=causal, layout=layout, scale=0.8),
        (q, k, v), atol=1e-6)


def test_gradcheck_fails_on_a_wrong_backward(monkeypatch):
    """gradcheck above can fail: a backward that drops the causal mask is caught."""
    original = reference.flash_attention_backward

    def unmasked(*args, **kwargs):
        return original(*args, **(kwargs | dict(causal=False, window=(-1, -1))))
    monkeypatch.setattr(reference, "flash_attention_backward", unmasked)
    q, k, v = leaves((1, 2, 5, 3), (1, 2, 5, 3))
    assert not torch.autograd.gradcheck(
        lambda q, k, v: xattn.attention(q, k, v, causal=True), (q, k, v), raise_exception=False)


# ------------------------------------------------------------------------ every backend

@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_opcheck_forward_and_backward(backend, layout):
    """Schema, autograd registration, fake tensors and AOT dispatch, both ops."""
    forward, backward = op_args(backend.device, dtype_for(backend), layout)
    torch.library.opcheck(torch_ops.attention_forward, forward)
    torch.library.opcheck(torch_ops.attention_backward, backward)


@pytest.mark.parametrize("variant", ["window_softcap", "alibi", "varlen"])
def test_opcheck_variants(backend, variant):
    """The optional tensors (slopes, cumulative lengths) and the window/softcap scalars pass
    through the schema, the fakes and autograd."""
    device, dtype = backend.device, dtype_for(backend)
    if variant == "varlen":
        forward, backward = varlen_op_args(device, dtype)
    elif variant == "alibi":
        forward, backward = op_args(device, dtype, alibi=True)
    else:
        forward, backward = op_args(device, dtype, causal=False, window=(9, 4), softcap=5.0)
    torch.library.opcheck(torch_ops.attention_forward, forward)
    torch.library.opcheck(torch_ops.attention_backward, backward)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_fake_outputs_have_the_real_shapes_dtypes_and_strides(backend, layout):
    from torch._subclasses.fake_tensor import FakeTensorMode
    forward, backward = op_args(backend.device, dtype_for(backend), layout)
    real = torch_ops.attention_forward(*forward) + torch_ops.attention_backward(*backward)
    with FakeTensorMode() as mode:
        fake_forward = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                             for x in forward)
        fake_backward = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                              for x in backward)
        fake = torch_ops.attention_forward(*fake_forward) + \
            torch_ops.attention_backward(*fake_backward)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, r, f in zip(names, real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), name
    out, lse, dq, dk, dv = real
    q, k, v = forward[:3]
    assert out.shape == q.shape and out.is_contiguous() and lse.dtype == torch.float32
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert lse.shape == (2, 4, 37)


def test_torch_compile_fullgraph_matches_eager(backend):
    """A small attention block, forward and backward, compiled without graph breaks."""
    torch._dynamo.reset()
    dtype = dtype_for(backend)

    def block(x, w_qkv, w_out):
        batch, seqlen, width = x.shape
        q, k, v = (x @ w_qkv).view(batch, seqlen, 3, 4, width // 4).unbind(2)
        y = xattn.attention(q, k, v, causal=True, layout="bshd")   # (B, S, H, D)
        return (y.reshape(batch, seqlen, width) @ w_out).square().mean()

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=generator).to(backend.device, dtype) / s[-1] ** 0.25
              for s in ((2, 37, 32), (32, 96), (32, 32))]
    inputs = [x.requires_grad_() for x in inputs]
    eager_loss = block(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    compiled = torch.compile(block, fullgraph=True)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    tolerance = TOLERANCE[str(dtype).removeprefix("torch.")]
    torch.testing.assert_close(loss, eager_loss, rtol=tolerance, atol=tolerance)
    for got, want in zip(grads, eager_grads):
        error = (got - want).float().norm() / want.float().norm()
        assert error <= 10 * tolerance, f"compiled gradient differs by {error:.2e}"


def test_torch_compile_traces_without_grad(backend):
    """Under torch.compile, tensors that need no grad also go through the op (the plain path
    would read fake tensors' data)."""
    torch._dynamo.reset()
    dtype = dtype_for(backend)
    q, k, v = (x.detach() for x in leaves((1, 2, 9, 8), (1, 1, 12, 8), dtype=dtype,
                                          device=backend.device))
    compiled = torch.compile(lambda q, k, v: xattn.attention(q, k, v, causal=True) * 2,
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), xattn.attention(q, k, v, causal=True) * 2)


# ----------------------------------------------- the GPU backward adapter, on the CPU

def stand_in_backward(q, k, v, out, dout, lse, dq, dk, dv, *, deterministic, stream, **options):
    """Checks what xattn.cuda.backward is promised, then computes with the reference."""
    assert isinstance(stream, int) and isinstance(deterministic, bool)
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout), ("dq", dq),
                    ("dk", dk), ("dv", dv)):
        assert t.dim() == 4, name
        assert t.shape[-1] == 1 or t.stride(-1) == 1, f"{name}: D is strided"
    assert out.shape == dout.shape == dq.shape == q.shape
    assert dk.shape == dv.shape == k.shape == v.shape and q.shape[1] % k.shape[1] == 0
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.is_contiguous()
    assert q.shape[0] and q.shape[1] and q.shape[2] and k.shape[2], "empty problem launched"
    for grad in (dq, dk, dv):
        grad.fill_(float("nan"))  # poison: the reference must write every element
    reference.backward(q.numpy(), k.numpy(), v.numpy(), out.numpy(), dout.numpy(), lse.numpy(),
                       dq=dq.numpy(), dk=dk.numpy(), dv=dv.numpy(), **options)


@pytest.fixture
def fake_stream(monkeypatch):
    class Stream:
        cuda_stream = 1234
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gpu_backward_adapter_passes_views_and_returns_input_layouts(fake_stream, layout):
    _, (_, q, k, v, out, lse, *_) = op_args("cpu", torch.float32, layout)
    dout = torch.ones(()).expand(out.shape)          # what out.sum() sends back: stride 0
    options = dict(causal=True, scale=0.3, window=(-1, 0), softcap=0.0, alibi_slopes=None)
    grads = torch_ops.backward_gpu(stand_in_backward, dout, q, k, v, out, lse, layout=layout,
                                   deterministic=True, **options)
    call = xattn.call.build(q, k, v, None, True, 0.3, (-1, 0), 0.0, layout, False, None, True)
    want = torch_ops.backward_host(dout, q, k, v, out, lse, call, None, None)
    for got, expected, x in zip(grads, want, (q, k, v)):
        assert got.shape == x.shape and got.is_contiguous() and got.dtype == x.dtype
        # Same algorithm; only the summation order over a copied vs a stride-0 dout differs.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gpu_backward_adapter_zero_fills_empty_problems_itself(fake_stream):
    def must_not_run(*args, **kwargs):
        raise AssertionError("backward launched for an empty problem")
    for sq, sk in ((0, 5), (5, 0)):
        q, k, v = (torch.randn(s) for s in ((1, 2, sq, 8), (1, 1, sk, 8), (1, 1, sk, 8)))
        out, lse = torch.zeros_like(q), torch.full((1, 2, sq), -float("inf"))
        grads = torch_ops.backward_gpu(must_not_run, torch.ones_like(q), q, k, v, out, lse,
                                        layout="bhsd", causal=False, scale=1.0,
                                        deterministic=False, window=(-1, -1))
        assert all((g == 0).all() for g in grads)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_gpu_backend_without_backward_kernels_says_so(monkeypatch):
    import sys
    import types
    monkeypatch.setattr(xattn.backends, "gpu_forward", lambda name: None)
    monkeypatch.setitem(sys.modules, "xattn.oldgpu", types.ModuleType("xattn.oldgpu"))
    with pytest.raises(RuntimeError, match=r"backend: 'oldgpu' has no backward kernels"):
        xattn.dispatch.gpu_backward("oldgpu")


# ----------------------------------------------------------------------- GPU memory

@pytest.mark.gpu
def test_forward_backward_memory_is_linear_in_sequence_length(cuda_backend, record_property):
    """S = 65536, D = 128, bf16, B = 1, H = 16: the 16 x 65536^2 score matrix alone would be
    137 GB in bf16 (SDPA's math backend cannot allocate it); xattn must stay O(S)."""
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    batch, heads, seqlen, head_dim = 1, 16, 65536, 128
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    input_bytes = sum(x.numel() * x.element_size() for x in (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = xattn.attention(q, k, v)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ratio = peak / input_bytes
    record_property("peak_over_inputs", round(ratio, 3))
    print(f"\nforward+backward S={seqlen} H={heads} D={head_dim} bf16: peak "
          f"{peak / 2**30:.2f} GiB over inputs' {input_bytes / 2**30:.2f} GiB = {ratio:.2f}x")
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert ratio < 8, f"peak memory {ratio:.1f}x the inputs: not O(S)"
