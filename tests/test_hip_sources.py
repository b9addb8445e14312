"""The HIP sources and their table on the CPU: the cross-vendor include, row selection by
gcnArchName, LDS sizes, and the portable kernel compiling for NVIDIA through tests/hip_on_cuda.h
(NVRTC from the cuda-bindings wheels, no GPU needed; ci/cpu_checks.sh installs them). The hiprtc
compile of every specialization for gfx908/gfx90a/gfx1030 is ci/hip_compile.py."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np

import pytest

from xattn import configs, jit, kernels, params

HIP_ON_CUDA = Path(__file__).with_name("hip_on_cuda.h")
ROOT = Path(__file__).resolve().parents[1]


HIP_SOURCES = ("flash_fwd_mfma.hip", "flash_fwd_portable.hip", "flash_bwd_mfma_dkdv.hip",
               "flash_bwd_mfma_dq.hip", "flash_bwd_portable.hip", "flash_decode_portable.hip")


def _signature(kernel: str) -> str | None:
    """The parameter list of entry point `kernel` in its preprocessed source. The matrix-core
    sources name theirs MATRIX_KERNEL(prefix, suffix): prefix_mfma_suffix with mfma.h,
    prefix_wmma_suffix with wmma.h."""
    code = jit.preprocess("hip", kernels.hip(kernel).source)
    match = re.search(rf"\n{kernel}\(([^{{]*)\)\s*{{", code)
    if match:
        return match.group(1)
    kind = "wmma" if kernel in configs.HIP_WMMA_KERNELS else "mfma"
    for prefix, suffix, parameters in re.findall(r"\nMATRIX_KERNEL\((\w+), *(\w*)\)\(([^{]*)\)\s*{", code):
        if f"{prefix}_{kind}{suffix}" == kernel:
            return parameters
    return None


HIP_ENTRIES = sorted(entry for vendor, entry in kernels.KERNELS if vendor == "hip")


def test_every_table_kernel_has_its_source_and_entry_point():
    assert {r.kernel for r in configs.HIP_TABLE} <= set(HIP_ENTRIES)  # every row's kernel is described
    for kernel in HIP_ENTRIES:
        code = jit.preprocess("hip", kernels.hip(kernel).source)
        assert 'extern "C" __global__' in code and _signature(kernel) is not None, kernel
    for prefix_suffix in (("flash_fwd", ""), ("flash_bwd", "_dkdv"), ("flash_bwd", "_dq")):
        names = {f"{prefix_suffix[0]}_{kind}{prefix_suffix[1]}" for kind in ("mfma", "wmma")}
        assert names <= set(configs.HIP_MFMA_KERNELS)  # both forms of every matrix-core source


def test_hip_sources_include_the_shared_cuda_header_once():
    for name in HIP_SOURCES:
        code = jit.preprocess("hip", name)
        assert code.count('#line 1 "kernels_common/attention_common.h"') == 1
        assert "struct KeyRange" in code
        assert not [line for line in code.splitlines() if line.lstrip().startswith("#include")]


@pytest.mark.parametrize("arch, dtype, kernel, family", [
    ("gfx90a:sramecc+:xnack-", "float16", "flash_fwd_mfma", "cdna"),
    ("gfx942:sramecc+:xnack-", "bfloat16", "flash_fwd_mfma", "cdna3"),
    ("gfx908", "bfloat16", "flash_fwd_mfma", "cdna"),
    ("gfx1201", "float32", "flash_fwd_portable", "rdna"),
    ("gfx90a", "float32", "flash_fwd_portable", "gfx9"),
    ("gfx906", "float16", "flash_fwd_portable", "gfx9"),
    ("gfx1030", "bfloat16", "flash_fwd_portable", "rdna"),
    ("gfx1100", "float32", "flash_fwd_portable", "rdna"),
])
def test_select_hip_picks_kernel_and_family_from_gcn_arch_name(arch, dtype, kernel, family):
    for head_dim in (1, 33, 64, 100, 256):
        cfg = configs.select_hip(dtype, arch, head_dim, causal=True)
        assert (cfg.kernel, cfg.arch) == (kernel, family) and cfg.head_dim >= head_dim


@pytest.mark.parametrize("arch, family", [("gfx1100", "rdna3"), ("gfx1201", "rdna4")])
def test_rdna3_and_rdna4_take_wmma_at_every_head_dim_and_the_portable_kernels_for_float32(arch, family):
    """WMMA forward and backward (the pair) at every head dim up to 256 in 16 bits (the rows past
    the register-held ones keep their fixed operands in LDS, xattn/configs.py), the portable
    kernels for float32; wave32 throughout."""
    for dtype in ("float16", "bfloat16", "float32"):
        wmma = dtype != "float32"
        for head_dim in (1, 33, 64, 65, 96, 100, 128, 129, 160, 192, 193, 256):
            cfg = configs.select_hip(dtype, arch, head_dim, causal=False)
            assert (cfg.kernel, cfg.arch) == (("flash_fwd_wmma", family) if wmma else ("flash_fwd_portable", "rdna"))
            assert cfg.head_dim >= head_dim and configs.hip_wave_size(cfg) == 32
            _, dkdv, dq = configs.select_hip_backward(dtype, arch, head_dim, causal=True)
            assert (dkdv.kernel, dq.kernel) == (_WMMA_BWD if wmma else _PORTABLE_BWD)
            assert (dkdv.arch, dq.arch) == ((family,) * 2 if wmma else ("rdna",) * 2)
            assert dkdv.head_dim >= head_dim and dq.head_dim >= head_dim


_PORTABLE_BWD = ("flash_bwd_portable_dkdv", "flash_bwd_portable_dq")
_WMMA_BWD = ("flash_bwd_wmma_dkdv", "flash_bwd_wmma_dq")


def test_wmma_defines_pick_the_layout_of_the_family():
    for cfg in configs.HIP_TABLE:
        defines = kernels.hip(cfg.kernel).defines(cfg, "bfloat16", causal=False, vec=True)
        if cfg.kernel in configs.HIP_WMMA_KERNELS:
            assert defines["MATRIX_WMMA"] == 1 and defines["WMMA_GFX12"] == int(cfg.arch == "rdna4")
        else:
            assert "MATRIX_WMMA" not in defines  # the MFMA and portable builds are unchanged


def test_select_hip_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"head dim.*256, got 257"):
        configs.select_hip("float16", "gfx90a", 257, False)
    with pytest.raises(ValueError, match="no HIP kernel for 'gfx803'"):
        configs.select_hip("float16", "gfx803", 64, False)


@pytest.mark.parametrize("arch, dtype, pair", [
    ("gfx90a", "float16", ("flash_bwd_mfma_dkdv", "flash_bwd_mfma_dq")),
    ("gfx942:sramecc+:xnack-", "bfloat16", ("flash_bwd_mfma_dkdv", "flash_bwd_mfma_dq")),
    ("gfx90a", "float32", ("flash_bwd_portable_dkdv", "flash_bwd_portable_dq")),
    ("gfx1030", "float16", ("flash_bwd_portable_dkdv", "flash_bwd_portable_dq")),
])
def test_select_hip_backward_picks_mfma_up_to_128_then_the_portable_pair(arch, dtype, pair):
    for head_dim in (1, 33, 64, 100, 128, 129, 200, 256):
        prep, dkdv, dq = configs.select_hip_backward(dtype, arch, head_dim, causal=False)
        assert prep.kernel == "flash_bwd_preprocess"
        assert dkdv.head_dim >= head_dim and dq.head_dim >= head_dim
        if "mfma" in pair[0] and head_dim > 128:  # past the MFMA rows: the portable pair
            assert (dkdv.kernel, dq.kernel) == ("flash_bwd_portable_dkdv", "flash_bwd_portable_dq")
        else:
            assert (dkdv.kernel, dq.kernel) == pair
        assert len({configs.hip_wave_size(c) for c in (prep, dkdv, dq)}) == 1


def test_select_hip_backward_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"head dim.*256, got 257"):
        configs.select_hip_backward("bfloat16", "gfx90a", 257, True)
    with pytest.raises(ValueError, match="no HIP kernel for 'gfx803'"):
        configs.select_hip_backward("float16", "gfx803", 64, False)


def test_every_hip_row_fits_lds_and_its_kernel_constraints():
    for cfg in configs.HIP_TABLE:
        wave = configs.hip_wave_size(cfg)
        kernel = kernels.hip(cfg.kernel)
        for dtype in ("float16", "float32"):
            assert kernel.shared_memory(kernel.defines(cfg, dtype, causal=True, vec=True)) <= configs.HIP_LDS_BYTES, cfg
        # Fixed operands in LDS: the WMMA forward and backward only (the decode stages Q over K),
        # with one matrix block in the product that reads them (matrix_tile.h reads them per block).
        if cfg.frags_in_lds:
            assert cfg.kernel in ("flash_fwd_wmma", "flash_bwd_wmma_dq", "flash_bwd_wmma_dkdv"), cfg
            assert (cfg.block_m if cfg.kernel == "flash_bwd_wmma_dkdv" else cfg.block_n) == 16, cfg
        # D split across blocks: the WMMA dK/dV only, into whole 16-dim blocks.
        if cfg.dim_split != 1:
            assert cfg.kernel == "flash_bwd_wmma_dkdv" and cfg.dim_split > 1, cfg
            assert cfg.head_dim % (16 * cfg.dim_split) == 0, cfg
        wmma = cfg.kernel in configs.HIP_WMMA_KERNELS
        block, matrix_wave = (16, 32) if wmma else (32, 64)  # WMMA 16x16 in wave32, MFMA 32x32 in wave64
        if cfg.kernel in ("flash_fwd_mfma", "flash_bwd_mfma_dq", "flash_fwd_wmma", "flash_bwd_wmma_dq",
                          "flash_decode_mfma", "flash_decode_wmma"):
            assert cfg.head_dim % block == 0 and cfg.block_n % block == 0, cfg
            assert cfg.block_m == block * cfg.warps and wave == matrix_wave, cfg
            if cfg.kernel.startswith("flash_decode"):  # its merge and append: a portable row of its head dim
                assert [r for r in configs.HIP_TABLE if r.kernel == configs.HIP_DECODE_KERNEL
                        and r.head_dim == cfg.head_dim and configs.hip_wave_size(r) == wave], cfg
        elif cfg.kernel in ("flash_bwd_mfma_dkdv", "flash_bwd_wmma_dkdv"):
            assert cfg.head_dim % block == 0 and cfg.block_m % block == 0, cfg
            assert cfg.block_n == block * cfg.warps and wave == matrix_wave, cfg
        elif cfg.kernel == "flash_fwd_portable":
            assert cfg.head_dim % wave == 0 and wave % cfg.block_n == 0, cfg
            assert cfg.block_m % cfg.warps == 0 and (cfg.block_m // cfg.warps) % (wave // cfg.block_n) == 0, cfg
        elif cfg.kernel == configs.HIP_DECODE_KERNEL:  # kernels_common/flash_decode_simt.h
            warp_n = cfg.block_n // cfg.warps  # keys of each wave per step: whole row groups
            assert cfg.block_n % cfg.warps == 0 and wave % warp_n == 0, cfg
            assert cfg.head_dim % wave == 0 and cfg.block_m % (wave // warp_n) == 0, cfg
        elif cfg.kernel == "flash_bwd_preprocess":
            assert cfg.head_dim == configs.MAX_HEAD_DIM and cfg.block_m % (cfg.warps * wave // 32) == 0
        else:
            owned, step = ((cfg.block_n, cfg.block_m) if cfg.kernel == "flash_bwd_portable_dkdv"
                           else (cfg.block_m, cfg.block_n))
            assert cfg.head_dim % wave == 0 and wave % step == 0, cfg
            assert (owned // cfg.warps) % (wave // step) == 0, cfg


# What tests/test_hip_portable.py runs on NVIDIA: the portable forward and backward in their
# wave32 and wave64 rows (a wave of 64 is two warps there: tests/hip_on_cuda.h), and the
# preprocess in wave32.
NVIDIA_ROWS = [r for r in configs.HIP_TABLE
               if r.kernel in ("flash_fwd_portable", "flash_bwd_portable_dq", "flash_bwd_portable_dkdv")
               or (r.kernel == "flash_bwd_preprocess" and configs.hip_wave_size(r) == 32)]

# NVRTC options of the HIP-on-CUDA compiles (here and in test_hip_portable.py).
HIP_ON_CUDA_OPTIONS = ("-std=c++17",)


def _hip_compile():
    """ci/hip_compile.py, the AMD compile sweep, as a module: its variant tables are the ones
    compiled here for NVIDIA too."""
    spec = importlib.util.spec_from_file_location("hip_compile", ROOT / "ci" / "hip_compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HIP_COMPILE = _hip_compile()
# The attention variants' flags (attention_common.h) as the AMD sweep compiles them, and plain
# causal; the flags only some kernels have, and those kernels.
VARIANT_FLAGS = {"causal": {"IS_CAUSAL": 1}, **HIP_COMPILE.VARIANT_FLAGS}
FLAG_KERNELS = HIP_COMPILE.FLAG_KERNELS


def nvrtc_compile(cfg, dtype: str, flags: dict) -> str:
    """Compile row `cfg` through hip_on_cuda.h for sm_80; ptxas's report, or AssertionError."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="pip install cuda-bindings "
                                                              "nvidia-cuda-nvrtc")
    kernel = kernels.hip(cfg.kernel)
    source = kernel.source
    code = HIP_ON_CUDA.read_text() + jit.preprocess("hip", source)
    defines = kernel.defines(cfg, dtype, causal=bool(flags.get("IS_CAUSAL")), vec=False)
    if cfg.kernel != "flash_bwd_preprocess":
        defines |= flags
    options = ["--gpu-architecture=sm_80", "--ptxas-options=-v", *HIP_ON_CUDA_OPTIONS,
               *jit.define_options(defines)]
    err, prog = nvrtc.nvrtcCreateProgram(code.encode(), source.encode(), 0, [], [])
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(prog)
    log = log.decode(errors="replace")
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log
    return log


def spilled_bytes(ptxas_log: str) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log))


# Spills are not asserted here: ptxas trades a few bytes of local memory for registers in some of
# these test-only builds (4 to 24 bytes, plain kernels included, with or without a register cap),
# a choice of NVIDIA's allocator, not a property of the HIP sources. hiprtc's allocation for AMD
# is what ci/hip_compile.py checks, and fails on.
@pytest.mark.parametrize("cfg", NVIDIA_ROWS, ids=lambda c: f"{c.kernel}_{c.arch}_D{c.head_dim}")
def test_portable_kernels_compile_for_nvidia_through_hip_on_cuda(cfg):
    for dtype in ("float16", "bfloat16", "float32"):
        nvrtc_compile(cfg, dtype, VARIANT_FLAGS["causal"])


@pytest.mark.parametrize("cfg, flags", [
    (r, f) for r in NVIDIA_ROWS if r.kernel != "flash_bwd_preprocess" for f in VARIANT_FLAGS
    if f != "causal" and (f not in FLAG_KERNELS or r.kernel in FLAG_KERNELS[f])],
    ids=lambda x: x if isinstance(x, str) else f"{x.kernel}_{x.arch}_D{x.head_dim}")
def test_portable_variant_kernels_compile_for_nvidia(cfg, flags):
    """Every window/softcap/ALiBi/varlen flag combination of every row test_hip_portable.py
    runs on NVIDIA (one dtype: elements become float32 on loading, so the code hardly depends
    on it)."""
    nvrtc_compile(cfg, "float16", VARIANT_FLAGS[flags])


def test_hip_compile_covers_every_variant_flag():
    """ci/hip_compile.py compiles, for AMD, every flag combination of its table for every kernel
    and target that has it, in every form of the kernel."""
    hip_compile = HIP_COMPILE
    # (kernel, target, flags, form): the form is where a row keeps its fixed operands and whether
    # its dK/dV splits D (configs' frags_in_lds, dim_split): each compiles to other code.
    compiled = {(v[0].kernel, v[1], v[5], (v[0].frags_in_lds, v[0].dim_split))
                for v in hip_compile.variants(hip_compile.TARGETS)}
    for kernel in {r.kernel for r in configs.HIP_TABLE} - {"flash_bwd_preprocess"}:
        want = {"plain", *(hip_compile.DECODE_VARIANT_FLAGS if kernel in configs.HIP_DECODE_KERNELS
                           else hip_compile.VARIANT_FLAGS)}
        want -= {flags for flags, only in FLAG_KERNELS.items() if kernel not in only}
        targets = {target for k, target, _, _ in compiled if k == kernel}
        assert targets, kernel
        for target in targets:  # every target that uses the kernel compiles all of its flags, in every form
            forms = {form for k, t, _, form in compiled if (k, t) == (kernel, target)}
            for form in forms:
                assert {flags for k, t, flags, f in compiled if (k, t, f) == (kernel, target, form)} == want, \
                    (kernel, target, form)
    assert {target for _, target, _, _ in compiled} == {"gfx908", "gfx90a", "gfx1030", "gfx942", "gfx1100", "gfx1201"}
    wmma_forms = {form for k, t, _, form in compiled if k == "flash_bwd_wmma_dkdv"}
    assert wmma_forms == {(False, 1), (True, 1), (True, 2)}  # registers, LDS, LDS with D split


# ---- the launchers' parameter blocks -------------------------------------------------------------

def _parameter_struct(kernel: str) -> str:
    """The struct an entry point takes, from its source: every HIP kernel takes exactly one
    parameter block by value ("const AttnParams p" or "const DecodeParams p")."""
    match = re.fullmatch(r"const (AttnParams|DecodeParams) p", _signature(kernel).strip())
    assert match, (kernel, _signature(kernel))
    return match.group(1)


def test_every_hip_entry_point_takes_one_parameter_block():
    """The struct each source's entry point takes is the block its description packs."""
    for kernel in HIP_ENTRIES:
        decode = kernel.startswith(("flash_decode", "kvcache"))
        assert _parameter_struct(kernel) == ("DecodeParams" if decode else "AttnParams"), kernel
        assert kernels.hip(kernel).params == params.STRUCTS[_parameter_struct(kernel)], kernel


def _strides(x, packed: bool) -> tuple:
    """(batch, head, row) strides of a (B, H, S[, D]) torch tensor as a block holds them."""
    strides = tuple(x.stride())[:3]
    return ((0,) + strides[1:]) if packed else strides


@pytest.mark.parametrize("target", ["gfx90a", "gfx1030"])
@pytest.mark.parametrize("variant", [
    {},
    {"causal": True, "window": (5, 0), "softcap": 0.0},
    {"window": (3, 7), "softcap": 20.0},
    {"alibi_slopes": "per_head"},
    {"alibi_slopes": "per_batch", "causal": True},
    {"varlen": True, "causal": True, "window": (9, 0)},
])
def test_hip_launchers_hand_each_kernel_its_parameter_block(target, variant, stand_in_launches):
    """xattn.hip.launch and launch_backward, run on the CPU with stand-ins for CuPy, the compiled
    kernels and the driver: each kernel gets one AttnParams block (its source says so) that holds,
    as the driver would copy it, every array's pointer and (batch, head, row) strides, the
    lengths, heads, band, scales and ALiBi stride of the call; the grid covers the batch in z; and
    the defines carry the variant's flags and the row's."""
    torch = pytest.importorskip("torch")
    from xattn import hip

    batch, heads_q, heads_k, sq, sk, dim = 2, 4, 2, 37, 45, 64
    varlen = variant.get("varlen", False)
    options = {key: value for key, value in variant.items() if key != "varlen"}
    if varlen:  # two sequences packed into one (1, H, T, D) entry
        lengths_q, lengths_k = (sq, 11), (sk, 20)
        shape_q, shape_k = (1, heads_q, sum(lengths_q), dim), (1, heads_k, sum(lengths_k), dim)
        options["cu_seqlens"] = tuple(torch.tensor((0, a, a + b), dtype=torch.int32)
                                      for a, b in (lengths_q, lengths_k))
        options["max_seqlen"] = (sq, sk)
    else:
        shape_q, shape_k = (batch, heads_q, sq, dim), (batch, heads_k, sk, dim)
    slopes = options.get("alibi_slopes")
    if slopes is not None:
        options["alibi_slopes"] = torch.ones((heads_q,) if slopes == "per_head" else (batch, heads_q))
    # q in (B, S, H, D) memory and o with padded rows: the blocks must carry these strides
    q = torch.zeros(shape_q[0], shape_q[2], shape_q[1], dim, dtype=torch.float16).transpose(1, 2)
    out = torch.zeros(*shape_q[:3], dim + 8, dtype=torch.float16)[..., :dim]
    dout, dq = (torch.zeros(shape_q, dtype=torch.float16) for _ in range(2))
    k, v, dk, dv = (torch.zeros(shape_k, dtype=torch.float16) for _ in range(4))
    lse = torch.zeros(shape_q[:3])
    options = {"causal": False, "scale": 0.125, **options}
    compile = stand_in_launches.compile
    hip.launch(compile, target, q, k, v, out, lse, stream=7, **options)
    hip.launch_backward(compile, target, q, k, v, out, dout, lse, dq, dk, dv, stream=7, **options)

    launched = stand_in_launches.launches
    causal_rows = options["causal"] or options.get("window", (-1, -1))[1] >= 0
    rows = [configs.select_hip("float16", target, dim, causal_rows),
            *configs.select_hip_backward("float16", target, dim, causal_rows)]
    assert [x.kernel.entry for x in launched] == [r.kernel for r in rows]
    assert launched[1].kernel.entry == "flash_bwd_preprocess"
    left, right = options.get("window", (-1, -1))
    if options["causal"]:
        right = 0
    softcap = options.get("softcap", 0.0)
    arrays = {"q": q, "k": k, "v": v, "o": out, "lse": lse, "dout": dout, "dq": dq, "dk": dk, "dv": dv}
    for index, x in enumerate(launched):
        kernel, p, row = x.kernel.entry, x.block[0], rows[index]
        assert _parameter_struct(kernel) == "AttnParams"
        assert x.stream == 7 and x.threads == row.warps * configs.hip_wave_size(row)
        assert x.smem == x.kernel.shared_memory(x.defines) <= configs.HIP_LDS_BYTES
        assert x.defines["WAVE_SIZE"] == configs.hip_wave_size(row)
        used = ("q", "k", "v", "o", "lse") if index == 0 else tuple(arrays)
        for name in used:
            assert p[name]["ptr"] == arrays[name].data_ptr(), (kernel, name)
            ref = p[name]
            got = (ref["batch_stride"], ref["head_stride"], ref["row_stride"])
            assert got == _strides(arrays[name], varlen), (kernel, name)
        assert p["batch_offset"] == 0 and p["heads_q"] == heads_q and p["head_dim"] == dim
        assert p["heads_per_kv"] == heads_q // heads_k
        if index > 0:  # the backward: delta, written by the preprocess, read by dK/dV and dQ
            assert p["delta"]["ptr"] != 0 and p["delta"]["row_stride"] == 1
        if kernel == "flash_bwd_preprocess":  # every row of the entry, no masks
            assert "IS_VARLEN" not in x.defines and x.grid[2] == (1 if varlen else batch)
            assert x.grid[:2] == (math.ceil(shape_q[2] / row.block_m), heads_q)
            assert p["seqlen_q"] == shape_q[2]
            continue
        assert x.grid[2] == batch  # packed: one z per sequence
        if kernel.endswith("dkdv"):  # key blocks x kv heads; the others query blocks x query heads
            assert x.grid[:2] == (math.ceil(sk / row.block_n), heads_k)
        else:
            assert x.grid[:2] == (math.ceil(sq / row.block_m), heads_q)
        assert (p["seqlen_q"], p["seqlen_k"]) == (sq, sk)
        assert (p["window_left"], p["window_right"]) == (left, right)
        score_scale = softcap or 0.125
        assert p["scale"] == np.float32(score_scale)
        assert p["scale_log2"] == np.float32(score_scale * math.log2(math.e))
        assert p["softcap_scale"] == np.float32(0.125 / softcap if softcap else 0.0)
        assert p["grad_scale"] == np.float32(0.125)
        if varlen:
            assert (p["cu_seqlens_q"], p["cu_seqlens_k"]) == tuple(c.data_ptr() for c in options["cu_seqlens"])
        else:
            assert p["cu_seqlens_q"] == p["cu_seqlens_k"] == 0
        if slopes is not None:
            assert p["alibi_slopes"] == options["alibi_slopes"].data_ptr()
            assert p["alibi_batch_stride"] == (heads_q if slopes == "per_batch" else 0)
        else:
            assert p["alibi_slopes"] == 0
        assert x.defines["IS_CAUSAL"] == int(right >= 0)
        assert x.defines["IS_LOCAL"] == int(left >= 0)
        assert x.defines["HAS_SOFTCAP"] == int(bool(softcap))
        assert x.defines["HAS_ALIBI"] == int(slopes is not None)
        assert x.defines["IS_VARLEN"] == int(varlen)
    # The same signature again with other outputs: the plan is reused (nothing compiled) and
    # the new pointers are patched in.
    compiled = len(stand_in_launches.kernels)
    out2 = torch.zeros(*shape_q[:3], dim + 8, dtype=torch.float16)[..., :dim]
    lse2 = torch.zeros_like(lse)
    hip.launch(compile, target, q, k, v, out2, lse2, stream=3, **options)
    last = stand_in_launches.launches[-1]
    assert len(stand_in_launches.kernels) == compiled and last.stream == 3
    assert (last.block[0]["o"]["ptr"], last.block[0]["lse"]["ptr"]) == (out2.data_ptr(), lse2.data_ptr())


@pytest.mark.parametrize("target, dim", [("gfx1100", 200), ("gfx1201", 256), ("gfx1100", 100)])
def test_wmma_backward_launches_one_block_per_slice_of_the_head_dim(target, dim, stand_in_launches):
    """The WMMA dK/dV rows that split the head dim (dim_split) launch that many blocks per key
    block, with DIM_SPLIT and FRAGS_IN_LDS among the defines and the row's LDS; the other kernels
    one block per query block."""
    torch = pytest.importorskip("torch")
    from xattn import hip

    batch, heads, sq, sk = 2, 3, 37, 45
    q, out, dout, dq = (torch.zeros(batch, heads, sq, dim, dtype=torch.bfloat16) for _ in range(4))
    k, v, dk, dv = (torch.zeros(batch, heads, sk, dim, dtype=torch.bfloat16) for _ in range(4))
    lse = torch.zeros(batch, heads, sq)
    hip.launch_backward(stand_in_launches.compile, target, q, k, v, out, dout, lse, dq, dk, dv,
                        stream=0, causal=True, scale=0.1)
    _, dkdv, dq_launch = stand_in_launches.launches
    _, dkdv_row, dq_row = configs.select_hip_backward("bfloat16", target, dim, True)
    assert (dkdv.kernel.entry, dq_launch.kernel.entry) == ("flash_bwd_wmma_dkdv", "flash_bwd_wmma_dq")
    split = dkdv_row.dim_split
    assert split == (2 if dim > 128 else 1)
    assert dkdv.grid == (math.ceil(sk / dkdv_row.block_n) * split, heads, batch)
    assert dq_launch.grid == (math.ceil(sq / dq_row.block_m), heads, batch)
    assert dkdv.defines.get("DIM_SPLIT", 1) == split
    for x, row in ((dkdv, dkdv_row), (dq_launch, dq_row)):
        assert x.defines.get("FRAGS_IN_LDS", 0) == int(row.frags_in_lds)
        assert x.smem == x.kernel.shared_memory(x.defines) <= configs.HIP_LDS_BYTES


def test_on_cuda_routes_while_active_and_refuses_matrix_core_rows():
    """xattn.hip.on_cuda: while active, dispatch's flag is set and hip's launches take the given
    targets (forwards and backwards apart) and its NVRTC compile, which refuses MFMA/WMMA rows
    before compiling anything; on exit everything is as before, also after an error."""
    from xattn import backends, hip

    assert not backends.hip_on_cuda
    with pytest.raises(KeyError):
        with hip.on_cuda(prefix="", options=(), forward_target="gfx1030", backward_target="gfx906"):
            assert backends.hip_on_cuda
            compile_fwd, target_fwd = hip._compiler(None, "forward")
            compile_bwd, target_bwd = hip._compiler(None, "backward")
            assert (target_fwd, target_bwd) == ("gfx1030", "gfx906") and compile_fwd is compile_bwd
            row = configs.select_hip("float16", "gfx90a", 128, False)
            kernel = kernels.hip(row.kernel)
            with pytest.raises(ValueError, match="flash_fwd_mfma: .*AMD only"):
                compile_fwd(kernel, kernel.defines(row, "float16", causal=False, vec=False), 0)
            with pytest.raises(RuntimeError, match="already active"):
                with hip.on_cuda(prefix="", options=(), forward_target="gfx1030",
                                 backward_target="gfx1030"):
                    pass
            raise KeyError("leaves the context")
    assert not backends.hip_on_cuda and hip._served is None
