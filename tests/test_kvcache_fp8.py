"""FP8 KV caches in attention_with_kvcache, on every backend (the `backend` fixture; torch only:
CuPy has no float8 dtype): the output against the float64 oracle on the dequantized cache (after
the append), the append's codes against xattn.kvcache.quantize (the reference rule: saturate,
round to nearest even), every other byte of the caches unchanged, per-tensor and per-head scales
(a strided per-head view too), contiguous and paged caches, and the validation of k_cache /
k_scale / v_scale. Cache rows past each sequence's keys and unused pages hold the NaN code, so a
kernel that reads one turns its output NaN. The hip paths run the portable HIP decode with
KV_FP8 (on NVIDIA: hip-on-cuda; hip-on-cuda-wave64 would run the same wave32 decode again, so it
is skipped there)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import LSE_TOLERANCE, TOLERANCE
from test_kvcache import _paginate
from test_properties import assert_matches
from xattn import kvcache, reference

torch = pytest.importorskip("torch")
from xattn.kvcache import attention_with_kvcache, quantize  # noqa: E402

FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALES = ("tensor", "tensor1", "head", "head_strided")  # (), (1,), (Hk,), (Hk,) with stride 2
EXAMPLES = {"reference": 8, "cuda": 10, "hip": 10, "hip-on-cuda": 6}  # per (format, paged) pair


def _skip_repeated_path(backend):
    if backend.name == "hip-on-cuda-wave64":  # conftest.HIP_ON_CUDA_TARGETS: the same decode rows
        pytest.skip("the decode runs hip-on-cuda's wave32 rows on this path too")


def _torch_kinds(backend):
    return [(library, dtype) for library, dtype in backend.kinds if library == "torch"]


@st.composite
def cases(draw, backend, fmt, paged):
    heads_q, heads_k = draw(st.sampled_from(((2, 1), (4, 2), (3, 3), (8, 1), (8, 2))))
    smax = draw(st.sampled_from((1, 16, 24, 65, 130)))
    snew = draw(st.sampled_from((0, 1, 3)).filter(lambda n: n <= smax))
    batch = draw(st.integers(1, 3))
    room = smax - snew
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from(_torch_kinds(backend)))[1]
    # bfloat16 queries far past float16's range, or deep in its subnormals, with K's scale divided
    # by the same gain (the same scores): the tensor-core kernel multiplies in float16
    # (decode_common.h, q_tile_scale)
    q_gain = draw(st.sampled_from((1.0, 1.0, 2.0**15, 2.0**-15))) if dtype == "bfloat16" else 1.0
    return dict(
        fmt=fmt, scales=draw(st.sampled_from(SCALES)),
        batch=batch, heads_q=heads_q, heads_k=heads_k, seqlen_q=draw(st.sampled_from((1, 2, 5))),
        seqlen_max=smax, seqlen_new=snew,
        lengths=[draw(st.sampled_from((0, room)) | st.integers(0, room)) for _ in range(batch)],
        head_dim=draw(st.sampled_from((1, 7, 16, 32, 64, 80, 128, 256))),
        layout=draw(st.sampled_from(("bhsd", "bshd"))), causal=causal,
        window=draw(st.sampled_from((None, None, (3, 0) if causal else (3, 2)))),
        softcap=draw(st.sampled_from((None, None, 20.0))),
        paged=draw(st.sampled_from((16, 32, 48))) if paged else None,
        share_pages=draw(st.booleans()),
        cache_memory=draw(st.sampled_from(("contiguous", "sliced"))),
        saturate=draw(st.sampled_from((False, False, True))),
        dtype=dtype, q_gain=q_gain, seed=draw(st.integers(0, 2**31)))


def _scales(c, rng, device):
    """k_scale and v_scale as the case asks: one per tensor, or one per kv head; k_scale divided
    by the case's q_gain (the same scores for q * q_gain)."""
    out = []
    for gain in (c.get("q_gain", 1.0), 1.0):
        kind, hk = c["scales"], c["heads_k"]
        values = rng.uniform(0.05, 2.0, hk if kind.startswith("head") else 1) / gain
        if kind == "head_strided":
            full = torch.zeros(2 * hk, dtype=torch.float32)
            full[::2] = torch.from_numpy(values).float()
            out.append(full.to(device)[::2])
        else:
            shape = {"tensor": (), "tensor1": (1,), "head": (hk,)}[kind]
            out.append(torch.from_numpy(values).float().reshape(shape).to(device))
    return out


def _per_head(scale, c, bhsd_axis):
    """A scale broadcast against (B, Hk, S, D) (bhsd_axis) or (P, page_size, Hk, D) data."""
    s = scale.cpu().double().reshape(-1)
    if s.numel() == 1:
        return s.reshape(())
    return s.reshape(-1, 1, 1) if bhsd_axis else s.reshape(-1, 1)


def make(backend, c):
    """The call's arguments on the backend's device and what the checks need on the host."""
    rng = np.random.default_rng(c["seed"])
    device = backend.device
    b, hq, hk, sq, smax, snew, d = (c[k] for k in ("batch", "heads_q", "heads_k", "seqlen_q",
                                                     "seqlen_max", "seqlen_new", "head_dim"))
    k_scale, v_scale = _scales(c, rng, device)
    gain = c.get("q_gain", 1.0)
    caches = [rng.standard_normal((b, hk, smax, d)) for _ in range(2)]
    for cache in caches:  # rows past each old length: the NaN code until the append lands
        for i, length in enumerate(c["lengths"]):
            cache[i, :, length:] = np.nan
    spread = 3e3 if c["saturate"] else 1.0  # x / scale past 448 (e4m3fn) or 57344: saturated
    new = [spread * rng.standard_normal((b, hk, snew, d)) for _ in range(2)]
    new[0] = new[0] / gain
    tdtype = getattr(torch, c["dtype"])

    def layout(x):  # (B, H, S, D) float64 -> the layout's order
        return x if c["layout"] == "bhsd" else x.transpose(0, 2, 1, 3)

    args = {}
    if c["paged"]:
        pages, table = _paginate(caches, dict(c, seqlen_max=smax), rng)
        for name, x, scale in zip(("k_cache", "v_cache"), pages, (k_scale, v_scale)):
            args[name] = quantize(torch.from_numpy(x), _per_head(scale, c, False).float(),
                                  c["fmt"]).to(device)
        args["block_table"] = torch.from_numpy(table).to(device)
    else:
        for name, x, scale in zip(("k_cache", "v_cache"), caches, (k_scale, v_scale)):
            codes = quantize(torch.from_numpy(x), _per_head(scale, c, True).float(), c["fmt"])
            codes = codes if c["layout"] == "bhsd" else codes.transpose(1, 2)
            if c["cache_memory"] == "sliced":  # a view of a larger buffer along the sequence
                seq_axis = 2 if c["layout"] == "bhsd" else 1
                shape = list(codes.shape)
                shape[seq_axis] += 3
                buffer = torch.full(shape, float("nan")).to(c["fmt"])
                buffer.narrow(seq_axis, 1, smax).copy_(codes)
                args[name] = buffer.to(device).narrow(seq_axis, 1, smax)
            else:
                args[name] = codes.contiguous().to(device)
    q = torch.from_numpy(layout(gain * rng.standard_normal((b, hq, sq, d)))).to(tdtype).to(device)
    k_new, v_new = (torch.from_numpy(layout(x)).to(tdtype).to(device) for x in new)
    lengths = torch.tensor(c["lengths"], dtype=torch.int32, device=device)
    return q, args, k_new, v_new, k_scale, v_scale, lengths


def _bhsd(x, c):
    return x if c["layout"] == "bhsd" else x.transpose(1, 2)


def check(backend, c):
    q, args, k_new, v_new, k_scale, v_scale, lengths = make(backend, c)
    before = {name: args[name].cpu().view(torch.uint8).clone() for name in ("k_cache", "v_cache")}
    out, lse = attention_with_kvcache(
        q, args["k_cache"], args["v_cache"], cache_seqlens=lengths, k_new=k_new, v_new=v_new,
        k_scale=k_scale, v_scale=v_scale, causal=c["causal"], window=c["window"],
        softcap=c["softcap"], layout=c["layout"], return_lse=True,
        block_table=args.get("block_table"))
    assert out.dtype == q.dtype and tuple(out.shape) == tuple(q.shape)
    assert args["k_cache"].dtype == c["fmt"]
    d, hk, snew = c["head_dim"], c["heads_k"], c["seqlen_new"]
    table = args["block_table"].cpu().numpy() if c["paged"] else None
    keys = []  # per sequence and cache: its first length + Snew rows, (1, Hk, Sk, D) float64
    for name, new, scale in (("k_cache", k_new, k_scale), ("v_cache", v_new, v_scale)):
        after = args[name].cpu()
        want_codes = before[name].clone()
        codes_new = quantize(_bhsd(new, c).cpu(), _per_head(scale, c, True).float(), c["fmt"])
        if c["paged"]:
            for i, n in enumerate(c["lengths"]):
                for t in range(snew):
                    page, row = divmod(n + t, c["paged"])
                    want_codes[table[i, page], row] = codes_new[i, :, t].view(torch.uint8)
            values = after.double() * _per_head(scale, c, False)
            rows = [values[table[i]].reshape(-1, hk, d)[:n + snew].permute(1, 0, 2)[None]
                    for i, n in enumerate(c["lengths"])]
        else:
            want_b = _bhsd(want_codes, c)
            for i, n in enumerate(c["lengths"]):
                want_b[i, :, n:n + snew] = codes_new[i].view(torch.uint8)
            values = _bhsd(after, c).double() * _per_head(scale, c, True)
            rows = [values[i:i + 1, :, :n + snew] for i, n in enumerate(c["lengths"])]
        # the append wrote exactly the new rows' codes; every other byte is unchanged
        assert torch.equal(after.view(torch.uint8), want_codes), f"{name} after the call"
        keys.append(rows)
    scale = 1 / math.sqrt(d)
    qd = _bhsd(q, c).cpu().double().numpy()
    outs, lses, largest = [], [], 0.0
    for i in range(c["batch"]):
        k, v = keys[0][i].numpy(), keys[1][i].numpy()
        o, l_ = reference.exact_attention_bhsd(qd[i:i + 1], k, v, causal=c["causal"], scale=scale,
                                               window=c["window"] or (-1, -1),
                                               softcap=c["softcap"] or 0.0)
        outs.append(o)
        lses.append(l_)
        if k.shape[2] and qd.shape[2]:
            sums = np.abs(qd[i]) @ np.abs(np.repeat(k[0], c["heads_q"] // hk, axis=0)).swapaxes(-1, -2)
            largest = max(largest, float(sums.max()))
    rounding = 2.0**-24 * scale * largest if c["dtype"] == "float32" else 0.0
    assert_matches(_bhsd(out, c).cpu().double().numpy(), lse.cpu().double().numpy(),
                   np.concatenate(outs), np.concatenate(lses), c["dtype"], score_error=rounding)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_fp8_cache_matches_the_oracle_on_the_dequantized_cache(backend, fmt, paged):
    _skip_repeated_path(backend)

    @settings(max_examples=EXAMPLES[backend.name])
    @given(c=cases(backend, fmt, paged))
    def run(c):
        check(backend, c)

    run()


FIXED = [  # (B, Hq, Hk, Sq, Smax, Snew, D, lengths, paged, scales): decode shapes and edges
    (8, 32, 8, 1, 700, 1, 128, [699, 0, 1, 350, 64, 65, 100, 699], None, "head"),
    (2, 8, 2, 1, 300, 1, 128, [0, 299], 16, "tensor"),
    (3, 32, 4, 1, 130, 0, 64, [130, 0, 65], 32, "head_strided"),
    (1, 8, 1, 16, 200, 16, 128, [184], None, "tensor1"),
    (2, 4, 4, 5, 65, 3, 7, [62, 1], None, "head"),
    (1, 2, 2, 40, 40, 40, 256, [0], 16, "tensor"),
]


@pytest.mark.parametrize("shape", FIXED, ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_fp8_decode_shapes(backend, shape, fmt):
    _skip_repeated_path(backend)
    b, hq, hk, sq, smax, snew, d, lengths, paged, scales = shape
    for i, (_, dtype) in enumerate(_torch_kinds(backend)):
        for layout, causal, window, softcap in (("bhsd", True, None, None), ("bshd", False, (40, 2), 20.0)):
            check(backend, dict(fmt=fmt, scales=scales, batch=b, heads_q=hq, heads_k=hk,
                                seqlen_q=sq, seqlen_max=smax, seqlen_new=snew, lengths=lengths,
                                head_dim=d, layout=layout, causal=causal, window=window,
                                softcap=softcap, paged=paged, share_pages=True,
                                cache_memory="contiguous", saturate=i == 1, dtype=dtype, seed=i))


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("paged", [None, 16])
def test_fp8_every_output_element_is_written(backend, splits, paged, monkeypatch):
    """The launch below the public function, with out, lse and the split workspace poisoned with
    NaN and device lengths clamped (-4 and past Smax): every element read or returned is written,
    the clamped append lands only where it may. On every GPU path (the cuda decode, the HIP one)."""
    if backend.name == "reference":
        pytest.skip("a GPU launch: the reference backend has none")
    _skip_repeated_path(backend)
    monkeypatch.setattr(kvcache, "_FORCED_SPLITS", splits)
    kvcache.num_splits.cache_clear()
    kvcache._plans.clear()
    try:
        fmt, d, hq, hk, smax = torch.float8_e4m3fn, 128, 8, 2, 96
        gen = torch.Generator().manual_seed(splits)
        q = torch.randn(3, hq, 2, d, generator=gen).bfloat16().cuda()
        k_scale = torch.tensor([0.5, 2.0]).cuda()
        v_scale = torch.tensor(0.25).cuda()
        if paged:
            shape, table = (3 * smax // paged + 1, paged, hk, d), torch.randperm(3 * smax // paged)
            block_table = table.reshape(3, -1).int().cuda()
        else:
            shape, block_table = (3, hk, smax, d), None
        k_cache = (torch.randn(shape, generator=gen) * 0.5).to(fmt).cuda()
        v_cache = (torch.randn(shape, generator=gen) * 4).to(fmt).cuda()
        k_new, v_new = (torch.randn(3, hk, 2, d, generator=gen).bfloat16().cuda() for _ in range(2))
        lengths = torch.tensor([-4, 40, 500], dtype=torch.int32, device="cuda")
        before = [x.cpu().view(torch.uint8).clone() for x in (k_cache, v_cache)]
        out = torch.full_like(q, float("nan"))
        lse = torch.full((3, hq, 2), float("nan"), device="cuda")
        kvcache.launch_for_check(q, k_cache, v_cache, lengths, out, lse,
                                 lambda n: torch.full((n,), float("nan"), device="cuda"),
                                 k_new=k_new, v_new=v_new, block_table=block_table,
                                 k_scale=k_scale, v_scale=v_scale)
        assert not out.isnan().any() and not lse.isnan().any()
        for i, start in enumerate((0, 40, smax)):  # clamped lengths
            keep = min(start + 2, smax) - start
            ks, vs = k_scale.cpu().double().reshape(-1, 1, 1), v_scale.cpu().double()
            rows = []
            for cache, old, new, scale in ((k_cache, before[0], k_new, k_scale), (v_cache, before[1], v_new, v_scale)):
                codes = cache.cpu()
                want = quantize(new[i].cpu(), scale.cpu().reshape(-1, 1, 1) if scale.dim() else scale.cpu(), fmt)
                if paged:
                    seq = codes[block_table[i].cpu()].permute(2, 0, 1, 3).reshape(hk, -1, d)
                else:
                    seq = codes[i]
                assert torch.equal(seq[:, start:start + keep].view(torch.uint8), want[:, :keep].view(torch.uint8))
                rows.append(seq[:, :start + keep])
            k = rows[0].double() * ks
            v = rows[1].double() * vs
            want_out, want_lse = reference.exact_attention_bhsd(
                q[i:i + 1].cpu().double().numpy(), k[None].numpy(), v[None].numpy(), causal=True,
                scale=1 / math.sqrt(d))
            assert_matches(out[i:i + 1].cpu().double().numpy(), lse[i:i + 1].cpu().double().numpy(),
                           want_out, want_lse, "bfloat16")
        if not paged:  # sequence 0's rows past the 2 appended ones, and all of 2's: unchanged
            for cache, old in zip((k_cache, v_cache), before):
                assert torch.equal(cache.cpu().view(torch.uint8)[0, :, 2:], old[0, :, 2:])
                assert torch.equal(cache.cpu().view(torch.uint8)[2], old[2])
    finally:
        kvcache.num_splits.cache_clear()
        kvcache._plans.clear()


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
    (dict(k_new=torch.zeros(1, 2, 1, 8), v_new=torch.zeros(1, 2, 1, 8)), TypeError,
     "k_new: expected dtype bfloat16 \\(as q\\), got float32"),
    (dict(k_cache=torch.zeros(1, 2, 15, 8).to(torch.float8_e4m3fn)), ValueError,
     r"v_cache: expected shape \(1, 2, 15, 8\)"),
])
def test_bad_fp8_arguments_raise_naming_the_argument(change, error, message):
    q, k_cache, v_cache = _fp8_args()
    args = dict(k_cache=k_cache, v_cache=v_cache, k_scale=torch.ones(()), v_scale=torch.ones(1),
                k_new=None, v_new=None)
    args.update(change)
    with pytest.raises(error, match=message):
        attention_with_kvcache(q, args["k_cache"], args["v_cache"], cache_seqlens=3,
                               k_new=args["k_new"], v_new=args["v_new"],
                               k_scale=args["k_scale"], v_scale=args["v_scale"])


def test_tolerances_are_the_table():
    """The bounds above are tests/tolerances.py's (imported through conftest), never local."""
    from tolerances import TOLERANCES
    assert TOLERANCE is TOLERANCES["out"] and LSE_TOLERANCE is TOLERANCES["lse"]
