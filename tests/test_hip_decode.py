"""The HIP KV-cache decode (kernels_hip/flash_decode_portable.hip, xattn.hip.decode).

On the CPU: the decode, merge and append entry points compile for NVIDIA through the test-only
tests/hip_on_cuda.h (NVRTC from the cuda-bindings wheels, no GPU), in every wave32 row the table
has, with the band and softcap flags; and xattn.hip.launch_decode, run with a stand-in for CuPy,
hands each of the three kernels exactly its parameters (count, and pointer / 64-bit / int / float
in each position). The AMD compile of every row is ci/hip_compile.py's.

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


def _parameter_kinds(entry: str) -> list[str]:
    code = jit.preprocess("hip", configs.hip_source(entry))
    signature = re.search(rf"\n{entry}\(([^{{]*)\)\s*{{", code).group(1)
    kinds = ["ptr" if "*" in p else p.split()[0] for p in (p.strip() for p in signature.split(","))]
    assert set(kinds) <= {"ptr", "i64", "int", "float"}, kinds
    return kinds


_ARGUMENT_KIND = {np.uint64: "ptr", np.int64: "i64", np.int32: "int", np.float32: "float"}


@pytest.mark.parametrize("target", ["gfx90a", "gfx1100"])
@pytest.mark.parametrize("case", [
    dict(window=(-1, 0), softcap=0.0, splits=1, new=1, lengths="device"),
    dict(window=(200, 0), softcap=30.0, splits=5, new=0, lengths="uniform"),
    dict(window=(100, 2), softcap=0.0, splits=3, new=4, lengths="device"),
])
def test_hip_decode_launcher_passes_every_kernel_parameter_in_order(target, case, monkeypatch,
                                                                    stand_in_cupy):
    """xattn.hip.launch_decode on the CPU, with stand-ins for CuPy and the compiled kernels: each
    of append, decode and merge gets exactly its parameters, the defines carry the band and the
    softcap, the grid covers row tiles x splits, and the merge runs only with several splits."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(hip, "_cu_count", lambda device: 8)
    monkeypatch.setattr(kvcache, "_FORCED_SPLITS", case["splits"])
    kvcache.num_splits.cache_clear()

    launches = []

    def compile(cfg, defines, device):
        def kernel(grid, block, args, shared_mem):
            launches.append((cfg, defines, grid, block, args, shared_mem))
        return kernel

    b, hq, hk, sq, smax, d = 2, 8, 2, 3, 300, 64
    q, out = (torch.zeros(b, hq, sq, d, dtype=torch.float16) for _ in range(2))
    kc, vc = (torch.zeros(b, hk, smax, d, dtype=torch.float16) for _ in range(2))
    kn, vn = (torch.zeros(b, hk, case["new"], d, dtype=torch.float16) for _ in range(2))
    lse = torch.zeros(b, hq, sq)
    seqlens = torch.tensor([10, 200], dtype=torch.int32) if case["lengths"] == "device" else None
    call = types.SimpleNamespace(seqlen_new=case["new"], uniform=None if seqlens is not None else 17,
                                 window=case["window"], softcap=case["softcap"], scale=0.125)
    try:
        hip.launch_decode(compile, target, q, kc, vc, kn if case["new"] else None,
                          vn if case["new"] else None, out, lse, seqlens, call,
                          lambda n: torch.zeros(n), stream=0)
    finally:
        kvcache.num_splits.cache_clear()

    entries = [cfg.kernel for cfg, *_ in launches]
    want = (["kvcache_append_portable"] if case["new"] else []) + [configs.HIP_DECODE_KERNEL]
    want += ["flash_decode_merge_portable"] if case["splits"] > 1 else []
    assert entries == want
    for cfg, defines, grid, block, args, shared_mem in launches:
        assert [_ARGUMENT_KIND[type(a)] for a in args] == _parameter_kinds(cfg.kernel), cfg.kernel
        assert defines["WAVE_SIZE"] == configs.hip_wave_size(cfg)
        assert block in (configs.hip_threads(cfg), (configs.hip_threads(cfg),))
        assert defines["IS_CAUSAL"] == int(case["window"][1] >= 0)
        assert defines["IS_LOCAL"] == int(case["window"][0] >= 0)
        assert defines["HAS_SOFTCAP"] == int(bool(case["softcap"]))
        assert grid[2] == b
        if cfg.kernel == configs.HIP_DECODE_KERNEL:
            m_blocks = -(-(hq // hk) * sq // cfg.block_m)
            assert grid[:2] == (m_blocks * case["splits"], hk)
            assert shared_mem == configs.hip_shared_memory_bytes(cfg) <= configs.HIP_LDS_BYTES


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
