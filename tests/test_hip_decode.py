"""The HIP KV-cache decode (kernels_hip/flash_decode_portable.hip, xattn.hip.decode).

On the CPU: the decode, merge and append entry points compile for NVIDIA through the test-only
tests/hip_on_cuda.h (NVRTC from the cuda-bindings wheels, no GPU), in every wave32 row the table
has, with the band, softcap, paged and FP8 flags; and xattn.hip.launch_decode, run with stand-ins
for CuPy and the driver, hands each of the three kernels one DecodeParams block
(kernels_common/params.h) with the call's pointers (sinks and FP8 scales included), strides and
scalars. The AMD compile of every row is ci/hip_compile.py's.

On an NVIDIA GPU (`gpu` marker): the same kernels, compiled by CuPy's NVRTC with hip_on_cuda.h in
the wave32 (RDNA, gfx1030) rows and launched by xattn.hip.launch_decode, serve
attention_with_kvcache (and kvcache.launch_for_check) in place of the CUDA decode under the hook
xattn.hip.on_cuda, and test_kvcache.py's checks run against them (contiguous and paged caches,
sinks; FP8 caches: test_kvcache_fp8.py on the hip-on-cuda path): the float64 oracle over drawn shapes
(GQA, windows, softcap, bhsd/bshd, strided views, page sizes, shuffled and shared pages, NaN in
every cache row and unused page a kernel must not read), the decode shapes, forced split counts (1, 2, 7, 200:
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
from xattn import configs, hip, jit, kernels, kvcache, launch

WAVE32_TARGET = "gfx1030"  # whose decode rows (wave32) run on NVIDIA
DECODE_ENTRIES = (configs.HIP_DECODE_KERNEL, "flash_decode_merge_portable", "kvcache_append_portable")
WAVE32_ROWS = [r for r in configs.HIP_TABLE
               if r.kernel == configs.HIP_DECODE_KERNEL and configs.hip_wave_size(r) == 32]
FLAGS = {"plain": {}, "causal": {"IS_CAUSAL": 1}, "window+softcap": {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1},
         "left": {"IS_LOCAL": 1},
         "paged": {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1, "IS_PAGED": 1},
         "fp8_e4m3fn": {"IS_CAUSAL": 1, "KV_FP8": 1},
         "fp8_e5m2+paged": {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1, "IS_PAGED": 1, "KV_FP8": 2}}


# ---- CPU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("cfg", WAVE32_ROWS, ids=lambda c: f"D{c.head_dim}")
def test_decode_kernels_compile_for_nvidia_through_hip_on_cuda(cfg, flags):
    # Every dtype with all the flags; one for the others (elements become float32 on loading).
    for dtype in ("float16", "bfloat16", "float32") if flags in ("window+softcap", "paged", "fp8_e5m2+paged") else ("float16",):
        log = nvrtc_compile(cfg, dtype, FLAGS[flags])
        for entry in DECODE_ENTRIES:  # every entry point of the module was compiled
            assert f"Compiling entry function '{entry}'" in log or entry in log, (entry, log[:500])


# (target, dtype, the decode kernel its row names): the matrix-core decode for 16-bit dtypes on
# CDNA (MFMA) and RDNA3/RDNA4 (WMMA), the portable one for float32 and on RDNA2.
ROUTES = [("gfx90a", "float16", "flash_decode_mfma"), ("gfx942", "bfloat16", "flash_decode_mfma"),
          ("gfx908", "bfloat16", "flash_decode_mfma"), ("gfx1100", "float16", "flash_decode_wmma"),
          ("gfx1201", "bfloat16", "flash_decode_wmma"), ("gfx1030", "float16", configs.HIP_DECODE_KERNEL),
          ("gfx90a", "float32", configs.HIP_DECODE_KERNEL), ("gfx1100", "float32", configs.HIP_DECODE_KERNEL)]


@pytest.mark.parametrize("target,dtype,kernel", ROUTES, ids=lambda x: str(x))
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 160, 256])
def test_decode_routes_to_the_matrix_cores_where_the_table_has_a_row(target, dtype, kernel, head_dim):
    """16-bit decodes on CDNA and RDNA3/4 take the matrix-core row of the smallest head dim that
    holds the call's, whose merge and append come from the portable row of exactly that head dim;
    float32, RDNA2, and head dims past the matrix rows take the portable decode."""
    cfg = configs.select_hip_decode(dtype, target, head_dim)
    matrix_dims = [r.head_dim for r in configs.HIP_TABLE if r.kernel == kernel
                   and configs.hip_family(kernel, target) == r.arch]
    if kernel != configs.HIP_DECODE_KERNEL and head_dim > max(matrix_dims):
        kernel = configs.HIP_DECODE_KERNEL  # past the last matrix row
    assert cfg.kernel == kernel
    assert cfg.head_dim == min(d for d in (r.head_dim for r in configs.HIP_TABLE if r.kernel == kernel
                                           and r.arch == cfg.arch) if d >= head_dim)
    aux = configs.hip_decode_aux_row(target, cfg.head_dim)
    assert aux.kernel == configs.HIP_DECODE_KERNEL and aux.head_dim == cfg.head_dim
    assert configs.hip_wave_size(aux) == configs.hip_wave_size(cfg)
    if kernel != configs.HIP_DECODE_KERNEL:
        # one wave per block, its matrix columns the tile's rows: 32 (MFMA) or 16 (WMMA)
        assert cfg.block_m == (32 if kernel == "flash_decode_mfma" else 16) * cfg.warps
        description = kernels.hip(kernel)
        defines = description.defines(cfg, dtype, causal=True, vec=True)
        assert description.shared_memory(defines) <= configs.HIP_LDS_BYTES


def test_select_hip_decode_errors_name_the_problem():
    with pytest.raises(ValueError, match="no HIP kernel for 'gfx803'"):
        configs.select_hip_decode("float16", "gfx803", 64)
    with pytest.raises(ValueError, match=r"^q: expected head dim D in 1\.\.256, got 300"):
        configs.select_hip_decode("float16", "gfx90a", 300)


def _decode_call(torch, case, d=64):
    b, hq, hk, sq, smax = 2, 8, 2, 3, 300
    dtype = getattr(torch, case.get("dtype", "float16"))
    q = torch.zeros(b, sq, hq, d, dtype=dtype).transpose(1, 2)  # (B, S, H, D) memory
    out = torch.zeros(b, hq, sq, d, dtype=dtype)
    kc, vc = (torch.zeros(b, hk, smax, d, dtype=dtype) for _ in range(2))
    kn, vn = (torch.zeros(b, hk, case["new"], d + 8, dtype=dtype)[..., :d] for _ in range(2))
    lse = torch.zeros(b, hq, sq)
    seqlens = torch.tensor([10, 200], dtype=torch.int32) if case["lengths"] == "device" else None
    call = types.SimpleNamespace(seqlen_new=case["new"], uniform=None if seqlens is not None else 17,
                                 window=case["window"], softcap=case["softcap"], scale=0.125,
                                 kv_format=None)
    return q, kc, vc, kn if case["new"] else None, vn if case["new"] else None, out, lse, seqlens, call


@pytest.fixture
def planned_splits(monkeypatch):
    """launch_decode's planning on the CPU: a device of 8 CUs and the split count given to the
    returned function (kvcache's split cache cleared before and after, so that no other test's
    plans leak in or out)."""
    monkeypatch.setattr(launch, "multiprocessors", lambda device: 8)

    def force(splits):
        monkeypatch.setattr(kvcache, "_FORCED_SPLITS", splits)
        kvcache.num_splits.cache_clear()

    yield force
    kvcache.num_splits.cache_clear()


@pytest.mark.parametrize("target,dtype,kernel", ROUTES[:2] + ROUTES[3:5] + ROUTES[5:7], ids=lambda x: str(x))
@pytest.mark.parametrize("case", [
    dict(window=(-1, 0), softcap=0.0, splits=1, new=1, lengths="device"),
    dict(window=(200, 0), softcap=30.0, splits=5, new=0, lengths="uniform"),
    dict(window=(100, 2), softcap=0.0, splits=3, new=4, lengths="device"),
])
def test_hip_decode_launcher_hands_each_kernel_its_parameter_block(target, dtype, kernel, case, planned_splits,
                                                                   stand_in_launches):
    """xattn.hip.launch_decode on the CPU, with stand-ins for CuPy, the compiled kernels and the
    driver: append, decode and merge each get one DecodeParams block (their sources say so)
    holding, as the driver would copy it, the arrays' pointers and strides, the lengths, band,
    splits and scales of the call; the decode is the row's kernel (matrix-core or portable), the
    merge and append the portable row's of the same head dim; the defines carry the band and the
    softcap, the grid covers row tiles x splits, and the merge runs only with several splits."""
    torch = pytest.importorskip("torch")
    planned_splits(case["splits"])
    q, kc, vc, kn, vn, out, lse, seqlens, call = _decode_call(torch, case | {"dtype": dtype})
    b, hq, sq, d = q.shape
    hk, smax = kc.shape[1], kc.shape[2]
    parts = []

    def workspace(n):
        parts.append(torch.zeros(n))
        return parts[-1]

    hip.launch_decode(stand_in_launches.compile, target, q, kc, vc, kn, vn, out, lse, seqlens, call,
                      workspace, stream=5)

    launched = stand_in_launches.launches
    want = (["kvcache_append_portable"] if case["new"] else []) + [kernel]
    want += ["flash_decode_merge_portable"] if case["splits"] > 1 else []
    assert [x.kernel.entry for x in launched] == want
    [decode] = [x for x in launched if x.kernel.entry == kernel]
    # The rows: the decode's, and the portable one of its head dim for the merge and the append.
    row = configs.select_hip_decode(dtype, target, d)
    aux = configs.hip_decode_aux_row(target, row.head_dim)
    # A forced split count is capped by the key tiles the band spans (kvcache.num_splits).
    left, right = case["window"]
    band = min(smax, left + sq + max(right, 0)) if left >= 0 else smax
    splits = min(case["splits"], -(-band // row.block_n))
    arrays = {"q": q, "k": kc, "v": vc, "o": out, "lse": lse}
    if case["new"]:
        arrays |= {"k_new": kn, "v_new": vn}
    for x in launched:
        p = x.block[0]
        x_row = row if x is decode else aux
        assert re.search(rf"\n(MATRIX_KERNEL\(flash_decode, \)|{x.kernel.entry})\(const DecodeParams p\)",
                         jit.preprocess("hip", x.kernel.source))
        wave = configs.hip_wave_size(x_row)
        assert x.stream == 5 and x.threads == x_row.warps * wave and x.grid[2] == b
        assert x.defines["WAVE_SIZE"] == wave == configs.hip_wave_size(row)
        assert x.defines["HEAD_DIM"] == row.head_dim  # the partials' row length, in all three
        assert x.defines["ELEM_TYPE"] == {"float16": 0, "bfloat16": 1, "float32": 2}[dtype]
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
        assert p["num_splits"] == splits and p["batch_offset"] == 0
        assert p["scale_log2"] == np.float32(0.125 * math.log2(math.e))
        assert p["softcap_log2"] == np.float32(case["softcap"] * math.log2(math.e))
        assert p["scale_over_softcap"] == np.float32(0.125 / case["softcap"] if case["softcap"] else 0)
        if case["splits"] > 1:  # the partials: o_part, then lse_part, in the one workspace
            partials = b * hq * sq * splits
            assert p["o_part"] == parts[0].data_ptr()
            assert p["lse_part"] == parts[0].data_ptr() + 4 * partials * row.head_dim
            assert parts[0].numel() == partials * (row.head_dim + 1)
        if x is decode:
            m_blocks = -(-(hq // hk) * sq // row.block_m)
            assert x.grid[:2] == (m_blocks * splits, hk) and p["m_blocks"] == m_blocks
            assert x.smem == x.kernel.shared_memory(x.defines) <= configs.HIP_LDS_BYTES
            matrix = kernel != configs.HIP_DECODE_KERNEL
            # q (a transposed view), the caches and out: 16-byte aligned rows, D % 8 == 0
            assert x.defines.get("VEC_LOADS") == (1 if matrix else None)
            assert x.defines.get("MATRIX_WMMA", 0) == int(kernel == "flash_decode_wmma")
            assert x.defines.get("WMMA_GFX12", 0) == int(target.startswith("gfx12"))
        else:
            assert x.kernel.source == kernels.hip(configs.HIP_DECODE_KERNEL).source
            assert (x.defines["BLOCK_M"], x.defines["BLOCK_N"]) == (aux.block_m, aux.block_n)
            assert x.smem == 0 and "MATRIX_WMMA" not in x.defines and "VEC_LOADS" not in x.defines
            if x.kernel.entry == "flash_decode_merge_portable":  # one wave per row
                assert x.grid[:2] == (-(-hq * sq // aux.warps), 1)
            else:  # the append: one thread per new element of a batch entry
                assert x.grid[:2] == (-(-hk * case["new"] * d // x.threads), 1)


def _portable_decode_launches(recorder, target, splits, *arrays_and_call, **options):
    """hip.launch_decode with stand-in launches (conftest.py): the append, the portable decode and,
    with more than one split, the merge, in that order; returns the recorded launches."""
    import torch

    hip.launch_decode(recorder.compile, target, *arrays_and_call, torch.zeros, stream=4, **options)
    want = ["kvcache_append_portable", configs.HIP_DECODE_KERNEL]
    want += ["flash_decode_merge_portable"] if splits > 1 else []
    assert [x.kernel.entry for x in recorder.launches] == want
    return recorder.launches


@pytest.mark.parametrize("target,dtype", [("gfx90a", "float16"), ("gfx1100", "bfloat16"),
                                          ("gfx1030", "float16"), ("gfx942", "float32")])
@pytest.mark.parametrize("page_size,splits", [(16, 1), (48, 3)])
def test_hip_decode_launcher_hands_paged_caches_to_the_portable_decode(target, dtype, page_size, splits,
                                                                       planned_splits, stand_in_launches):
    """A paged call (the caches (num_pages, page_size, Hk, D), seen as (num_pages, Hk, page_size,
    D) as kvcache._run_hip hands them over) takes the portable decode on every target, the
    matrix-core ones included; append, decode and merge are compiled with IS_PAGED and their
    block holds the table's pointer and row stride, the page size, the page count, the page
    strides as the caches' batch strides, and Smax = max_pages * page_size."""
    torch = pytest.importorskip("torch")
    planned_splits(splits)
    b, hq, hk, sq, d, snew, num_pages, max_pages = 2, 4, 2, 2, 64, 3, 7, 3
    torch_dtype = getattr(torch, dtype)
    q = torch.zeros(b, hq, sq, d, dtype=torch_dtype)
    out = torch.zeros(b, hq, sq, d, dtype=torch_dtype)
    lse = torch.zeros(b, hq, sq)
    kc, vc = (torch.zeros(num_pages, page_size, hk, d, dtype=torch_dtype).transpose(1, 2) for _ in range(2))
    kn, vn = (torch.zeros(b, hk, snew, d, dtype=torch_dtype) for _ in range(2))
    table = torch.zeros(b, max_pages + 2, dtype=torch.int32)[:, 1:max_pages + 1]  # row stride 5
    seqlens = torch.tensor([5, 40], dtype=torch.int32)
    call = types.SimpleNamespace(seqlen_new=snew, uniform=None, window=(-1, 0), softcap=0.0, scale=0.125,
                                 kv_format=None)
    launched = _portable_decode_launches(stand_in_launches, target, splits, q, kc, vc, kn, vn, out, lse,
                                         seqlens, call, block_table=table)
    row = configs.select_hip_decode(dtype, target, d, paged=True)
    assert row.kernel == configs.HIP_DECODE_KERNEL
    for x in launched:
        p = x.block[0]
        assert x.kernel.source == kernels.hip(configs.HIP_DECODE_KERNEL).source
        assert x.defines["IS_PAGED"] == 1 and x.defines["HEAD_DIM"] == row.head_dim
        assert (x.defines["BLOCK_M"], x.defines["BLOCK_N"]) == (row.block_m, row.block_n)
        assert p["block_table"] == table.data_ptr() and p["block_table_stride"] == max_pages + 2
        assert (p["page_size"], p["num_pages"]) == (page_size, num_pages)
        assert p["seqlen_max"] == max_pages * page_size
        for name, cache in (("k", kc), ("v", vc)):  # (page, kv head, row) strides
            assert p[name]["ptr"] == cache.data_ptr()
            assert (p[name]["batch_stride"], p[name]["head_stride"], p[name]["row_stride"]) == \
                (page_size * hk * d, d, hk * d)
        assert p["cache_seqlens"] == seqlens.data_ptr() and p["num_splits"] == splits


@pytest.mark.parametrize("target,dtype", [("gfx90a", "float16"), ("gfx1201", "bfloat16"),
                                          ("gfx1030", "float32")])
@pytest.mark.parametrize("fmt,scales", [("float8_e4m3fn", "head"), ("float8_e5m2", "tensor")])
@pytest.mark.parametrize("splits", [1, 3])
def test_hip_decode_launcher_hands_fp8_caches_and_sinks_to_the_portable_decode(
        target, dtype, fmt, scales, splits, planned_splits, stand_in_launches):
    """FP8 caches take the portable decode on every target (the matrix-core decode has no FP8
    loads); the decode and the append are compiled with KV_FP8 = the format's value, the merge
    without it (it reads float32 partials only); every block holds the scales' pointers and their
    strides (0 per tensor, the per-head tensor's stride per head: a strided view here), the
    caches' strides in 1-byte elements, and the sinks' pointer."""
    torch = pytest.importorskip("torch")
    planned_splits(splits)
    b, hq, hk, sq, d, snew, smax = 2, 4, 2, 1, 64, 2, 200
    torch_dtype = getattr(torch, dtype)
    q, out = (torch.zeros(b, hq, sq, d, dtype=torch_dtype) for _ in range(2))
    lse = torch.zeros(b, hq, sq)
    kc, vc = (torch.zeros(b, hk, smax, d, dtype=getattr(torch, fmt)) for _ in range(2))
    kn, vn = (torch.zeros(b, hk, snew, d, dtype=torch_dtype) for _ in range(2))
    k_scale = torch.ones(2 * hk)[::2] if scales == "head" else torch.ones(())
    v_scale = torch.ones(hk) if scales == "head" else torch.ones(1)
    sinks = torch.zeros(hq)
    seqlens = torch.tensor([5, 40], dtype=torch.int32)
    call = types.SimpleNamespace(seqlen_new=snew, uniform=None, window=(-1, 0), softcap=0.0, scale=0.125,
                                 kv_format=fmt)
    launched = _portable_decode_launches(stand_in_launches, target, splits, q, kc, vc, kn, vn, out, lse,
                                         seqlens, call, sinks=sinks, scales=(k_scale, v_scale))
    assert configs.select_hip_decode(dtype, target, d, fp8=True).kernel == configs.HIP_DECODE_KERNEL
    for x in launched:
        p = x.block[0]
        merge = x.kernel.entry == "flash_decode_merge_portable"
        assert x.defines.get("KV_FP8") == (None if merge else configs.DECODE_FP8_FORMATS[fmt])
        assert (p["k_scale"], p["v_scale"]) == (k_scale.data_ptr(), v_scale.data_ptr())
        assert (p["k_scale_stride"], p["v_scale_stride"]) == ((2, 1) if scales == "head" else (0, 0))
        assert p["sinks"] == sinks.data_ptr()
        for name, cache in (("k", kc), ("v", vc)):
            assert p[name]["ptr"] == cache.data_ptr()
            assert (p[name]["batch_stride"], p[name]["head_stride"], p[name]["row_stride"]) == cache.stride()[:3]


@pytest.mark.parametrize("target", ["gfx90a", "gfx1201"])
def test_hip_decode_plans_once_per_signature(target, planned_splits, stand_in_launches):
    """The plan (rows, compiles, block) is built on a signature's first call; a later call with
    other arrays of the same signature and another uniform length compiles nothing and launches
    the same kernels with its own pointers and length. Another signature plans again."""
    torch = pytest.importorskip("torch")
    planned_splits(3)
    case = dict(window=(-1, 0), softcap=0.0, new=2, lengths="uniform")
    first = _decode_call(torch, case)
    hip.launch_decode(stand_in_launches.compile, target, *first, torch.zeros, stream=1)
    compiled, launched = len(stand_in_launches.kernels), len(stand_in_launches.launches)
    assert launched == 3  # append, decode, merge
    second = _decode_call(torch, case)
    second[-1].uniform = 250
    hip.launch_decode(stand_in_launches.compile, target, *second, torch.zeros, stream=2)
    assert len(stand_in_launches.kernels) == compiled  # nothing compiled again
    again = stand_in_launches.launches[launched:]
    assert ([(x.kernel, x.defines) for x in again]
            == [(x.kernel, x.defines) for x in stand_in_launches.launches[:launched]])
    for x in again:
        p = x.block[0]
        assert p["uniform_seqlen"] == 250 and x.stream == 2
        for name, a in zip(("q", "k", "v", "k_new", "v_new", "o"), second):
            assert p[name]["ptr"] == a.data_ptr(), name
    third = _decode_call(torch, case, d=128)  # another head dim: another plan
    hip.launch_decode(stand_in_launches.compile, target, *third, torch.zeros, stream=3)
    assert len(stand_in_launches.kernels) > compiled
    assert stand_in_launches.launches[-2].block[0]["head_dim"] == 128


@pytest.mark.parametrize("target", ["gfx90a", "gfx1201"])
def test_hip_decode_pointers_of_one_call_do_not_outlive_it(target, planned_splits, stand_in_launches):
    """Sinks are read at run time (null: none) and are not part of the plan's signature: a call
    with them and a later call of the same signature without them share the plan's block, and
    the later call's block must hold a null pointer, not the freed array of the earlier one
    (which the hip-on-cuda property runs once read as sinks: a finite lse for a row with no key)."""
    torch = pytest.importorskip("torch")
    planned_splits(1)
    case = dict(window=(-1, 0), softcap=0.0, new=0, lengths="device")
    first = _decode_call(torch, case)
    sinks = torch.zeros(first[0].shape[1])
    hip.launch_decode(stand_in_launches.compile, target, *first, torch.zeros, stream=1,
                      sinks=sinks)
    [with_sinks] = stand_in_launches.launches
    assert with_sinks.block[0]["sinks"] == sinks.data_ptr()
    hip.launch_decode(stand_in_launches.compile, target, *_decode_call(torch, case),
                      torch.zeros, stream=2)
    [without] = stand_in_launches.launches[1:]
    assert without.kernel is with_sinks.kernel and without.block[0]["sinks"] == 0


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


# test_kvcache.py's cases and checks (its helpers, not its tests), contiguous and paged caches,
# with sinks and without.
import test_kvcache  # noqa: E402
from test_kvcache import forced_splits  # noqa: E402,F401  (a fixture of the checks below)


@pytest.mark.gpu
def test_hip_decode_matches_oracle(hip_decode):
    from hypothesis import given, settings

    @settings(max_examples=test_kvcache.EXAMPLES["cuda"])
    @given(c=test_kvcache.cases(hip_decode))
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
@pytest.mark.parametrize("splits", [1, 3, 200])
def test_hip_decode_sinks_in_the_epilogue_and_the_merge(hip_decode, forced_splits, splits):
    """Sinks of every magnitude (0, +-3, +-40, +-1e4) with one split (the decode's epilogue folds
    them), several (the merge adds them) and more splits than key tiles (empty splits), GQA 4, an
    empty cache among the sequences (its rows: O = 0, lse = the sink), against the float64 oracle;
    out, lse and the split workspace start as NaN, and so do the cache rows past each length."""
    torch = pytest.importorskip("torch")
    from test_properties import assert_matches
    from xattn import reference

    forced_splits(splits)
    b, hq, hk, sq, smax, d, lengths = 3, 8, 2, 2, 300, 64, [298, 0, 40]
    sink_values = np.array([0.0, 3.0, -3.0, 40.0, -40.0, 1e4, -1e4, 0.5], np.float32)
    rng = np.random.default_rng(splits)
    for dtype in ("float16", "bfloat16", "float32"):
        caches = [rng.standard_normal((b, hk, smax, d)) for _ in range(2)]
        for cache in caches:
            for i, n in enumerate(lengths):
                cache[i, :, n:] = np.nan  # never read
        q = torch.from_numpy(rng.standard_normal((b, hq, sq, d))).to("cuda", getattr(torch, dtype))
        kc, vc = (torch.from_numpy(x).to("cuda", q.dtype) for x in caches)
        sinks = torch.from_numpy(sink_values).cuda()
        out = torch.full_like(q, float("nan"))
        lse = torch.full((b, hq, sq), float("nan"), device="cuda")
        kvcache.launch_for_check(q, kc, vc, torch.tensor(lengths, dtype=torch.int32, device="cuda"),
                                 out, lse, lambda n: torch.full((n,), float("nan"), device="cuda"),
                                 sinks=sinks)
        assert not out.isnan().any() and not lse.isnan().any()
        hq64, hk64, hv64 = (x.cpu().double().numpy() for x in (q, kc, vc))
        scale = d ** -0.5
        for i, n in enumerate(lengths):
            want_out, want_lse = reference.exact_attention_bhsd(
                hq64[i:i + 1], hk64[i:i + 1, :, :n], hv64[i:i + 1, :, :n], causal=True, scale=scale,
                sinks=sink_values.astype(np.float64))
            sums = (np.abs(hq64[i]) @ np.abs(np.repeat(hk64[i, :, :n], hq // hk, axis=0)).swapaxes(-1, -2)
                    if n else np.zeros(1))
            rounding = 2.0**-24 * scale * float(sums.max()) if dtype == "float32" else 0.0
            assert_matches(out[i:i + 1].cpu().double().numpy(), lse[i:i + 1].cpu().double().numpy(),
                           want_out, want_lse, dtype, score_error=rounding)
        assert (out[1] == 0).all()  # no key: the sink takes every row's weight (lse: above)
