"""FP8 KV caches in attention_with_kvcache (reference backend, torch): the output against the
float64 oracle on the dequantized cache (after the append), the append's FP8 round trip
(round-to-nearest-even, saturation), and the validation of k_cache / k_scale / v_scale."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xattn import reference
from conftest import LSE_TOLERANCE, TOLERANCE

torch = pytest.importorskip("torch")
from xattn.kvcache import attention_with_kvcache, quantize  # noqa: E402

FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)


def rel_error(got, want) -> float:
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / scale) if scale else float(np.abs(got).max(initial=0))


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(FORMATS), per_head=st.booleans(), seed=st.integers(0, 2**31),
       heads=st.sampled_from(((2, 1), (4, 2), (3, 3))), sq=st.sampled_from((1, 2, 5)),
       snew=st.sampled_from((0, 1, 3)), dtype=st.sampled_from(("bfloat16", "float16")),
       causal=st.booleans())
def test_fp8_cache_matches_the_oracle_on_the_dequantized_cache(fmt, per_head, seed, heads, sq,
                                                                snew, dtype, causal):
    heads_q, heads_k = heads
    rng = np.random.default_rng(seed)
    batch, smax, d = 2, 24, 16
    tdtype = getattr(torch, dtype)
    shape_k = (heads_k,) if per_head else ()
    k_scale = torch.tensor(rng.uniform(0.05, 2.0, shape_k), dtype=torch.float32)
    v_scale = torch.tensor(rng.uniform(0.05, 2.0, shape_k), dtype=torch.float32)
    sv = (lambda s: s.reshape(-1, 1, 1) if per_head else s)  # noqa: E731  bhsd broadcast
    k_cache = quantize(torch.from_numpy(rng.standard_normal((batch, heads_k, smax, d))), sv(k_scale), fmt)
    v_cache = quantize(torch.from_numpy(rng.standard_normal((batch, heads_k, smax, d))), sv(v_scale), fmt)
    lengths = torch.tensor(rng.integers(0, smax - snew + 1, batch), dtype=torch.int32)
    q = torch.from_numpy(rng.standard_normal((batch, heads_q, sq, d))).to(tdtype)
    k_new = torch.from_numpy(rng.standard_normal((batch, heads_k, snew, d))).to(tdtype)
    v_new = torch.from_numpy(rng.standard_normal((batch, heads_k, snew, d))).to(tdtype)
    out, lse = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new,
                                      v_new=v_new, k_scale=k_scale, v_scale=v_scale,
                                      causal=causal, return_lse=True)
    assert out.dtype == tdtype and k_cache.dtype == fmt
    kd = k_cache.double() * sv(k_scale).double()
    vd = v_cache.double() * sv(v_scale).double()
    for b in range(batch):
        n = int(lengths[b])
        # the append: the new rows are x / scale rounded to the format, read back as fp8 * scale
        want_k = quantize(k_new[b], sv(k_scale), fmt)
        assert torch.equal(k_cache[b, :, n:n + snew].view(torch.uint8), want_k.view(torch.uint8))
        sk = n + snew
        wo, wl = reference.exact_attention_bhsd(
            q[b:b + 1].double().numpy(), kd[b:b + 1, :, :sk].numpy(), vd[b:b + 1, :, :sk].numpy(),
            causal=causal, scale=d ** -0.5)
        assert rel_error(out[b:b + 1].double().numpy(), wo) <= TOLERANCE[dtype]
        np.testing.assert_allclose(lse[b:b + 1].numpy(), wl, rtol=LSE_TOLERANCE[dtype],
                                   atol=LSE_TOLERANCE[dtype])


@pytest.mark.parametrize("fmt, largest", [(torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)])
def test_quantize_saturates_and_rounds_to_nearest_even(fmt, largest):
    x = torch.tensor([1e9, -1e9, largest * 2, float("nan"), 1.0, 0.0])
    got = quantize(x, torch.tensor(1.0), fmt).float()
    assert got[:3].tolist() == [largest, -largest, largest]
    assert torch.isnan(got[3]) and got[4] == 1.0 and got[5] == 0.0
    # halfway between 1 and the next value (1 + 2^-m): ties go to the even mantissa (1.0)
    mantissa = 3 if fmt == torch.float8_e4m3fn else 2
    assert quantize(torch.tensor([1 + 2.0 ** -(mantissa + 1)]), torch.tensor(1.0), fmt).float() == 1.0


def _fp8_args():
    q = torch.randn(1, 2, 1, 8, dtype=torch.bfloat16)
    cache = torch.zeros(1, 2, 16, 8).to(torch.float8_e4m3fn)
    return q, cache, cache.clone()


@pytest.mark.parametrize("change, error, message", [
    (dict(k_scale=None), TypeError, "k_scale: expected a float32 tensor"),
    (dict(v_scale=torch.ones(2, dtype=torch.float64)), TypeError, "v_scale: expected dtype float32"),
    (dict(k_scale=torch.ones(3)), ValueError, r"k_scale: expected shape \(\), \(1,\) or \(2,\)"),
    (dict(k_scale=np.ones(2, np.float32)), TypeError, "k_scale: expected a torch tensor"),
    (dict(v_cache=torch.zeros(1, 2, 16, 8).to(torch.float8_e5m2)), TypeError,
     "v_cache: expected dtype float8_e4m3fn"),
    (dict(k_cache=torch.zeros(1, 2, 16, 8, dtype=torch.bfloat16)), TypeError,
     "k_cache: expected a torch float8_e4m3fn or float8_e5m2"),
])
def test_bad_fp8_arguments_raise_naming_the_argument(change, error, message):
    q, k_cache, v_cache = _fp8_args()
    args = dict(k_cache=k_cache, v_cache=v_cache, k_scale=torch.ones(()), v_scale=torch.ones(1))
    args.update(change)
    with pytest.raises(error, match=message):
        attention_with_kvcache(q, args["k_cache"], args["v_cache"], cache_seqlens=3,
                               k_scale=args["k_scale"], v_scale=args["v_scale"])
