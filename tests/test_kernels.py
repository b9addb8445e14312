"""The kernel descriptions (xattn/kernels.py) against the kernel sources, on the CPU.

Every entry point a description names is in its source and takes the parameter block the
description packs; every row of the tables names a described kernel. The launch constants that
are a kernel's own structure (the Hopper kernels' warpgroups, the row padding of the 16-bit
tiles, the matrix-core blocks' rows) are read from the source itself: its directives run through
the C preprocessor and compiler with the description's defines, and the values printed are
compared with what the description launches with. So the value lives in the source, and Python
cannot drift from it silently.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from xattn import configs, jit, kernels, params, sm90

_DIRECTIVE = re.compile(r"\s*#\s*(define|undef|if|ifdef|ifndef|elif|else|endif)\b")


def source_values(tmp_path, kernel: kernels.Kernel, defines: dict, names) -> dict[str, int]:
    """{name: value} of integer macros of `kernel`'s source compiled with `defines`: its
    preprocessor directives (includes inlined, code dropped) in a C program that prints them."""
    lines, kept = jit.preprocess(kernel.vendor, kernel.source).splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):  # a directive continued on the next line
            i += 1
            line = line[:-1] + lines[i]
        if _DIRECTIVE.match(line):
            kept.append(line)
        i += 1
    kept += ["#include <stdio.h>", "int main(void) {"]
    kept += [f'  printf("{name} %lld\\n", (long long)({name}));' for name in names]
    kept += ["  return 0;", "}"]
    program = tmp_path / "values.c"
    program.write_text("\n".join(kept) + "\n")
    binary = tmp_path / "values"
    subprocess.run(["gcc", "-std=c11", "-w", *jit.define_options(defines), "-o", str(binary),
                    str(program)], check=True, capture_output=True, text=True)
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in printed.splitlines())}


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler (gcc) here")


def _signature(kernel: kernels.Kernel) -> str:
    """The parameter list of a CUDA entry point in its preprocessed source, without the lines of
    conditional parameters' #if/#endif (flash_bwd.cu's dq_accum map)."""
    code = jit.preprocess("cuda", kernel.source)
    match = re.search(rf'extern "C" __global__[^{{;]*?\b{kernel.entry}\(([^{{]*)\)\s*{{', code)
    assert match, f"{kernel.entry}: no such entry point in kernels_cuda/{kernel.source}"
    return re.sub(r"^\s*#.*$", "", match.group(1), flags=re.M)


CUDA_KERNELS = [k for k in kernels.KERNELS.values() if k.vendor == "cuda"]


@pytest.mark.parametrize("kernel", CUDA_KERNELS, ids=lambda k: k.entry)
def test_every_cuda_entry_point_is_in_its_source_and_takes_its_block(kernel):
    """The last parameter is the one block by value (the Hopper kernels' tensor maps come before
    it) and is the struct whose NumPy mirror the description packs."""
    last = _signature(kernel).split(",")[-1]
    match = re.fullmatch(r"\s*(?:const )?(?:__grid_constant__ )?(AttnParams|DecodeParams) p\s*", last)
    assert match, (kernel.entry, last)
    assert params.STRUCTS[match.group(1)] == kernel.params


def test_every_row_names_a_described_kernel():
    for table, vendor in ((configs.TABLE, "cuda"), (configs.HIP_TABLE, "hip")):
        for row in table:
            assert (vendor, row.kernel) in kernels.KERNELS, row


@needs_gcc
def test_hopper_launch_constants_are_the_kernels_own(tmp_path):
    """Threads, the forward's query rows and the backward's keys per CTA, and the store boxes'
    rows, as the sm90 sources define them from their warpgroups; and the shared memory below the
    barriers, as their layout macros place it (SMEM_BARS), for every row."""
    forward, backward = kernels.cuda("flash_fwd_sm90"), kernels.cuda("flash_bwd_sm90")
    # (kernel, row, the macro of the rows a CTA owns, its value here, barriers: once, per stage)
    cases = [(forward, row, "BLOCK_M", kernels.SM90_BLOCK_M, (3, 4), {}) for row in sm90.ROWS]
    flipped = tuple(r._replace(dq_tma=not r.dq_tma) for r in sm90.BWD_ROWS)
    cases += [(backward, row, "BLOCK_N", row.block_n, (1, 2), {"compute_dq": compute_dq})
              for row in sm90.BWD_ROWS + flipped for compute_dq in (True, False)]
    for kernel, row, owned, rows, (barriers_once, barriers_per_stage), extra in cases:
        defines = kernel.defines(row, "bfloat16", flags={"IS_CAUSAL": int(row.causal)}, **extra)
        got = source_values(tmp_path, kernel, defines, ("NUM_THREADS", owned, "WGMMA_M", "SMEM_BARS"))
        assert got["NUM_THREADS"] == kernel.threads(defines) == kernels.SM90_THREADS
        assert (got[owned], got["WGMMA_M"]) == (rows, kernels.SM90_STORE_ROWS)
        if kernel is backward:  # the D256 row's dQ reduce boxes (xattn/sm90.py maps dq_accum so)
            assert source_values(tmp_path, kernel, defines, ("WARP_ROWS",))["WARP_ROWS"] == kernels.SM90_WARP_ROWS
        barriers = kernels.SM90_BARRIER_BYTES * (barriers_once + barriers_per_stage * row.stages)
        assert kernel.shared_memory(defines) == kernels.SM90_SMEM_ALIGN + got["SMEM_BARS"] + barriers, row


@needs_gcc
def test_tile_padding_and_threads_are_the_kernels_own(tmp_path):
    """The 16-bit tiles' row padding (mma_tile.h's CHUNK, which the shared-memory sizes use) and
    the threads per block of each CUDA kernel with rows, from its source's own NUM_THREADS."""
    seen = set()
    for cfg in configs.TABLE:
        if cfg.kernel in seen:
            continue
        seen.add(cfg.kernel)
        kernel = kernels.cuda(cfg.kernel)
        dtype = "float32" if cfg.kernel in ("flash_fwd_f32", "flash_decode_f32") else "float16"
        if cfg.kernel in configs.DECODE_KERNELS:
            defines = kernel.defines(cfg, dtype, rows=cfg.block_m, vec=True, softcap=False)
        else:
            defines = kernel.defines(cfg, dtype, causal=False, vec=True)
        names = ("NUM_THREADS", "SMEM_STRIDE") if cfg.kernel in configs.TENSOR_CORE_KERNELS else ("NUM_THREADS",)
        got = source_values(tmp_path, kernel, defines, names)
        assert got["NUM_THREADS"] == kernel.threads(defines), cfg
        if "SMEM_STRIDE" in got:
            assert got["SMEM_STRIDE"] == cfg.head_dim + kernels.CHUNK, cfg
    for entry in ("flash_bwd_preprocess", "flash_decode_merge"):
        kernel = kernels.cuda(entry)
        defines = kernel.defines(configs.select("flash_decode", 80, 128, False), "float16")
        names = ("ROWS_PER_BLOCK",) if entry == "flash_bwd_preprocess" else ("NUM_THREADS",)
        got = source_values(tmp_path, kernel, defines, names)
        if entry == "flash_bwd_preprocess":  # a block of the grid covers ROWS_PER_BLOCK rows
            assert kernel.grid(defines, kernels.Sizes(seqlen_q=got["ROWS_PER_BLOCK"] + 1, heads_q=3)) == (2, 3)
        else:
            assert got["NUM_THREADS"] == kernel.threads(defines)


@needs_gcc
def test_simt_forward_shared_memory_is_the_kernels_own(tmp_path):
    """The forward without matrix instructions, one body (kernels_common/flash_fwd_simt.h) for
    both vendors: its shared memory (SMEM_BYTES: sRow and the odd Q stride only with more than
    one row group) and threads, for every row of either table."""
    rows = [("cuda", r) for r in configs.TABLE if r.kernel == "flash_fwd_f32"]
    rows += [("hip", r) for r in configs.HIP_TABLE if r.kernel == "flash_fwd_portable"]
    groups = set()
    for vendor, cfg in rows:
        kernel = kernels.KERNELS[vendor, cfg.kernel]
        defines = kernel.defines(cfg, "float32", causal=False, vec=False)
        got = source_values(tmp_path, kernel, defines, ("SMEM_BYTES", "NUM_THREADS", "ROW_GROUPS"))
        assert got["SMEM_BYTES"] == kernel.shared_memory(defines), (vendor, cfg)
        assert got["NUM_THREADS"] == kernel.threads(defines), (vendor, cfg)
        groups.add(got["ROW_GROUPS"])
    assert {1, 2} <= groups  # both layouts checked


@needs_gcc
def test_simt_backward_shared_memory_is_the_kernels_own(tmp_path):
    """The backward without matrix instructions, one body (kernels_common/flash_bwd_simt.h) for
    both vendors: shared memory (SMEM_BYTES(1) for _dq's dS, SMEM_BYTES(2) for _dkdv's P and dS;
    the odd stride of the owned rows only with more than one row group) and threads, for every
    row of either table."""
    entries = {"flash_bwd_simt_dq": 1, "flash_bwd_simt_dkdv": 2, "flash_bwd_portable_dq": 1,
               "flash_bwd_portable_dkdv": 2}
    rows = [("cuda", r) for r in configs.TABLE if r.kernel in entries]
    rows += [("hip", r) for r in configs.HIP_TABLE if r.kernel in entries]
    groups = set()
    for vendor, cfg in rows:
        kernel = kernels.KERNELS[vendor, cfg.kernel]
        defines = kernel.defines(cfg, "float32", causal=False, vec=False)
        smem = f"SMEM_BYTES({entries[cfg.kernel]})"
        got = source_values(tmp_path, kernel, defines, (smem, "NUM_THREADS", "ROW_GROUPS"))
        assert got[smem] == kernel.shared_memory(defines), (vendor, cfg)
        assert got["NUM_THREADS"] == kernel.threads(defines), (vendor, cfg)
        groups.add(got["ROW_GROUPS"])
    assert {1, 2} <= groups  # both layouts checked


@needs_gcc
def test_matrix_core_blocks_are_the_kernels_own(tmp_path):
    """The rows a block of the HIP matrix-core kernels owns (BLOCK_M, or BLOCK_N of dK/dV: one
    MATRIX_N block per wave) and their LDS row padding, from mfma.h and wmma.h, for every row."""
    for cfg in configs.HIP_TABLE:
        if cfg.kernel not in configs.HIP_MFMA_KERNELS:
            continue
        kernel = kernels.hip(cfg.kernel)
        defines = kernel.defines(cfg, "float16", causal=False, vec=True)
        owned = "BLOCK_N" if cfg.kernel.endswith("dkdv") else "BLOCK_M"
        got = source_values(tmp_path, kernel, defines, (owned, "LDS_PAD"))
        assert got[owned] == (cfg.block_n if owned == "BLOCK_N" else cfg.block_m), cfg
        assert got["LDS_PAD"] == kernels._lds_pad(defines), cfg
        rows = kernels.Sizes(seqlen_q=got[owned] + 1, seqlen_k=got[owned] + 1, heads_q=4, heads_k=2,
                             m_blocks=5, splits=3)
        want = {"BLOCK_M": (2, 4), "BLOCK_N": (2 * cfg.dim_split, 2)}[owned]  # D split: more blocks
        if cfg.kernel.startswith("flash_decode"):
            want = (15, 2)  # row tiles x splits, kv heads
        assert kernel.grid(defines, rows) == want, cfg


def test_prep_rows_reach_the_kernel_as_defines():
    """flash_bwd_prep.cu takes its rows per block from the description (and refuses to compile
    without them): the value lives in xattn/kernels.py only."""
    code = jit.preprocess("cuda", kernels.cuda("flash_bwd_preprocess").source)
    assert not re.search(r"#\s*define\s+(NUM_WARPS|ROWS_PER_WARP)\b", code)
    defines = kernels.cuda("flash_bwd_preprocess").defines(None, "bfloat16")
    assert (defines["NUM_WARPS"], defines["ROWS_PER_WARP"]) == (kernels.PREP_WARPS, kernels.PREP_ROWS_PER_WARP)
