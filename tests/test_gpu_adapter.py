"""The GPU adapter (xattn.arrays.run_on_gpu for torch tensors) exercised on the CPU.

A stand-in for a GPU backend's forward checks the contract it is promised (bhsd views, element
stride 1 in D, out/lse of the right shape and dtype, a stream as int) and fills out/lse with the
reference algorithm. This checks the layout, allocation and copy logic without a GPU; the real
kernels face the same data in test_properties.py on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from xattn import arrays, reference
from conftest import TOLERANCE, to_float64

torch = pytest.importorskip("torch")


def stand_in_forward(q, k, v, out, lse, *, causal, scale, stream):
    assert isinstance(stream, int)
    for name, tensor in (("q", q), ("k", k), ("v", v), ("out", out)):
        assert tensor.dim() == 4, name
        assert tensor.shape[-1] == 1 or tensor.stride(-1) == 1, f"{name}: D is strided"
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape
    reference.flash_attention_forward(q.numpy(), k.numpy(), v.numpy(), causal=causal,
                                      scale=scale, out=out.numpy(), lse=lse.numpy())


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("strided", [False, True])
def test_torch_adapter_passes_views_and_returns_q_layout(monkeypatch, layout, strided):
    class Stream:
        cuda_stream = 1234
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    rng = np.random.default_rng(4)
    shapes = [(2, 6, 33, 16), (2, 2, 40, 16), (2, 2, 40, 16)]  # bhsd
    tensors = []
    for shape in shapes:
        data = torch.from_numpy(rng.standard_normal(shape)).float()
        if layout == "bshd":
            data = data.transpose(1, 2).contiguous()
        if strided:  # D with stride 2: the adapter must copy it, and only it
            wide = torch.full(data.shape[:3] + (32,), float("nan"))
            wide[..., ::2] = data
            data = wide[..., ::2]
        tensors.append(data)
    q, k, v = tensors
    info = arrays.describe(q, "q")
    sq = q.shape[2] if layout == "bhsd" else q.shape[1]
    out, lse = arrays.run_on_gpu(stand_in_forward, q, k, v, info, layout=layout, causal=True,
                                 scale=0.25, dims=(2, 6, sq, 40, 16))
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (2, 6, 33)
    import xattn
    want, want_lse = xattn.exact_attention(q, k, v, layout=layout, causal=True, scale=0.25)
    got = to_float64(out)
    assert np.linalg.norm(got - want) <= TOLERANCE["float32"] * np.linalg.norm(want)
    np.testing.assert_allclose(to_float64(lse), want_lse, rtol=1e-5, atol=1e-5)


def test_torch_adapter_handles_empty_sizes_itself(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("forward called for an empty problem")
    q = torch.ones(1, 2, 3, 8)
    empty_kv = torch.ones(1, 1, 0, 8)
    info = arrays.describe(q, "q")
    out, lse = arrays.run_on_gpu(must_not_run, q, empty_kv, empty_kv, info, layout="bhsd",
                                 causal=False, scale=1.0, dims=(1, 2, 3, 0, 8))
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = arrays.run_on_gpu(must_not_run, q[:, :, :0], q, q, info, layout="bhsd",
                                 causal=False, scale=1.0, dims=(1, 2, 0, 3, 8))
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)
