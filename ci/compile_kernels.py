"""Compile every CUDA specialization in xattn/configs.py with NVRTC, for each GPU family the table
serves, and read ptxas's resource report: registers, shared memory, stack frame, spills. The
kernels without rows (the backward's delta and dQ conversion, the decode's merge) are compiled for
every family and dtype too. Sources, defines and shared memory come from the kernel descriptions
(xattn/kernels.py), as the launches take them.

Runs without a GPU or driver: NVRTC comes from the cuda-bindings and nvidia-cuda-nvrtc wheels.
Fails (exit 1) on a compile error, on spills in any variant, or on a variant whose shared memory
exceeds what its GPU family allows one block.

With sm_90 among the archs, the Hopper kernels of xattn/sm90.py too (sm_90a: wgmma, setmaxnreg):
every forward and backward row in both 16-bit types, plain and with the masks and modifiers the
row serves; each must use exactly 168 registers (65536 / 384 at launch, which setmaxnreg splits
between producer and consumers) and spill nothing.

    python ci/compile_kernels.py [--arch 80 86 89 90] [--quick]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xattn import configs, jit, kernels  # noqa: E402

# Dynamic shared memory one block may opt into, per family (bytes).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
HALF = ("float16", "bfloat16")
ALL = ("float32",) + HALF
DTYPES = {"flash_fwd": HALF, "flash_bwd_dkdv": HALF, "flash_bwd_dq": HALF, "flash_fwd_f32": ("float32",),
          "flash_bwd_simt_dq": ALL, "flash_bwd_simt_dkdv": ALL,
          "flash_decode": HALF, "flash_decode_f32": ("float32",)}
PAGED = {"IS_VARLEN": 1, "IS_PAGED": 1}
# Defines a kernel takes beyond the table's (each combination is compiled).
EXTRA = {"flash_bwd_dkdv": [{"COMPUTE_DQ": 1}, {"COMPUTE_DQ": 0}],
         # forward: without and with attention sinks folded into the epilogue, and a packed batch
         # with paged keys and values (attention_varlen's block_table)
         "flash_fwd": [{}, {"HAS_SINKS": 1}, PAGED], "flash_fwd_f32": [{}, {"HAS_SINKS": 1}, PAGED]}
# The decode's variants, as kernels.cuda(...).defines takes them: the largest row tile (the
# table's), one m16 tile, the softcap variant, FP8 caches (e4m3fn, e5m2; paged too: the
# conversion path differs from sm_89 on).
DECODE_VARIANTS = {"flash_decode": [{}, {"rows": 16}, {"softcap": True}, {"kv_fp8": 1}, {"kv_fp8": 2},
                                    {"kv_fp8": 1, "rows": 16, "page_size": 16}],
                   "flash_decode_f32": [{}, {"softcap": True}, {"kv_fp8": 1}, {"kv_fp8": 2}]}
# sm_89 runs sm_86's rows; only the decode kernels compile differently there (FP8 conversions).
ARCH_KERNELS = {89: configs.DECODE_KERNELS}
# Kernels compiled with and without 16-byte copies (VEC_LOADS); decode has no causal variant.
VEC_VARIANTS = configs.TENSOR_CORE_KERNELS + configs.DECODE_KERNELS


def nvrtc_compile(code: str, name: str, options: list[str]) -> tuple[bool, str]:
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(code.encode(), name.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(prog)
    return err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace").rstrip("\x00")


def compile_entry(kernel, defines: dict, gpu: str) -> tuple[str | None, dict[str, int]]:
    """NVRTC-compile a described kernel (xattn/kernels.py) with `defines` for gpu ("sm_80",
    "sm_90a"): (the compiler's log if it failed, else None; ptxas's report of its entry point)."""
    options = [f"--gpu-architecture={gpu}", "-std=c++17", "--ptxas-options=-v", *jit.define_options(defines)]
    ok, log = nvrtc_compile(jit.preprocess("cuda", kernel.source), kernel.source, options)
    return (None, report(log, kernel.entry)) if ok else (log, {})


def report(log: str, entry: str) -> dict[str, int]:
    # ptxas reports each entry point of the source in turn; keep the section of this one.
    sections = re.split(r"(?=Compiling entry function )", log)
    log = next((s for s in sections if f"entry function '{entry}'" in s), log)

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack": number(r"(\d+) bytes stack frame"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


# Masks and score modifiers (attention_common.h), compiled for every attention kernel's sm_90 rows:
# spills there are reported, not failed (the tuned rows are sized for the plain kernels).
MODIFIER_FLAGS = [{"IS_CAUSAL": 1, "IS_LOCAL": 1}, {"HAS_SOFTCAP": 1}, {"IS_CAUSAL": 1, "HAS_ALIBI": 1},
                  {"IS_VARLEN": 1, "IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1}]
MODIFIER_ARCH = 90


def variants(archs: list[int], quick: bool):
    yield from table_variants(archs, quick)
    if quick or MODIFIER_ARCH not in archs:
        return
    for cfg in configs.TABLE:
        if cfg.kernel in configs.DECODE_KERNELS or cfg.arch != MODIFIER_ARCH:
            continue
        for flags in MODIFIER_FLAGS:
            causal = bool(flags.get("IS_CAUSAL"))
            if configs.select(cfg.kernel, MODIFIER_ARCH, cfg.head_dim, causal) == cfg:
                extra = EXTRA.get(cfg.kernel, [{}])[0]
                yield cfg, MODIFIER_ARCH, DTYPES[cfg.kernel][-1], causal, True, extra | flags


def table_variants(archs: list[int], quick: bool):
    for cfg in configs.TABLE:
        for arch in archs:
            if arch in ARCH_KERNELS and cfg.kernel not in ARCH_KERNELS[arch]:
                continue
            for dtype in DTYPES[cfg.kernel]:
                for causal in (False, True):
                    if configs.select(cfg.kernel, arch, cfg.head_dim, causal) != cfg:
                        continue  # not the row a device of this arch would use for this call
                    if causal and cfg.kernel in configs.DECODE_KERNELS:
                        continue  # masking is a run-time argument there
                    for vec in (True, False) if cfg.kernel in VEC_VARIANTS else (True,):
                        if quick and (causal or not vec):
                            continue
                        for extra in EXTRA.get(cfg.kernel, DECODE_VARIANTS.get(cfg.kernel, [{}])):
                            yield cfg, arch, dtype, causal, vec, extra


def table_defines(cfg, dtype: str, causal: bool, vec: bool, extra: dict) -> dict:
    """The defines a launch of this row and variant compiles with (xattn/kernels.py)."""
    kernel = kernels.cuda(cfg.kernel)
    if cfg.kernel in DECODE_VARIANTS:  # the decode's variant is the description's keywords
        return kernel.defines(cfg, dtype, **({"rows": cfg.block_m, "vec": vec, "softcap": False} | extra))
    return kernel.defines(cfg, dtype, causal=causal, vec=vec) | extra


# ---- the kernels without rows: the backward's row-wise passes, the decode's merge ------------------

def rowless_variants(archs: list[int]):
    """(label, kernel, defines, arch, dtype): every family and dtype; the merge at every head dim
    of the decode rows (its HEAD_DIM is theirs)."""
    for arch in archs:
        for dtype in ALL:
            for entry in ("flash_bwd_preprocess", "flash_bwd_convert_dq"):
                yield entry, kernels.cuda(entry), kernels.cuda(entry).defines(None, dtype), arch, dtype
            merge = kernels.cuda("flash_decode_merge")
            for cfg in {r.head_dim: r for r in configs.TABLE if r.kernel == "flash_decode"}.values():
                yield f"{merge.entry} D{cfg.head_dim}", merge, merge.defines(cfg, dtype), arch, dtype


def check_rowless(archs: list[int]) -> int:
    failures = 0
    for label, kernel, defines, arch, dtype in rowless_variants(archs):
        error, r = compile_entry(kernel, defines, f"sm_{arch}")
        if error is not None:
            print(f"COMPILE ERROR {label} sm_{arch} {dtype}\n{error}")
            failures += 1
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        failures += bool(spill)
        print(f"{label:26} {arch:>3} {dtype:9} {r['registers']:>4} {kernel.shared_memory(defines) / 1024:>7.1f} "
              f"{r['stack']:>5} {spill:>5}" + ("  <-- SPILLS" if spill else ""))
    return failures


# ---- the Hopper kernels (xattn/sm90.py) -----------------------------------------------------------

SM90_REGISTERS = 168  # 65536 / 384 threads: what setmaxnreg redistributes between the roles
SM90_FLAGS = [{}, {"IS_LOCAL": 1}, {"HAS_SOFTCAP": 1}, {"HAS_ALIBI": 1}]


def sm90_variants(quick: bool):
    """(label, kernel, [defines, ...], causal, dtype, flags) of every sm90 row: fp16 and bf16, and in
    bf16 the windows, softcap and ALiBi (the backward's rows only where they serve them). The
    forward's list is sm90.forward_variants': the call's variant, then the simpler ones a call
    falls back to where it spills."""
    from xattn import sm90

    forward, backward = kernels.cuda("flash_fwd_sm90"), kernels.cuda("flash_bwd_sm90")
    # the forward also on the persistent grid wherever its row does not use it (sm90.forward's ctas
    # can ask for it on any row) and on the one-CTA-per-block grid wherever it does
    for row in sm90.ROWS:
        for dtype in HALF:
            grids = [{}, {"PERSISTENT": int(not row.persistent)}]
            for flags in (SM90_FLAGS if dtype == "bfloat16" and not quick else SM90_FLAGS[:1]) + grids[1:]:
                variants = sm90.forward_variants(row, dtype, {"IS_CAUSAL": int(row.causal)} | flags)
                yield (f"sm90 fwd D{row.head_dim} N{row.block_n}", forward, variants, row.causal, dtype, flags)
    for row in sm90.BWD_ROWS:
        for dtype in HALF:
            served = SM90_FLAGS if dtype == "bfloat16" and row.modifiers and not quick else SM90_FLAGS[:1]
            for flags in served:
                for compute_dq in (True, False):  # False: deterministic=True's dK/dV-only kernel
                    defines = backward.defines(row, dtype, flags={"IS_CAUSAL": int(row.causal)} | flags,
                                               compute_dq=compute_dq)
                    label = f"sm90 bwd D{row.head_dim} M{row.block_m}{'' if compute_dq else ' dKdV'}"
                    yield (label, backward, [defines], row.causal, dtype, flags | {"local_bytes": row.local_bytes})


def check_sm90(quick: bool) -> int:
    failures = 0
    for label, kernel, variants, causal, dtype, flags in sm90_variants(quick):
        allowed = flags.pop("local_bytes", 0)  # the row's known spill (xattn/sm90.py BwdRow.local_bytes)
        start = time.perf_counter()
        for chosen, defines in enumerate(variants):  # the first that does not spill, as a call takes it
            smem = kernel.shared_memory(defines)
            error, r = compile_entry(kernel, defines, "sm_90a")
            if error is not None:
                break
            spill = r["spill_stores"] + r["spill_loads"] + r["stack"]
            if r["stack"] <= allowed:
                break
        seconds = time.perf_counter() - start
        if error is not None:
            print(f"COMPILE ERROR {label} {dtype} causal={causal} {flags}\n{error}")
            failures += 1
            continue
        # a fallback is for the modifiers' variants only: the rows' own variants must not need one
        bad = (r["stack"] > allowed or r["registers"] != SM90_REGISTERS or smem > SMEM_LIMIT[90]
               or (chosen and not flags))
        flag = "  <-- SPILLS/REGISTERS/SHARED MEMORY" if bad else ""
        failures += bool(bad)
        fallback = {k: v for k, v in defines.items() if variants[0].get(k) != v}
        name = (label + "".join(f" {k}" if v else f" {k}=0" for k, v in flags.items())
                + "".join(f" ->{k}={v}" for k, v in fallback.items()))
        print(f"{name:40} {dtype:9} {causal!s:>6} {r['registers']:>4} {smem / 1024:>7.1f} {r['stack']:>5} "
              f"{spill:>5} {seconds:>5.1f}{flag}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 86, 89, 90])
    parser.add_argument("--quick", action="store_true", help="non-causal, vectorized variants only")
    parser.add_argument("--kernels", nargs="+", help="only these table kernels (default: all)")
    args = parser.parse_args(argv)

    failures = fallback_spills = modifier_spills = 0
    print(f"{'kernel':14} {'sm':>3} {'dtype':9} {'D':>4} {'tile':>8} {'causal':>6} {'vec':>3} "
          f"{'regs':>4} {'smem KB':>7} {'stack':>5} {'spill':>5} {'sec':>5}")
    for cfg, arch, dtype, causal, vec, extra in variants(args.arch, args.quick):
        if args.kernels and cfg.kernel not in args.kernels:
            continue
        if extra == PAGED:  # paged calls run the row with 16 query rows a warp (configs.py)
            cfg = configs.paged_forward_row(cfg)
        kernel = kernels.cuda(cfg.kernel)
        defines = table_defines(cfg, dtype, causal, vec, extra)
        start = time.perf_counter()
        error, r = compile_entry(kernel, defines, f"sm_{arch}")
        seconds = time.perf_counter() - start
        smem = kernel.shared_memory(defines)
        if error is not None:
            print(f"COMPILE ERROR {cfg} sm_{arch} {dtype} causal={causal} vec={vec}\n{error}")
            failures += 1
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        too_big = smem > SMEM_LIMIT[arch]
        # Spills fail the check in the tuned (16-byte copy) variants; the element-wise fallback for
        # odd head dims and strides, and the mask/modifier/sink variants, are reported but
        # tolerated (e.g. sinks' epilogue spills 16 bytes in sm_80's D=128 row at 254 registers).
        flag = "  <-- SHARED MEMORY" if too_big else "  <-- SPILLS" if spill else ""
        # A plain paged variant (PAGED) must not spill where its contiguous twin does not.
        modifier = extra != PAGED and any(k in extra for k in (
            "IS_LOCAL", "HAS_SOFTCAP", "HAS_ALIBI", "IS_VARLEN", "HAS_SINKS"))
        failures += bool(too_big or (spill and vec and not modifier))
        fallback_spills += bool(spill and not vec)
        modifier_spills += bool(spill and vec and modifier)
        name = cfg.kernel + "".join(f" {k}={v}" for k, v in extra.items())
        print(f"{name:14} {arch:>3} {dtype:9} {cfg.head_dim:>4} {cfg.block_m:>4}x{cfg.block_n:<3} "
              f"{causal!s:>6} {int(vec):>3} {r['registers']:>4} {smem / 1024:>7.1f} {r['stack']:>5} "
              f"{spill:>5} {seconds:>5.1f}{flag}")
    if not args.kernels and not args.quick:
        print(f"{'kernel without rows':26} {'sm':>3} {'dtype':9} {'regs':>4} {'smem KB':>7} {'stack':>5} {'spill':>5}")
        failures += check_rowless(args.arch)
    if 90 in args.arch and not args.kernels:
        print(f"{'sm90 kernel':40} {'dtype':9} {'causal':>6} {'regs':>4} {'smem KB':>7} {'stack':>5} "
              f"{'spill':>5} {'sec':>5}")
        failures += check_sm90(args.quick)
    verdict = "FAILED" if failures else "all variants compiled, no spills in the tuned variants"
    if fallback_spills:
        verdict += f" ({fallback_spills} element-wise fallback variants spill)"
    if modifier_spills:
        verdict += f" ({modifier_spills} mask/modifier variants spill)"
    print("compile check:", verdict)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
