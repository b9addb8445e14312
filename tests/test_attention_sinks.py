"""Attention sinks through the public functions: attention(sinks=) and attention_varlen(sinks=)
on every backend (the hip paths included: the HIP forwards fold the sink in their epilogue,
HAS_SINKS) against the float64 oracle with sinks (reference.exact_attention_bhsd), the
gradients (dq, dk, dv, dsinks) against the gradient oracle, the custom op with its fake, and the
validation of `sinks`.

The backward claim the implementation rests on is checked first: the backward kernels, given the
forward's lse (which includes the sink) and out, produce the sink-softmax's dq, dk, dv without
knowing the sinks (reference.backward called without sinks= against the gradient oracle).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xattn
from xattn import reference
from conftest import LSE_TOLERANCE, TOLERANCE, to_float64
from tolerances import TOLERANCES, output_resolution

torch = pytest.importorskip("torch")
from xattn import torch_ops  # noqa: E402  (needs torch)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LARGE_SINKS = (0.0, 2.5, -3.0, 40.0, -40.0, 1e4, -1e4)


def rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / scale) if scale else float(np.abs(got).max(initial=0))


def test_backward_kernels_need_only_the_forward_lse():
    """dq, dk, dv of the sink-softmax = the plain backward given out and lse of the sink forward."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 9, 8))
    k, v = (rng.standard_normal((2, 2, 11, 8)) for _ in range(2))
    dout = rng.standard_normal(q.shape)
    sinks = np.array([0.3, -2.0, 5.0, 1e3])
    for options in (dict(causal=False), dict(causal=True), dict(causal=False, window=(2, 1)),
                    dict(causal=False, softcap=1.5)):
        options = dict(scale=0.6, **options)
        out, lse = np.empty_like(q), np.empty(q.shape[:3])
        reference.forward(q, k, v, sinks=sinks, out=out, lse=lse, **options)
        grads = [np.empty_like(x) for x in (q, k, v)]
        reference.backward(q, k, v, out, dout, lse, dq=grads[0], dk=grads[1], dv=grads[2],
                           **options)  # no sinks=
        want = reference.exact_attention_grad_bhsd(q, k, v, dout, sinks=sinks, **options)
        for name, g, w in zip(("dq", "dk", "dv"), grads, want):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9, err_msg=name)
        # and dsinks = -sum_rows exp(sink - lse) * rowsum(dout * out), torch_ops.sinks_grad
        dsinks = torch_ops.sinks_grad(*(torch.from_numpy(x) for x in (out, dout, lse, sinks)),
                                      "bhsd")
        np.testing.assert_allclose(dsinks.numpy(), want[3], rtol=1e-9, atol=1e-9)


@st.composite
def problems(draw):
    heads_k = draw(st.integers(1, 2))
    heads_q = heads_k * draw(st.sampled_from((1, 2, 3)))
    sq = draw(st.sampled_from((1, 7, 65, 130)))
    sk = draw(st.sampled_from((0, 1, 9, 64, 129)))
    d = draw(st.sampled_from((8, 32, 64, 72, 128)))
    causal = draw(st.booleans())
    layout = draw(st.sampled_from(("bhsd", "bshd")))
    sinks = np.array([draw(st.sampled_from(LARGE_SINKS) | st.floats(-6, 6))
                      for _ in range(heads_q)], dtype=np.float32)
    seed = draw(st.integers(0, 2**32 - 1))
    return heads_q, heads_k, sq, sk, d, causal, layout, sinks, seed


def _bhsd(x, layout):
    return x if layout == "bhsd" else x.transpose(0, 2, 1, 3)


@settings(max_examples=25, deadline=None)
@given(problem=problems(), data=st.data())
def test_attention_with_sinks_matches_the_oracle(backend, problem, data):
    heads_q, heads_k, sq, sk, d, causal, layout, sinks, seed = problem
    library, dtype = data.draw(st.sampled_from(backend.kinds))
    rng = np.random.default_rng(seed)
    shape = lambda h, s: (2, h, s, d) if layout == "bhsd" else (2, s, h, d)  # noqa: E731
    q, k, v = (backend.make(rng.standard_normal(shape(h, s)), library, dtype)
               for h, s in ((heads_q, sq), (heads_k, sk), (heads_k, sk)))
    sink_array = backend.make(sinks.astype(np.float64), library, "float32")
    out, lse = xattn.attention(q, k, v, causal=causal, layout=layout, sinks=sink_array,
                               return_lse=True)
    hq, hk, hv = (_bhsd(to_float64(x), layout) for x in (q, k, v))
    want_out, want_lse = reference.exact_attention_bhsd(hq, hk, hv, causal=causal, scale=d ** -0.5,
                                                        sinks=sinks.astype(np.float64))
    error = np.linalg.norm(_bhsd(to_float64(out), layout) - want_out)
    assert error <= (TOLERANCE[dtype] * np.linalg.norm(want_out)
                     + output_resolution(dtype, want_out.size)), error
    np.testing.assert_allclose(to_float64(lse), want_lse, rtol=LSE_TOLERANCE[dtype],
                               atol=LSE_TOLERANCE[dtype])


def test_varlen_with_sinks_is_per_sequence(backend):
    """Packed sequences, one empty on each side and one with no visible key (causal, Sq > Sk):
    each sequence equals the oracle with sinks alone; dsinks sums over the sequences."""
    library, dtype = ("torch", "float64") if backend.name == "reference" else ("torch", "float16")
    device = backend.device
    lengths_q, lengths_k = [5, 0, 9, 3], [7, 4, 0, 70]
    cu_q = torch.tensor(np.cumsum([0] + lengths_q), dtype=torch.int32, device=device)
    cu_k = torch.tensor(np.cumsum([0] + lengths_k), dtype=torch.int32, device=device)
    rng = np.random.default_rng(3)
    base = [rng.standard_normal((sum(lengths_q), 4, 32)),
            rng.standard_normal((sum(lengths_k), 2, 32)), rng.standard_normal((sum(lengths_k), 2, 32))]
    q, k, v = (backend.make(x, library, dtype).requires_grad_() for x in base)
    sinks = torch.tensor([1.0, -2.0, 30.0, -1e4], dtype=torch.float32, device=device,
                         requires_grad=True)
    out, lse = xattn.attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                      causal=True, sinks=sinks, return_lse=True)
    dout = torch.from_numpy(rng.standard_normal(out.shape)).to(out)
    out.backward(dout)
    hq, hk, hv = (to_float64(x) for x in (q, k, v))
    hd, hs = to_float64(dout), to_float64(sinks)
    cq, ck = np.cumsum([0] + lengths_q), np.cumsum([0] + lengths_k)
    want_dsinks = np.zeros(4)
    tol = TOLERANCE["float64" if dtype == "float64" else dtype]
    for b in range(4):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        per = [x[None].transpose(0, 2, 1, 3) for x in (hq[qs], hk[ks], hv[ks], hd[qs])]
        wo, wl = reference.exact_attention_bhsd(*per[:3], causal=True, scale=32 ** -0.5, sinks=hs)
        assert rel_error(to_float64(out)[qs], wo[0].transpose(1, 0, 2)) <= tol
        np.testing.assert_allclose(to_float64(lse)[:, qs], wl[0], rtol=LSE_TOLERANCE[dtype],
                                   atol=LSE_TOLERANCE[dtype])
        want_dsinks += reference.exact_attention_grad_bhsd(*per, causal=True, scale=32 ** -0.5,
                                                           sinks=hs)[3]
    grad_tol = TOLERANCES["grad_plain"].get(dtype, 1e-6)
    assert rel_error(to_float64(sinks.grad), want_dsinks) <= grad_tol


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_autograd_with_sinks_matches_the_gradient_oracle(backend, layout):
    dtype = torch.float64 if backend.name == "reference" else torch.float16
    rng = np.random.default_rng(4)
    q_shape, kv_shape = (2, 4, 37, 64), (2, 2, 45, 64)
    if layout == "bshd":
        q_shape, kv_shape = (2, 37, 4, 64), (2, 45, 2, 64)
    q, k, v = (torch.from_numpy(rng.standard_normal(s)).to(backend.device, dtype).requires_grad_()
               for s in (q_shape, kv_shape, kv_shape))
    sinks = torch.tensor([0.5, -1.0, 3.0, -30.0], device=backend.device, requires_grad=True)
    out = xattn.attention(q, k, v, causal=True, layout=layout, sinks=sinks, scale=0.2)
    dout = torch.from_numpy(rng.standard_normal(out.shape)).to(out)
    out.backward(dout)
    hq, hk, hv, hd = (_bhsd(to_float64(x), layout) for x in (q, k, v, dout))
    want = reference.exact_attention_grad_bhsd(hq, hk, hv, hd, causal=True, scale=0.2,
                                               sinks=to_float64(sinks))
    tol = 1e-5 if dtype == torch.float64 else TOLERANCES["grad_plain"]["float16"]
    for name, x, w in zip(("dq", "dk", "dv"), (q, k, v), want):
        assert rel_error(_bhsd(to_float64(x.grad), layout), w) <= tol, name
    assert rel_error(to_float64(sinks.grad), want[3]) <= tol


def test_opcheck_forward_with_sinks(backend):
    dtype = torch.float32 if backend.name == "reference" else torch.float16
    g = torch.Generator().manual_seed(0)
    q = torch.randn((2, 4, 37, 16), generator=g).to(backend.device, dtype).requires_grad_()
    k, v = (torch.randn((2, 2, 45, 16), generator=g).to(backend.device, dtype).requires_grad_()
            for _ in range(2))
    sinks = torch.randn(4, generator=g).to(backend.device).requires_grad_()
    args = (q, k, v, None, None, None, True, 0.3, -1, 0, 0.0, 0, 0, "bhsd", False, sinks)
    torch.library.opcheck(torch_ops.attention_forward, args)
    out, lse = torch_ops.attention_forward(*(x.detach() if isinstance(x, torch.Tensor) else x
                                             for x in args))
    want_out, want_lse = reference.exact_attention_bhsd(
        *(to_float64(x) for x in (q, k, v)), causal=True, scale=0.3, sinks=to_float64(sinks))
    assert rel_error(to_float64(out), want_out) <= TOLERANCE[str(dtype).split(".")[1]]


def test_compiled_with_sinks_matches_eager():
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.tensor([1.0, -1.0])

    def f(q, k, v, s):
        return xattn.attention(q, k, v, causal=True, sinks=s)
    eager = f(q, k, v, sinks)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, sinks)
    torch.testing.assert_close(compiled, eager)


def test_no_key_rows_get_zero_and_the_sink():
    q = torch.randn(1, 2, 4, 8)
    k = v = torch.randn(1, 2, 0, 8)
    sinks = torch.tensor([3.0, -5.0])
    out, lse = xattn.attention(q, k, v, sinks=sinks, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sinks[None, :, None].expand(1, 2, 4))


@pytest.mark.parametrize("sinks, error, message", [
    (np.zeros(4, np.float64), TypeError, "sinks: expected dtype float32"),
    (np.zeros(3, np.float32), ValueError, r"sinks: expected shape \(4,\)"),
    (np.zeros((1, 4), np.float32), ValueError, r"sinks: expected shape \(4,\)"),
    ([0.0] * 4, TypeError, "sinks: expected a float32 array"),
    (torch.zeros(4), TypeError, "sinks: expected a NumPy array"),
])
def test_bad_sinks_raise_naming_the_argument(sinks, error, message):
    q = np.zeros((1, 4, 3, 8), np.float32)
    k = np.zeros((1, 2, 3, 8), np.float32)
    with pytest.raises(error, match=message):
        xattn.attention(q, k, k, sinks=sinks)
    with pytest.raises(error, match=message):
        xattn.attention_varlen(q[0].transpose(1, 0, 2), k[0].transpose(1, 0, 2),
                               k[0].transpose(1, 0, 2), np.array([0, 3], np.int32),
                               np.array([0, 3], np.int32), 3, 3, sinks=sinks)


@pytest.mark.parametrize("target, dtype, kernel", [
    ("gfx942", "float16", "flash_fwd_mfma"), ("gfx1100", "bfloat16", "flash_fwd_wmma"),
    ("gfx1030", "float16", "flash_fwd_portable"), ("gfx90a", "float32", "flash_fwd_portable")])
def test_hip_forward_launch_folds_the_sinks_in_the_kernel(stand_in_launches, target, dtype, kernel):
    """xattn.hip.launch with sinks, on the CPU with stand-ins for CuPy and the driver: every HIP
    forward kernel (MFMA, WMMA, portable) is compiled with HAS_SINKS and finds the sinks' pointer
    in its AttnParams block; a call without sinks takes its own plan, without HAS_SINKS and with a
    null pointer (its epilogue never reads one)."""
    from xattn import hip

    torch_dtype = getattr(torch, dtype)
    q, out = (torch.zeros(2, 4, 40, 64, dtype=torch_dtype) for _ in range(2))
    k, v = (torch.zeros(2, 2, 50, 64, dtype=torch_dtype) for _ in range(2))
    lse = torch.zeros(2, 4, 40)
    sinks = torch.tensor([0.5, -1.0, 3.0, -30.0])
    for passed in (sinks, None):
        hip.launch(stand_in_launches.compile, target, q, k, v, out, lse, causal=True, scale=0.1,
                   stream=3, sinks=passed)
    with_sinks, without = stand_in_launches.launches
    assert with_sinks.kernel.entry == without.kernel.entry == kernel
    assert with_sinks.defines["HAS_SINKS"] == 1 and "HAS_SINKS" not in without.defines
    assert with_sinks.block[0]["sinks"] == sinks.data_ptr() and without.block[0]["sinks"] == 0
    assert {k: v for k, v in with_sinks.defines.items() if k != "HAS_SINKS"} == without.defines
