"""The HIP sources and their table on the CPU: the cross-vendor include, row selection by
gcnArchName, LDS sizes, and the portable kernel compiling for NVIDIA through tests/hip_on_cuda.h
(NVRTC from the cuda-bindings wheels, no GPU needed; ci/cpu_checks.sh installs them). The hiprtc
compile of every specialization for gfx908/gfx90a/gfx1030 is ci/hip_compile.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from xattn import configs, jit

HIP_ON_CUDA = Path(__file__).with_name("hip_on_cuda.h")


def test_hip_sources_include_the_shared_cuda_header_once():
    for name in ("flash_fwd_mfma.hip", "flash_fwd_portable.hip"):
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


def test_every_hip_row_fits_lds_and_its_kernel_constraints():
    for cfg in configs.HIP_TABLE:
        wave = configs.hip_wave_size(cfg)
        assert configs.hip_shared_memory_bytes(cfg) <= configs.HIP_LDS_BYTES, cfg
        if cfg.kernel == "flash_fwd_mfma":
            assert cfg.head_dim % 32 == 0 and cfg.block_n % 32 == 0, cfg
            assert cfg.block_m == 32 * cfg.warps and wave == 64, cfg
        else:
            assert cfg.head_dim % wave == 0 and wave % cfg.block_n == 0, cfg
            assert (cfg.block_m // cfg.warps) % (wave // cfg.block_n) == 0, cfg


@pytest.mark.parametrize("cfg", [r for r in configs.HIP_TABLE if configs.hip_wave_size(r) == 32],
                         ids=lambda c: f"D{c.head_dim}")
def test_portable_kernel_compiles_for_nvidia_through_hip_on_cuda(cfg):
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="pip install cuda-bindings "
                                                              "nvidia-cuda-nvrtc")
    code = HIP_ON_CUDA.read_text() + jit.preprocess("hip", "flash_fwd_portable.hip")
    for dtype in ("float16", "bfloat16", "float32"):
        options = ["--gpu-architecture=sm_80", "-std=c++17",
                   *jit.define_options(configs.hip_defines(cfg, dtype, True, False))]
        err, prog = nvrtc.nvrtcCreateProgram(code.encode(), b"flash_fwd_portable.hip", 0, [], [])
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        nvrtc.nvrtcDestroyProgram(prog)
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
