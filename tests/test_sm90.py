"""The Hopper kernels (xattn/sm90.py, kernels_cuda/sm90/). On the CPU: every forward and backward
row compiles with NVRTC for sm_90a without spills (the causal D64 backward row within its known
8 bytes), the generated wgmma header is current, every
row fits in shared memory, and the backward's routing rule declines what the kernel does not
serve. On an sm_90 GPU (marker gpu): xattn.sm90.forward against the float64 oracle
xattn.exact_attention, and xattn.cuda.backward on the sm90 backward against the float64
gradient oracle, with NaN-poisoned outputs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import xattn
from conftest import LSE_TOLERANCE, TOLERANCE, to_float64
from xattn import jit, kernels, launch, reference, sm90

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))

HAS_NVRTC = importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None
FORWARD, BACKWARD = kernels.cuda("flash_fwd_sm90"), kernels.cuda("flash_bwd_sm90")


# ---- CPU ------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_NVRTC, reason="cuda-bindings (NVRTC) is not installed")
@pytest.mark.parametrize("row", sm90.ROWS, ids=lambda r: f"D{r.head_dim}-{'causal' if r.causal else 'full'}")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rows_compile_for_sm90a_without_spills(row, dtype):
    from compile_kernels import nvrtc_compile, report

    # the modifiers and sinks once per row: in bf16 with packed batches (one CTA per query block),
    # in fp16 on the persistent grid (which any row may run: sm90.forward's ctas)
    flags = {"IS_CAUSAL": int(row.causal), "IS_LOCAL": 1, "HAS_SOFTCAP": int(not row.causal),
             "HAS_ALIBI": int(row.causal), "HAS_SINKS": 1}
    if dtype == "bfloat16":
        flags["IS_VARLEN"] = 1
    else:
        flags["PERSISTENT"] = 1
    # the variant a call runs: the row's own, or the first simpler one without spills (sm90.plan)
    reports = []
    for defines in sm90.forward_variants(row, dtype, flags):
        options = ["--gpu-architecture=sm_90a", "-std=c++17", "-Xptxas=-v", *jit.define_options(defines)]
        ok, log = nvrtc_compile(jit.preprocess("cuda", FORWARD.source), "flash_fwd.cu", options)
        assert ok, log
        assert "wgmma" not in log.lower() or "serializ" not in log.lower(), log  # ptxas' wgmma serialization warning
        info = report(log, FORWARD.entry)
        reports.append((defines, info))
        if info["spill_stores"] == info["spill_loads"] == info["stack"] == 0:
            break
    assert info["spill_stores"] == info["spill_loads"] == info["stack"] == 0, reports
    # setmaxnreg moves registers between roles only from the launch's 65536 / 384 = 168 per thread
    assert info["registers"] == 168, info


def test_generated_wgmma_header_is_current():
    from gen_wgmma_ops import OUT, render

    assert OUT.read_text() == render(), "run python ci/gen_wgmma_ops.py"


@pytest.mark.skipif(not HAS_NVRTC, reason="cuda-bindings (NVRTC) is not installed")
@pytest.mark.parametrize("row", sm90.BWD_ROWS, ids=lambda r: f"D{r.head_dim}-{'causal' if r.causal else 'full'}")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_rows_compile_for_sm90a_within_their_local_memory(row, dtype):
    """No spills, except the causal D64 row's known 8 bytes (sm90.BwdRow.local_bytes: measured
    faster with them than the spill-free dQ path), and no more than those."""
    from compile_kernels import nvrtc_compile, report

    flags = {"IS_CAUSAL": int(row.causal), "IS_LOCAL": 0, "HAS_SOFTCAP": 0, "HAS_ALIBI": 0}
    if dtype == "bfloat16" and row.modifiers:  # the modifiers too, where the row serves them
        flags.update(IS_LOCAL=1, HAS_SOFTCAP=int(not row.causal), HAS_ALIBI=int(row.causal))
    options = ["--gpu-architecture=sm_90a", "-std=c++17", "-Xptxas=-v",
               *jit.define_options(BACKWARD.defines(row, dtype, flags=flags))]
    ok, log = nvrtc_compile(jit.preprocess("cuda", BACKWARD.source), "flash_bwd.cu", options)
    assert ok, log
    assert "wgmma" not in log.lower() or "serializ" not in log.lower(), log
    info = report(log, BACKWARD.entry)
    assert max(info["spill_stores"], info["spill_loads"], info["stack"]) <= row.local_bytes, info
    assert info["registers"] == 168, info  # 65536 / 384 at launch; setmaxnreg splits them


@pytest.mark.skipif(not HAS_NVRTC, reason="cuda-bindings (NVRTC) is not installed")
@pytest.mark.parametrize("causal", [False, True])
def test_backward_tma_dq_path_compiles_at_d128(causal):
    """The D128 rows' other dQ path (TMA reduce-add, checked on an H200, not yet the rows' choice)
    keeps compiling without spills, with every modifier."""
    from compile_kernels import nvrtc_compile, report

    row = sm90.select_backward(128, causal)._replace(dq_tma=True)
    for flags in ({}, {"IS_LOCAL": 1}, {"HAS_SOFTCAP": 1}, {"HAS_ALIBI": 1}):
        defines = BACKWARD.defines(row, "bfloat16", flags=_PLAIN | {"IS_CAUSAL": int(causal)} | flags)
        options = ["--gpu-architecture=sm_90a", "-std=c++17", "-Xptxas=-v", *jit.define_options(defines)]
        ok, log = nvrtc_compile(jit.preprocess("cuda", BACKWARD.source), "flash_bwd.cu", options)
        assert ok, log
        info = report(log, BACKWARD.entry)
        assert info["spill_stores"] == info["spill_loads"] == info["stack"] == 0, (flags, info)
        assert info["registers"] == 168, info
    assert BACKWARD.shared_memory(defines) <= sm90.SMEM_LIMIT


def test_backward_rows_fit_in_shared_memory():
    for row in sm90.BWD_ROWS:
        assert BACKWARD.shared_memory(BACKWARD.defines(row, "bfloat16", flags={})) <= sm90.SMEM_LIMIT, row
    assert [sm90.select_backward(d, False).head_dim for d in (8, 64, 72, 128, 136, 256)] == [64, 64, 128, 128, 256, 256]
    assert sm90.select_backward(264, False) is None and sm90.select_backward(256, True).block_n == 64


def _views(dtype="bfloat16", head_dim=128, q_heads=4, kv_heads=2, sq=300, sk=200, ptr=1 << 20):
    """launch.Array views (B, H, S, D) of contiguous q, k, v, dout, dq, dk, dv at aligned pointers."""

    def view(heads, s):
        return launch.Array(ptr, (2, heads, s, head_dim), (heads * s * head_dim, s * head_dim, head_dim, 1),
                            dtype, 0)

    q, k = view(q_heads, sq), view(kv_heads, sk)
    return (q, k, k, q, q, k, k)


_PLAIN = {"IS_CAUSAL": 0, "IS_LOCAL": 0, "HAS_SOFTCAP": 0, "HAS_ALIBI": 0}


def test_backward_routing_rule():
    """What the sm90 backward serves, and what stays on the mma.sync kernels."""
    def serves(views=None, defines=_PLAIN, varlen=False, aligned=True):
        return sm90.supports_backward(*(views or _views()), defines, varlen=varlen, aligned=aligned)

    assert serves() and serves(_views("float16", 64)) and serves(_views(head_dim=72))
    assert serves(defines=_PLAIN | {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1})
    assert serves(varlen=True) and serves(_views(head_dim=256), varlen=True)  # packed batches
    assert not serves(_views(head_dim=64), varlen=True)    # D64 packed batches spill (mma.sync)
    assert not serves(aligned=False)                       # a pointer not 16-byte aligned
    assert not serves(_views("float32"))                   # no tensor-core float32
    assert serves(_views(head_dim=136)) and serves(_views(head_dim=256))  # the shared-keys row
    assert not serves(_views(head_dim=264))                # no row above D256
    assert not serves(_views(head_dim=60))                 # dQ's float32 pairs: D % 8
    assert not serves(_views(head_dim=64), _PLAIN | {"HAS_ALIBI": 1})  # D64 rows: no modifiers
    assert not serves(_views(head_dim=64), _PLAIN | {"IS_LOCAL": 1, "IS_CAUSAL": 1})
    q, k, v, dout, dq, dk, dv = _views()
    assert not serves((q._replace(ptr=q.ptr + 2), k, v, dout, dq, dk, dv))  # TMA: 16-byte base
    odd_rows = k._replace(strides=(k.strides[0], k.strides[1], 132, 1))     # rows 264 bytes apart
    assert not serves((q, k, v, dout, dq, dk, odd_rows))


def test_rows_fit_in_shared_memory():
    for row in sm90.ROWS:
        assert FORWARD.shared_memory(FORWARD.defines(row, "bfloat16", flags={})) <= sm90.SMEM_LIMIT, row
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


def assert_matches_oracle(got, got_lse, want, want_lse, dtype, label=""):
    """A forward's out and lse (float64, poisoned with NaN before the launch) against the float64
    oracle's: every element written, out within the suite's tolerance, lse infinite exactly where
    the oracle's is and close elsewhere."""
    assert not np.isnan(got).any() and not np.isnan(got_lse).any(), f"{label}an output element was not written"
    error = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert error <= TOLERANCE[dtype], (label, error)
    assert np.array_equal(np.isfinite(got_lse), np.isfinite(want_lse)), label
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[finite], want_lse[finite], rtol=LSE_TOLERANCE[dtype],
                               atol=LSE_TOLERANCE[dtype], err_msg=label)


def _variant_options(causal, window, modifier, q_heads, rng) -> dict:
    """attention()'s window/softcap/alibi_slopes keywords of a drawn variant (slopes in NumPy)."""
    options = {}
    if causal and window is not None and window[1] > 0:
        window = (window[0], 0)  # the API's rule: causal hides every key right of the diagonal
    if window is not None:
        options["window"] = window
    if modifier == "softcap":
        options["softcap"] = 20.0
    elif modifier == "alibi":
        options["alibi_slopes"] = rng.random(q_heads)
    return options


@pytest.mark.gpu
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 4]),
       sq=st.sampled_from([1, 2, 63, 64, 65, 127, 128, 129, 300]),
       sk=st.sampled_from([1, 63, 65, 80, 81, 128, 129, 300]),
       head_dim=st.sampled_from([8, 32, 64, 72, 96, 128, 136, 160, 192, 200, 256]),
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
    options = _variant_options(causal, window, modifier, q_heads, rng)
    if "alibi_slopes" in options:
        options["alibi_slopes"] = torch.from_numpy(options["alibi_slopes"]).to("cuda", torch.float32)
    scale = 1 / math.sqrt(head_dim)
    assert sm90.supports(q, k, v, q, None, causal=causal, **options)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, q_heads, sq), float("nan"), device="cuda")
    sm90.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=torch.cuda.current_stream().cuda_stream,
                 **options)
    torch.cuda.synchronize()
    ref_out, ref_lse = xattn.exact_attention(q, k, v, causal=causal, scale=scale, **options)
    assert_matches_oracle(to_float64(out), to_float64(lse), ref_out, ref_lse, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rise", [2.0, 7.0, 20.0])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_scores_rising_along_the_visit_order(hopper, rise, head_dim, causal, dtype):
    """The lazy rescaling (flash_fwd.cu, RESCALE_SLACK): key tiles are visited right to left, and
    here the scores grow towards the left by `rise` (base 2) every 128 keys, so a row's running max
    rises tile after tile, by less than the slack (kept: P above 1) or more (O and l rescaled), over
    noise. out and lse against the float64 oracle, NaN-poisoned."""
    import torch

    batch, heads, sq, sk = 1, 2, 200, 1000
    rng = np.random.default_rng(int(rise) * 1000 + head_dim + causal)
    scale = 1 / math.sqrt(head_dim)
    q, k, v = (0.5 * rng.standard_normal((batch, heads, s, head_dim)) for s in (sq, sk, sk))
    q[..., 0] = 1.0
    k[..., 0] = rise * math.log(2) / 128 * (sk - np.arange(sk)) / scale  # scale * q.k: the ramp, natural units
    Q, K, V = (torch.from_numpy(x).to("cuda", getattr(torch, dtype)) for x in (q, k, v))
    out = torch.full_like(Q, float("nan"))
    lse = torch.full((batch, heads, sq), float("nan"), device="cuda")
    sm90.forward(Q, K, V, out, lse, causal=causal, scale=scale, stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    seen = [to_float64(x) for x in (Q, K, V)]
    want, want_lse = reference.exact_attention_bhsd(*seen, causal=causal, scale=scale)
    assert_matches_oracle(to_float64(out), to_float64(lse), want, want_lse, dtype)


@pytest.mark.gpu
@settings(max_examples=30)
@given(lengths=st.lists(st.tuples(st.sampled_from([0, 1, 63, 64, 65, 129, 200]),
                                  st.sampled_from([1, 17, 80, 112, 113, 176, 177, 300])),
                        min_size=1, max_size=4),
       kv_heads=st.integers(1, 2), group=st.sampled_from([1, 3]),
       head_dim=st.sampled_from([64, 72, 128, 192, 256]), causal=st.booleans(),
       dtype=st.sampled_from(["float16", "bfloat16"]), sinks=st.booleans(),
       window=st.sampled_from([None, (40, 0), (17, 33)]), seed=st.integers(0, 2**16))
def test_packed_batches_and_sinks_match_each_sequence_alone(hopper, lengths, kv_heads, group, head_dim, causal,
                                                            dtype, sinks, window, seed):
    """A packed batch on the sm90 kernel: each sequence's out and lse against the float64 oracle
    of that sequence alone (with its sinks). The last sequence's V holds an infinity in every row:
    the sequences before it read those rows past their own end (a key tile runs on into the next
    sequence) and must still come out finite and exact. Outputs NaN-poisoned before the launch."""
    import torch

    q_heads = kv_heads * group
    rng = np.random.default_rng(seed)
    lengths = lengths + [(5, 7)]  # the poisoned last sequence
    cu_q, cu_k = (np.concatenate([[0], np.cumsum([l[i] for l in lengths])]).astype(np.int32) for i in (0, 1))
    q = rng.standard_normal((q_heads, cu_q[-1], head_dim))
    k, v = (rng.standard_normal((kv_heads, cu_k[-1], head_dim)) for _ in range(2))
    v[:, cu_k[-2]:] = np.inf
    sink_values = rng.uniform(-3, 3, q_heads).astype(np.float32) if sinks else None
    options = {"window": window} if window is not None and not (causal and window[1] > 0) else {}
    torch_dtype = getattr(torch, dtype)
    Q, K, V = (torch.from_numpy(x).to("cuda", torch_dtype)[None] for x in (q, k, v))  # (1, H, T, D)
    cu = tuple(torch.from_numpy(c).to("cuda") for c in (cu_q, cu_k))
    max_seqlen = (max(l[0] for l in lengths), max(l[1] for l in lengths))
    sink_tensor = torch.from_numpy(sink_values).to("cuda") if sinks else None
    assert sm90.supports(Q, K, V, Q, None, causal=causal, cu_seqlens=cu, max_seqlen=max_seqlen, **options)
    out = torch.full_like(Q, float("nan"))
    lse = torch.full((1, q_heads, int(cu_q[-1])), float("nan"), device="cuda")
    scale = 1 / math.sqrt(head_dim)
    sm90.forward(Q, K, V, out, lse, causal=causal, scale=scale, stream=torch.cuda.current_stream().cuda_stream,
                 cu_seqlens=cu, max_seqlen=max_seqlen, sinks=sink_tensor, **options)
    torch.cuda.synchronize()
    seen = [to_float64(x)[0] for x in (Q, K, V)]
    got, got_lse = to_float64(out)[0], to_float64(lse)[0]
    for b in range(len(lengths) - 1):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if rows.start == rows.stop:
            continue
        want, want_lse = reference.exact_attention_bhsd(
            seen[0][None, :, rows], seen[1][None, :, keys], seen[2][None, :, keys], causal=causal,
            scale=scale, sinks=None if sink_values is None else sink_values.astype(np.float64),
            **options)
        part, part_lse = got[:, rows], got_lse[:, rows]
        assert np.isfinite(part).all(), f"sequence {b}: not finite"
        assert_matches_oracle(part, part_lse, want[0], want_lse[0], dtype, label=f"sequence {b}: ")


@pytest.mark.gpu
@settings(max_examples=30)
@given(ctas=st.sampled_from([1, 2, 3, 5]), batch=st.integers(1, 3), kv_heads=st.integers(1, 2),
       group=st.sampled_from([1, 3]), sq=st.sampled_from([1, 129, 300, 640]), sk=st.sampled_from([1, 100, 300, 700]),
       head_dim=st.sampled_from([64, 128, 192, 256]), causal=st.booleans(),
       dtype=st.sampled_from(["float16", "bfloat16"]), window=st.sampled_from([None, (40, 0), (17, 33)]),
       modifier=st.sampled_from([None, "softcap", "alibi"]), sinks=st.booleans(), seed=st.integers(0, 2**16))
def test_persistent_grid_walks_every_block_once(hopper, ctas, batch, kv_heads, group, sq, sk, head_dim, causal,
                                                dtype, window, modifier, sinks, seed):
    """A persistent grid of a few CTAs (sm90.forward's ctas), so that each CTA walks many query
    blocks of several heads and batch entries through one ring of K/V stages, causal pairs of
    blocks, and blocks that see no key between blocks that do (causal, Sq > Sk): out and lse
    against the float64 oracle, NaN-poisoned, with sinks and the modifiers."""
    import torch

    q_heads = kv_heads * group
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((batch, h, s, head_dim)) for h, s in ((q_heads, sq), (kv_heads, sk), (kv_heads, sk)))
    Q, K, V = (torch.from_numpy(x).to("cuda", getattr(torch, dtype)) for x in (q, k, v))
    options = _variant_options(causal, window, modifier, q_heads, rng)
    slopes = options.pop("alibi_slopes", None)
    slopes = None if slopes is None else slopes.astype(np.float32)  # the kernel's slopes, exactly
    sink_values = rng.uniform(-3, 3, q_heads).astype(np.float32) if sinks else None
    assert sm90.supports(Q, K, V, Q, None, causal=causal, **options)
    out = torch.full_like(Q, float("nan"))
    lse = torch.full((batch, q_heads, sq), float("nan"), device="cuda")
    scale = 1 / math.sqrt(head_dim)
    sm90.forward(Q, K, V, out, lse, causal=causal, scale=scale, stream=torch.cuda.current_stream().cuda_stream,
                 alibi_slopes=None if slopes is None else torch.from_numpy(slopes).to("cuda", torch.float32),
                 sinks=None if sink_values is None else torch.from_numpy(sink_values).to("cuda"), ctas=ctas, **options)
    torch.cuda.synchronize()
    seen = [to_float64(x) for x in (Q, K, V)]
    want, want_lse = reference.exact_attention_bhsd(
        *seen, causal=causal, scale=scale, alibi_slopes=slopes,
        sinks=None if sink_values is None else sink_values.astype(np.float64), **options)
    assert_matches_oracle(to_float64(out), to_float64(lse), want, want_lse, dtype)


@pytest.mark.gpu
def test_unaddressable_views_are_refused(hopper):
    import torch

    base = torch.randn(1, 2, 64, 72, device="cuda", dtype=torch.bfloat16)
    q = base[..., 1:65]  # base 2 bytes past a 16-byte boundary
    assert not sm90.supports(q, q, q, q, None)
    odd_rows = torch.randn(1, 2, 64, 68, device="cuda", dtype=torch.bfloat16)[..., :64]  # rows 136 bytes apart
    assert not sm90.supports(odd_rows, odd_rows, odd_rows, odd_rows, None)
    assert not sm90.supports(base.float(), base.float(), base.float(), base.float(), None)


# ---- GPU: the backward -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grad_bounds():
    """tests/test_grad.py, whose bounds (error_scales, tolerance_for, assert_grads_match) every
    backend's gradients are held to; imported here, outside any @given (it defines Hypothesis
    tests, and importing it inside one nests them)."""
    import test_grad

    return test_grad


@pytest.mark.gpu
@settings(max_examples=40)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 3, 4]),
       sq=st.sampled_from([1, 2, 63, 64, 65, 127, 128, 129, 300]),
       sk=st.sampled_from([1, 63, 64, 65, 127, 128, 129, 300]),
       head_dim=st.sampled_from([8, 32, 64, 72, 96, 128, 136, 192, 256]),
       causal=st.booleans(), dtype=st.sampled_from(["float16", "bfloat16"]),
       layout=st.sampled_from(["bhsd", "bshd"]),
       window=st.sampled_from([None, (40, 0), (17, 33), (-1, 5)]),
       modifier=st.sampled_from([None, None, "softcap", "alibi"]), deterministic=st.booleans(),
       seed=st.integers(0, 2**16))
def test_backward_matches_exact_gradients(hopper, grad_bounds, batch, kv_heads, group, sq, sk, head_dim, causal,
                                          dtype, layout, window, modifier, deterministic, seed):
    """xattn.cuda.backward on the sm90 kernel (checked: it was planned) against the float64
    gradient oracle, bounded as tests/test_grad.py bounds every backend (tolerances.py "grad"
    relative to the gradient of |terms|); outputs NaN-poisoned before the launch. deterministic:
    the kernel's dK and dV with flash_bwd_dq.cu's dQ, and a second run bitwise equal."""
    import torch

    from xattn import cuda, reference

    q_heads = kv_heads * group
    rng = np.random.default_rng(seed)
    options = _variant_options(causal, window, modifier, q_heads, rng)
    if head_dim <= 64:  # the D64 rows serve no window, softcap or ALiBi (test_backward_routing_rule)
        options = {}
    base = {name: rng.standard_normal((batch, heads, s, head_dim))
            for name, heads, s in (("q", q_heads, sq), ("k", kv_heads, sk), ("v", kv_heads, sk),
                                   ("dout", q_heads, sq))}

    def device(x):
        t = torch.from_numpy(x).to("cuda", getattr(torch, dtype))
        # bshd: the (B, H, S, D) view of a (B, S, H, D) tensor
        return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "bshd" else t

    q, k, v, dout = (device(base[n]) for n in ("q", "k", "v", "dout"))
    kernel_options = dict(options)
    if "alibi_slopes" in options:
        kernel_options["alibi_slopes"] = torch.from_numpy(options["alibi_slopes"]).to("cuda", torch.float32)
    scale = 1 / math.sqrt(head_dim)
    stream = torch.cuda.current_stream().cuda_stream
    out, lse = torch.empty_like(q), torch.empty(batch, q_heads, sq, device="cuda")
    cuda.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream, **kernel_options)
    def gradients():
        grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
        cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=scale,
                      deterministic=deterministic, stream=stream, **kernel_options)
        torch.cuda.synchronize()
        return grads

    launch._plans.clear()
    grads = gradients()
    assert cuda.sm90_backward_planned(), "the call did not run on the sm90 backward"
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(grads, gradients())), "a second run differs"
    seen = [to_float64(x) for x in (q, k, v, dout)]
    variant = {k_: v_ for k_, v_ in options.items()}
    if "alibi_slopes" in variant:  # the slopes the kernel saw, in float32
        variant["alibi_slopes"] = kernel_options["alibi_slopes"].double().cpu().numpy()
    want = reference.exact_attention_grad_bhsd(*seen, causal=causal, scale=scale, **variant)
    magnitudes, largest_score = grad_bounds.error_scales(*seen, causal=causal, scale=scale, **variant)
    got = [to_float64(g) for g in grads]
    grad_bounds.assert_grads_match(got, want, magnitudes, grad_bounds.tolerance_for(dtype, largest_score),
                                   f" ({dtype})")


@pytest.mark.gpu
@settings(max_examples=25)
@given(lengths=st.lists(st.tuples(st.sampled_from([0, 1, 63, 64, 65, 129, 200]),
                                  st.sampled_from([1, 63, 64, 65, 129, 200])), min_size=1, max_size=4),
       kv_heads=st.integers(1, 2), group=st.sampled_from([1, 3]), head_dim=st.sampled_from([72, 128, 192, 256]),
       causal=st.booleans(), dtype=st.sampled_from(["float16", "bfloat16"]),
       window=st.sampled_from([None, (40, 0), (17, 33)]), modifier=st.sampled_from([None, "softcap", "alibi"]),
       seed=st.integers(0, 2**16))
def test_packed_backward_matches_exact_gradients(hopper, grad_bounds, lengths, kv_heads, group, head_dim, causal,
                                                 dtype, window, modifier, seed):
    """A packed batch (cu_seqlens) on the sm90 backward (checked: it was planned): each sequence's
    gradients against the float64 oracle of that sequence alone, bounded as tests/test_grad.py
    bounds every backend; outputs NaN-poisoned, so rows past a sequence's end that a tile loads
    from its neighbour must not be written."""
    import torch

    from xattn import cuda, reference

    assume(any(n > 0 for n, _ in lengths))  # no query at all: no backward runs (cuda.backward zero-fills)
    q_heads = kv_heads * group
    rng = np.random.default_rng(seed)
    options = _variant_options(causal, window, modifier, q_heads, rng)
    if "alibi_slopes" in options:  # one row of slopes per sequence
        options["alibi_slopes"] = rng.random((len(lengths), q_heads))
    lens_q, lens_k = [a for a, _ in lengths], [b for _, b in lengths]
    starts_q, starts_k = np.cumsum([0] + lens_q), np.cumsum([0] + lens_k)
    base = {name: rng.standard_normal((1, heads, total, head_dim))
            for name, heads, total in (("q", q_heads, starts_q[-1]), ("k", kv_heads, starts_k[-1]),
                                       ("v", kv_heads, starts_k[-1]), ("dout", q_heads, starts_q[-1]))}
    q, k, v, dout = (torch.from_numpy(base[n]).to("cuda", getattr(torch, dtype)) for n in ("q", "k", "v", "dout"))
    kernel_options = dict(options)
    if "alibi_slopes" in options:
        kernel_options["alibi_slopes"] = torch.from_numpy(options["alibi_slopes"]).to("cuda", torch.float32)
    cu = tuple(torch.tensor(x, dtype=torch.int32, device="cuda") for x in (starts_q, starts_k))
    packed = dict(cu_seqlens=cu, max_seqlen=(max(lens_q), max(lens_k)))
    scale = 1 / math.sqrt(head_dim)
    stream = torch.cuda.current_stream().cuda_stream
    out, lse = torch.empty_like(q), torch.empty(1, q_heads, int(starts_q[-1]), device="cuda")
    cuda.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream, **kernel_options, **packed)
    grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    launch._plans.clear()
    cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=scale, deterministic=False, stream=stream,
                  **kernel_options, **packed)
    torch.cuda.synchronize()
    assert cuda.sm90_backward_planned(), "the call did not run on the sm90 backward"
    seen = [to_float64(x) for x in (q, k, v, dout)]
    got = [to_float64(g) for g in grads]
    for b in range(len(lengths)):
        rq, rk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        parts = [x[:, :, r] for x, r in zip(seen, (rq, rk, rk, rq))]
        variant = dict(options)
        if "alibi_slopes" in variant:  # the sequence's slopes, as the kernel saw them (float32)
            variant["alibi_slopes"] = kernel_options["alibi_slopes"][b:b + 1].double().cpu().numpy()
        want = reference.exact_attention_grad_bhsd(*parts, causal=causal, scale=scale, **variant)
        magnitudes, largest_score = grad_bounds.error_scales(*parts, causal=causal, scale=scale, **variant)
        mine = [g[:, :, r] for g, r in zip(got, (rq, rk, rk))]
        grad_bounds.assert_grads_match(mine, want, magnitudes, grad_bounds.tolerance_for(dtype, largest_score),
                                       f" (sequence {b}, {dtype})")


@pytest.mark.gpu
def test_backward_routing_on_the_gpu(hopper):
    """D128, and D192 and D256 (the D256 row), are served by sm90, deterministic or not
    (deterministic: dK and dV there, dQ from flash_bwd_dq.cu)."""
    import torch

    from xattn import cuda

    for head_dim, deterministic, on_sm90 in ((128, False, True), (128, True, True), (192, False, True),
                                              (256, True, True)):
        q = torch.randn(1, 2, 130, head_dim, device="cuda", dtype=torch.bfloat16)
        out, lse = torch.empty_like(q), torch.empty(1, 2, 130, device="cuda")
        stream = torch.cuda.current_stream().cuda_stream
        cuda.forward(q, q, q, out, lse, causal=False, scale=0.1, stream=stream)
        grads = [torch.full_like(q, float("nan")) for _ in range(3)]
        launch._plans.clear()
        cuda.backward(q, q, q, out, q, lse, *grads, causal=False, scale=0.1, deterministic=deterministic,
                      stream=stream)
        torch.cuda.synchronize()
        assert cuda.sm90_backward_planned() == on_sm90, (head_dim, deterministic)
        assert not any(g.isnan().any() for g in grads)


def test_tensor_maps_bind_a_context_where_the_thread_has_none(monkeypatch):
    """A thread that only used torch's caching allocator may have no current CUDA context: the
    driver refuses the map (CUDA_ERROR_INVALID_CONTEXT) and tma makes the device's primary
    context current (cudaSetDevice) and asks once more, for the plan's device."""
    import types

    from xattn import tma

    ok, no_context = "ok", "invalid context"
    driver = types.SimpleNamespace(CUresult=types.SimpleNamespace(
        CUDA_SUCCESS=ok, CUDA_ERROR_INVALID_CONTEXT=no_context))
    made_current = []
    runtime = types.SimpleNamespace(setDevice=made_current.append, getDevice=lambda: 5)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    answers = iter([(no_context, None), (ok, "map")])
    assert tma._with_context(driver, lambda: next(answers), device=3) == (ok, "map")
    assert made_current == [3]
    answers = iter([(no_context,), (ok,)])
    assert tma._with_context(driver, lambda: next(answers)) == (ok,)  # the thread's device
    assert made_current == [3, 5]
    assert tma._with_context(driver, lambda: (ok, "map")) == (ok, "map") and made_current == [3, 5]
