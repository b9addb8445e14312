"""The HIP KV-cache decode (kernels_hip/flash_decode_portable.hip, xattn.hip.decode).

On the CPU: the decode, merge and append entry points compile for NVIDIA through the test-only
tests/hip_on_cuda.h (NVRTC from the cuda-bindings wheels, no GPU), in every wave32 row the table
has, with the band and softcap flags; and xattn.hip.launch_decode, run with stand-ins for CuPy and
the driver, hands each of the three kernels one DecodeParams block (kernels_common/params.h) with
the call's pointers, strides and scalars. The AMD compile of every row is ci/hip_compile.py's.

On an NVIDIA GPU (`gpu` marker): the same kernels, compiled by CuPy's NVRTC with hip_on_cuda.h in
the wave32 (RDNA, gfx1030) rows and launched by xattn.hip.launch_decode, serve
attention_with_kvcache (and kvcache.launch_for_check) in place of the CUDA decode under the hook
xattn.hip.on_cuda, and test_kvcache.py's checks run against them (contiguous caches, no sinks:
the HIP decode raises for block_table and sinks, which is checked too): the float64 oracle over drawn shapes (GQA, windows, softcap, bhsd/bshd, strided views, NaN
in every cache row a kernel must not read), the decode shapes, forced split counts (1, 2, 7, 200:
the merge, and splits with no keys), device lengths out of range (clamped, nothing outside the
caches touched), and NaN-poisoned out, lse and workspace. The wave64 rows cannot run there
(their shuffles span 64 lanes); the AMD hardware run is still to come (README, AMD status).

    PYTHONPATH=. python -m pytest -m gpu tests/test_hip_decode.py
"""

from __future__ import annotations

import math
import re
import types

import numpy as np
import pytest

from test_hip_sources import HIP_ON_CUDA, HIP_ON_CUDA_OPTIONS, nvrtc_compile
import xattn
from xattn import configs, hip, jit, kvcache

WAVE32_TARGET = "gfx1030"  # whose decode rows (wave32) run on NVIDIA
DECODE_ENTRIES = (configs.HIP_DECODE_KERNEL, "flash_decode_merge_portable", "kvcache_append_portable")
WAVE32_ROWS = [r for r in configs.HIP_TABLE
               if r.kernel == configs.HIP_DECODE_KERNEL and configs.hip_wave_size(r) == 32]
FLAGS = {"plain": {}, "causal": {"IS_CAUSAL": 1}, "window+softcap": {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1},
         "left": {"IS_LOCAL": 1}}


# ---- CPU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("cfg", WAVE32_ROWS, ids=lambda c: f"D{c.head_dim}")
def test_decode_kernels_compile_for_nvidia_through_hip_on_cuda(cfg, flags):
    # Every dtype with all the flags; one for the others (elements become float32 on loading).
    for dtype in ("float16", "bfloat16", "float32") if flags == "window+softcap" else ("float16",):
        log = nvrtc_compile(cfg, dtype, FLAGS[flags])
        for entry in DECODE_ENTRIES:  # every entry point of the module was compiled
            assert f"Compiling entry function '{entry}'" in log or entry in log, (entry, log[:500])


@pytest.mark.parametrize("target", ["gfx90a", "gfx1100"])
@pytest.mark.parametrize("case", [
    dict(window=(-1, 0), softcap=0.0, splits=1, new=1, lengths="device"),
    dict(window=(200, 0), softcap=30.0, splits=5, new=0, lengths="uniform"),
    dict(window=(100, 2), softcap=0.0, splits=3, new=4, lengths="device"),
])
def test_hip_decode_launcher_hands_each_kernel_its_parameter_block(target, case, monkeypatch,
                                                                   stand_in_launches):
    """xattn.hip.launch_decode on the CPU, with stand-ins for CuPy, the compiled kernels and the
    driver: append, decode and merge each get one DecodeParams block (their sources say so)
    holding, as the driver would copy it, the arrays' pointers and strides, the lengths, band,
    splits and scales of the call; the defines carry the band and the softcap, the grid covers
    row tiles x splits, and the merge runs only with several splits."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(hip, "_cu_count", lambda device: 8)
    monkeypatch.setattr(kvcache, "_FORCED_SPLITS", case["splits"])
    kvcache.num_splits.cache_clear()

    b, hq, hk, sq, smax, d = 2, 8, 2, 3, 300, 64
    q = torch.zeros(b, sq, hq, d, dtype=torch.float16).transpose(1, 2)  # (B, S, H, D) memory
    out = torch.zeros(b, hq, sq, d, dtype=torch.float16)
    kc, vc = (torch.zeros(b, hk, smax, d, dtype=torch.float16) for _ in range(2))
    kn, vn = (torch.zeros(b, hk, case["new"], d + 8, dtype=torch.float16)[..., :d] for _ in range(2))
    lse = torch.zeros(b, hq, sq)
    seqlens = torch.tensor([10, 200], dtype=torch.int32) if case["lengths"] == "device" else None
    call = types.SimpleNamespace(seqlen_new=case["new"], uniform=None if seqlens is not None else 17,
                                 window=case["window"], softcap=case["softcap"], scale=0.125)
    parts = []

    def workspace(n):
        parts.append(torch.zeros(n))
        return parts[-1]

    try:
        hip.launch_decode(stand_in_launches.compile, target, q, kc, vc, kn if case["new"] else None,
                          vn if case["new"] else None, out, lse, seqlens, call, workspace, stream=5)
    finally:
        kvcache.num_splits.cache_clear()

    launched = stand_in_launches.launches
    want = (["kvcache_append_portable"] if case["new"] else []) + [configs.HIP_DECODE_KERNEL]
    want += ["flash_decode_merge_portable"] if case["splits"] > 1 else []
    assert [x.cfg.kernel for x in launched] == want
    arrays = {"q": q, "k": kc, "v": vc, "o": out, "lse": lse}
    if case["new"]:
        arrays |= {"k_new": kn, "v_new": vn}
    for x in launched:
        p = x.block[0]
        assert re.search(rf"\n{x.cfg.kernel}\(const DecodeParams p\)",
                         jit.preprocess("hip", configs.hip_source(x.cfg.kernel)))
        assert x.stream == 5 and x.threads == configs.hip_threads(x.cfg) and x.grid[2] == b
        assert x.defines["WAVE_SIZE"] == configs.hip_wave_size(x.cfg)
        assert x.defines["IS_CAUSAL"] == int(case["window"][1] >= 0)
        assert x.defines["IS_LOCAL"] == int(case["window"][0] >= 0)
        assert x.defines["HAS_SOFTCAP"] == int(bool(case["softcap"]))
        for name, a in arrays.items():
            ref = p[name]
            assert ref["ptr"] == a.data_ptr(), name
            assert (ref["batch_stride"], ref["head_stride"], ref["row_stride"]) == a.stride()[:3], name
        if not case["new"]:
            assert p["k_new"]["ptr"] == p["v_new"]["ptr"] == 0
        if seqlens is not None:
            assert p["cache_seqlens"] == seqlens.data_ptr() and p["seqlens_stride"] == 1
        else:
            assert p["cache_seqlens"] == 0 and p["uniform_seqlen"] == 17
        assert (p["heads_q"], p["heads_per_kv"], p["seqlen_q"]) == (hq, hq // hk, sq)
        assert (p["seqlen_new"], p["seqlen_max"], p["head_dim"]) == (case["new"], smax, d)
        assert (p["window_left"], p["window_right"]) == case["window"]
        assert p["num_splits"] == case["splits"] and p["batch_offset"] == 0
        assert p["scale_log2"] == np.float32(0.125 * math.log2(math.e))
        assert p["softcap_log2"] == np.float32(case["softcap"] * math.log2(math.e))
        assert p["scale_over_softcap"] == np.float32(0.125 / case["softcap"] if case["softcap"] else 0)
        if case["splits"] > 1:  # the partials: o_part, then lse_part, in the one workspace
            partials = b * hq * sq * case["splits"]
            assert p["o_part"] == parts[0].data_ptr()
            assert p["lse_part"] == parts[0].data_ptr() + 4 * partials * x.cfg.head_dim
            assert parts[0].numel() == partials * (x.cfg.head_dim + 1)
        if x.cfg.kernel == configs.HIP_DECODE_KERNEL:
            m_blocks = -(-(hq // hk) * sq // x.cfg.block_m)
            assert x.grid[:2] == (m_blocks * case["splits"], hk) and p["m_blocks"] == m_blocks
            assert x.smem == configs.hip_shared_memory_bytes(x.cfg) <= configs.HIP_LDS_BYTES
        else:
            assert x.smem == 0


# ---- NVIDIA GPU -----------------------------------------------------------------------------------

@pytest.fixture
def hip_decode():
    """A cuda Backend under which attention_with_kvcache and kvcache.launch_for_check run the HIP
    decode: the hook xattn.hip.on_cuda, with the wave32 (RDNA, gfx1030) rows."""
    from conftest import HIP_ON_CUDA_TARGETS, Backend, _cuda_kinds, _cuda_skip_reason

    reason = _cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    targets = HIP_ON_CUDA_TARGETS["hip-on-cuda"]
    with hip.on_cuda(prefix=HIP_ON_CUDA.read_text(), options=tuple(HIP_ON_CUDA_OPTIONS),
                     forward_target=targets[0], backward_target=targets[1]):
        yield Backend("cuda", _cuda_kinds())


# test_kvcache.py's cases and checks (its helpers, not its tests), without the two arguments the
# HIP decode does not take: paged caches (block_table) and sinks.
import test_kvcache  # noqa: E402
from test_kvcache import forced_splits  # noqa: E402,F401  (a fixture of the checks below)


def _contiguous_caches(c):
    return c["paged"] is None and c["sinks"] is None


@pytest.mark.gpu
def test_hip_decode_matches_oracle(hip_decode):
    from hypothesis import given, settings

    @settings(max_examples=test_kvcache.EXAMPLES["cuda"])
    @given(c=test_kvcache.cases(hip_decode).filter(_contiguous_caches))
    def check(c):
        test_kvcache.run_and_check(hip_decode, c)

    check()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", test_kvcache.SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_hip_decode_shapes(hip_decode, shape, layout):
    test_kvcache.test_decode_shapes(hip_decode, shape, layout)


@pytest.mark.gpu
def test_hip_decode_softcap_with_large_scores(hip_decode):
    test_kvcache.test_softcap_with_large_scores(hip_decode)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 7, 200])
def test_hip_decode_split_counts(hip_decode, forced_splits, splits):
    test_kvcache.test_split_counts(hip_decode, forced_splits, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
def test_hip_decode_out_of_range_lengths_are_clamped(hip_decode, forced_splits, splits):
    test_kvcache.test_out_of_range_lengths_are_clamped(hip_decode, forced_splits, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_hip_decode_writes_every_output_element(hip_decode, forced_splits, splits):
    test_kvcache.test_every_output_element_is_written(hip_decode, forced_splits, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("argument", ["block_table", "sinks"])
def test_hip_decode_names_what_it_does_not_support(hip_decode, argument):
    """Paged caches and sinks raise on the hip backend, naming the argument."""
    import cupy

    q = cupy.zeros((1, 2, 1, 64), dtype=cupy.float16)
    if argument == "block_table":
        caches = [cupy.zeros((2, 16, 2, 64), dtype=cupy.float16) for _ in range(2)]
        extra = {"block_table": cupy.zeros((1, 2), dtype=cupy.int32)}
    else:
        caches = [cupy.zeros((1, 2, 32, 64), dtype=cupy.float16) for _ in range(2)]
        extra = {"sinks": cupy.zeros(2, dtype=cupy.float32)}
    with pytest.raises(ValueError, match=f"^{argument}: .*hip backend"):
        xattn.attention_with_kvcache(q, *caches, cache_seqlens=3, **extra)
