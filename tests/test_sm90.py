"""The Hopper forward (xattn/sm90.py, kernels_cuda/sm90/). On the CPU: every row compiles with
NVRTC for sm_90a without spills, the generated wgmma header is current, every row fits in
shared memory, and the AttnParams dtype the launch fills matches params.h. On an sm_90 GPU (marker gpu):
properties of xattn.sm90.forward against the float64 oracle xattn.exact_attention, with
NaN-poisoned outputs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import xattn
from conftest import LSE_TOLERANCE, TOLERANCE, to_float64
from xattn import jit, sm90

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))

HAS_NVRTC = importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None


# ---- CPU ------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_NVRTC, reason="cuda-bindings (NVRTC) is not installed")
@pytest.mark.parametrize("row", sm90.ROWS, ids=lambda r: f"D{r.head_dim}-{'causal' if r.causal else 'full'}")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rows_compile_for_sm90a_without_spills(row, dtype):
    from compile_kernels import nvrtc_compile, report

    flags = dict(causal=row.causal, local=False, softcap=False, alibi=False)
    if dtype == "bfloat16":  # the modifiers too, once per row
        flags.update(local=True, softcap=not row.causal, alibi=row.causal)
    options = ["--gpu-architecture=sm_90a", "-std=c++17", "-Xptxas=-v",
               *jit.define_options(sm90.defines(row, dtype, **flags))]
    ok, log = nvrtc_compile(jit.preprocess("cuda", sm90.SOURCE), "flash_fwd.cu", options)
    assert ok, log
    assert "wgmma" not in log.lower() or "serializ" not in log.lower(), log  # ptxas' wgmma serialization warning
    info = report(log, sm90.ENTRY)
    assert info["spill_stores"] == info["spill_loads"] == info["stack"] == 0, info
    # setmaxnreg moves registers between roles only from the launch's 65536 / 384 = 168 per thread
    assert info["registers"] == 168, info


def test_generated_wgmma_header_is_current():
    from gen_wgmma_ops import OUT, render

    assert OUT.read_text() == render(), "run python ci/gen_wgmma_ops.py"


def test_rows_fit_in_shared_memory():
    for row in sm90.ROWS:
        assert sm90.shared_memory_bytes(row) <= sm90.SMEM_LIMIT, row
    assert [sm90.select(d, False).head_dim for d in (1, 64, 65, 128, 200, 256)] == [64, 64, 128, 128, 256, 256]
    assert sm90.select(257, False) is None



# ---- GPU -------------------------------------------------------------------------------------------

def _sm90_device():
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("cupy") is None:
        return "torch and cupy are needed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"not an sm_90 device ({torch.cuda.get_device_name()})"
    return None


@pytest.fixture(scope="module")
def hopper():
    reason = _sm90_device()
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 4]),
       sq=st.sampled_from([1, 2, 63, 64, 65, 127, 128, 129, 300]),
       sk=st.sampled_from([1, 63, 65, 80, 81, 128, 129, 300]),
       head_dim=st.sampled_from([8, 32, 64, 72, 96, 128, 136, 200, 256]),
       causal=st.booleans(), dtype=st.sampled_from(["float16", "bfloat16"]),
       layout=st.sampled_from(["bhsd", "bshd"]),
       window=st.sampled_from([None, (-1, -1), (40, 0), (17, 33), (-1, 5)]),
       modifier=st.sampled_from([None, "softcap", "alibi"]), seed=st.integers(0, 2**16))
def test_forward_matches_exact_attention(hopper, batch, kv_heads, group, sq, sk, head_dim, causal, dtype, layout,
                                         window, modifier, seed):
    import torch

    q_heads = kv_heads * group
    rng = np.random.default_rng(seed)

    def make(heads, s):
        x = torch.from_numpy(rng.standard_normal((batch, heads, s, head_dim))).to("cuda", getattr(torch, dtype))
        # bshd: the (B, H, S, D) view of a (B, S, H, D) tensor
        return x.transpose(1, 2).contiguous().transpose(1, 2) if layout == "bshd" else x

    q, k, v = make(q_heads, sq), make(kv_heads, sk), make(kv_heads, sk)
    options = {}
    if causal and window is not None and window[1] > 0:
        window = (window[0], 0)  # the API's rule: causal hides every key right of the diagonal
    if window is not None:
        options["window"] = window
    if modifier == "softcap":
        options["softcap"] = 20.0
    elif modifier == "alibi":
        options["alibi_slopes"] = torch.from_numpy(rng.random(q_heads)).to("cuda", torch.float32)
    scale = 1 / math.sqrt(head_dim)
    assert sm90.supports(q, k, v, q, None, causal=causal, **options)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, q_heads, sq), float("nan"), device="cuda")
    sm90.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=torch.cuda.current_stream().cuda_stream,
                 **options)
    torch.cuda.synchronize()
    ref_out, ref_lse = xattn.exact_attention(q, k, v, causal=causal, scale=scale, **options)
    got, got_lse = to_float64(out), to_float64(lse)
    assert not np.isnan(got).any() and not np.isnan(got_lse).any(), "an output element was not written"
    error = np.linalg.norm(got - ref_out) / max(np.linalg.norm(ref_out), 1e-30)
    assert error <= TOLERANCE[dtype], error
    assert np.array_equal(np.isfinite(got_lse), np.isfinite(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(got_lse[finite], ref_lse[finite], rtol=LSE_TOLERANCE[dtype], atol=LSE_TOLERANCE[dtype])


@pytest.mark.gpu
def test_unaddressable_views_are_refused(hopper):
    import torch

    base = torch.randn(1, 2, 64, 72, device="cuda", dtype=torch.bfloat16)
    q = base[..., 1:65]  # base 2 bytes past a 16-byte boundary
    assert not sm90.supports(q, q, q, q, None)
    odd_rows = torch.randn(1, 2, 64, 68, device="cuda", dtype=torch.bfloat16)[..., :64]  # rows 136 bytes apart
    assert not sm90.supports(odd_rows, odd_rows, odd_rows, odd_rows, None)
    assert not sm90.supports(base.float(), base.float(), base.float(), base.float(), None)
