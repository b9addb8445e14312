"""The HIP sources and their table on the CPU: the cross-vendor include, row selection by
gcnArchName, LDS sizes, and the portable kernel compiling for NVIDIA through tests/hip_on_cuda.h
(NVRTC from the cuda-bindings wheels, no GPU needed; ci/cpu_checks.sh installs them). The hiprtc
compile of every specialization for gfx908/gfx90a/gfx1030 is ci/hip_compile.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from xattn import configs, jit

HIP_ON_CUDA = Path(__file__).with_name("hip_on_cuda.h")


HIP_SOURCES = ("flash_fwd_mfma.hip", "flash_fwd_portable.hip", "flash_bwd_mfma_dkdv.hip",
               "flash_bwd_mfma_dq.hip", "flash_bwd_portable.hip")


def test_every_table_kernel_has_its_source_and_entry_point():
    for kernel in {r.kernel for r in configs.HIP_TABLE}:
        code = jit.preprocess("hip", configs.hip_source(kernel))
        assert f'extern "C" __global__' in code and f"\n{kernel}(" in code, kernel


def test_hip_sources_include_the_shared_cuda_header_once():
    for name in HIP_SOURCES:
        code = jit.preprocess("hip", name)
        assert code.count('#line 1 "kernels_cuda/attention_common.h"') == 1
        assert "struct KeyRange" in code
        assert not [line for line in code.splitlines() if line.lstrip().startswith("#include")]


@pytest.mark.parametrize("arch, dtype, kernel, family", [
    ("gfx90a:sramecc+:xnack-", "float16", "flash_fwd_mfma", "cdna"),
    ("gfx942:sramecc+:xnack-", "bfloat16", "flash_fwd_mfma", "cdna"),
    ("gfx908", "bfloat16", "flash_fwd_mfma", "cdna"),
    ("gfx90a", "float32", "flash_fwd_portable", "gfx9"),
    ("gfx906", "float16", "flash_fwd_portable", "gfx9"),
    ("gfx1030", "bfloat16", "flash_fwd_portable", "rdna"),
    ("gfx1100", "float32", "flash_fwd_portable", "rdna"),
])
def test_select_hip_picks_kernel_and_family_from_gcn_arch_name(arch, dtype, kernel, family):
    for head_dim in (1, 33, 64, 100, 256):
        cfg = configs.select_hip(dtype, arch, head_dim, causal=True)
        assert (cfg.kernel, cfg.arch) == (kernel, family) and cfg.head_dim >= head_dim


def test_select_hip_errors_name_the_problem():
    with pytest.raises(ValueError, match="head dim must be at most 256, got 257"):
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
    with pytest.raises(ValueError, match="head dim must be at most 256, got 257"):
        configs.select_hip_backward("bfloat16", "gfx90a", 257, True)
    with pytest.raises(ValueError, match="no HIP kernel for 'gfx803'"):
        configs.select_hip_backward("float16", "gfx803", 64, False)


def test_every_hip_row_fits_lds_and_its_kernel_constraints():
    for cfg in configs.HIP_TABLE:
        wave = configs.hip_wave_size(cfg)
        assert configs.hip_shared_memory_bytes(cfg) <= configs.HIP_LDS_BYTES, cfg
        if cfg.kernel in ("flash_fwd_mfma", "flash_bwd_mfma_dq"):
            assert cfg.head_dim % 32 == 0 and cfg.block_n % 32 == 0, cfg
            assert cfg.block_m == 32 * cfg.warps and wave == 64, cfg
        elif cfg.kernel == "flash_bwd_mfma_dkdv":
            assert cfg.head_dim % 32 == 0 and cfg.block_m % 32 == 0, cfg
            assert cfg.block_n == 32 * cfg.warps and wave == 64, cfg
        elif cfg.kernel == "flash_bwd_preprocess":
            assert cfg.head_dim == configs.MAX_HEAD_DIM and cfg.block_m % (cfg.warps * wave // 32) == 0
        else:
            owned, step = ((cfg.block_n, cfg.block_m) if cfg.kernel == "flash_bwd_portable_dkdv"
                           else (cfg.block_m, cfg.block_n))
            assert cfg.head_dim % wave == 0 and wave % step == 0, cfg
            assert (owned // cfg.warps) % (wave // step) == 0, cfg


# What tests/test_hip_portable.py runs on NVIDIA: the portable forward in its wave32 rows, the
# portable backward in its wave32 and its wave64 rows (it needs no wave-wide operation), and the
# preprocess in wave32.
NVIDIA_ROWS = [r for r in configs.HIP_TABLE
               if (r.kernel == "flash_fwd_portable" and configs.hip_wave_size(r) == 32)
               or r.kernel in ("flash_bwd_portable_dq", "flash_bwd_portable_dkdv")
               or (r.kernel == "flash_bwd_preprocess" and configs.hip_wave_size(r) == 32)]


@pytest.mark.parametrize("cfg", NVIDIA_ROWS, ids=lambda c: f"{c.kernel}_{c.arch}_D{c.head_dim}")
def test_portable_kernels_compile_for_nvidia_through_hip_on_cuda(cfg):
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="pip install cuda-bindings "
                                                              "nvidia-cuda-nvrtc")
    source = configs.hip_source(cfg.kernel)
    code = HIP_ON_CUDA.read_text() + jit.preprocess("hip", source)
    for dtype in ("float16", "bfloat16", "float32"):
        options = ["--gpu-architecture=sm_80", "-std=c++17",
                   *jit.define_options(configs.hip_defines(cfg, dtype, True, False))]
        err, prog = nvrtc.nvrtcCreateProgram(code.encode(), source.encode(), 0, [], [])
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        nvrtc.nvrtcDestroyProgram(prog)
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")


@pytest.mark.parametrize("variant, message", [
    ({"window": (4, 0)}, r"window: \(4, 0\) is not supported by the hip backend yet"),
    ({"softcap": 30.0}, "softcap: 30.0 is not supported by the hip backend yet"),
    ({"alibi_slopes": [0.5]}, "alibi_slopes: is not supported by the hip backend yet"),
    ({"cu_seqlens": ([0, 3], [0, 3]), "max_seqlen": (3, 3)}, "cu_seqlens: packed .* not supported"),
])
def test_hip_launchers_reject_the_variants_they_do_not_implement(variant, message):
    """Checked before anything touches the arrays or the GPU, so it runs on the CPU."""
    from xattn import hip

    with pytest.raises(ValueError, match=message):
        hip.forward(None, None, None, None, None, causal=False, scale=1.0, stream=0, **variant)
    with pytest.raises(ValueError, match=message):
        hip.backward(*[None] * 9, causal=False, scale=1.0, deterministic=False, stream=0, **variant)
    hip._unsupported_variants(window=(-1, -1), softcap=0.0, alibi_slopes=None)  # defaults pass
