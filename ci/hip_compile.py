"""Compile every HIP specialization in xattn/configs.py -- forward and backward -- for AMD targets
and inspect the results: registers, scratch, spills, LDS, and the matrix instructions (MFMA on
CDNA, WMMA on RDNA3/RDNA4) of the matrix-core kernels.

Runs without a GPU, with two compilers:
- hiprtc (hiprtcCreateProgram / hiprtcCompileProgram in libamdhip64.so, the API CuPy uses on ROCm)
  from Debian's ROCm 5.2 packages (apt-get install hipcc libamdhip64-dev rocm-device-libs), for
  gfx908, gfx90a and gfx1030; the code objects are read with that ROCm's LLVM tools (llvm-readelf
  for the AMDGPU metadata note, llvm-objdump for the instructions).
- Debian's clang-19 (apt-get install clang-19 lld-19, with the HIP headers of the packages above),
  for the targets ROCm 5.2 does not know: gfx942 (MI300), gfx1100 (RDNA3) and gfx1201 (RDNA4).
  `clang-19 -x hip --offload-arch=<gfx> --cuda-device-only -nogpulib -S` writes AMDGPU assembly,
  whose AMDGPU metadata block carries the same fields as the code object's note; the instructions
  are counted in the entry point's body. The HIP headers implement threadIdx, blockIdx,
  __syncthreads, expf, tanhf, ... as calls into ROCm's device libraries (ockl, ocml, hip.bc),
  which hiprtc links in and inlines. -nogpulib links nothing, so each of those stays a real
  function call, and the calling convention's reserved and preserved registers then cost the
  kernels dozens of VGPRs and their SGPRs (the gfx942 dK/dV "spills" of 2026-11-30 were that).
  The compile therefore links the target-independent bitcode of Debian's rocm-device-libs
  (DEVICE_LIBS, with -mlink-builtin-bitcode, as the ROCm driver does), and a kernel whose body
  still calls anything fails ("CALLS").
gfx950 (MI350) is known to neither (clang-19 rejects the name; the script shows its answer).

Every row is compiled plain and causal. The attention variants of issue 6 (kernels_common/
attention_common.h's flags: sliding window, softcap, ALiBi, packed varlen batches, and all of them
together), the forwards' sinks and the portable decode's FP8 caches (issue 17) are compiled for every kernel and target at one representative head dim (VARIANT_HEAD_DIM,
where the MFMA backward's registers are tightest, or a kernel's largest row below it), once for
each form of its rows (the WMMA rows with their operands in registers, in LDS, and dK/dV split
over D: variant_head_dims), in the dtype with the most registers; `--variants all` compiles every
flag combination for every row instead (several times longer).

Fails (exit 1) on a compile error, scratch or spills in any variant, registers or LDS over the
target's limits, a matrix-core variant without its matrix instructions, or a function call left
in a kernel.

    python ci/hip_compile.py [--arch gfx908 gfx90a gfx1030 gfx942 gfx1100 gfx1201] [--jobs N]
                             [--variants {some,all}]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xattn import configs, jit, kernels  # noqa: E402

HIPRTC_TARGETS = ("gfx908", "gfx90a", "gfx1030")
CLANG_TARGETS = ("gfx942", "gfx1100", "gfx1201")  # newer than ROCm 5.2's hiprtc
TARGETS = HIPRTC_TARGETS + CLANG_TARGETS
NEWER_TARGETS = ("gfx942", "gfx1100", "gfx950")  # asked of hiprtc, expected to be unknown to it
UNKNOWN_TARGETS = ("gfx950",)  # asked of clang-19, expected to be unknown to it
CLANG = "clang-19"
# ROCm's device libraries (Debian's rocm-device-libs), linked into every clang-19 compile as hiprtc
# links them: hip.bc (__syncthreads' fence), ocml (math), ockl (work-item ids), and the control
# variables hiprtc's defaults choose (code object v5, IEEE denormals, no fast-math, correctly
# rounded sqrt); the wave-size one per target. Their oclc_isa_version files stop at gfx940 and
# gfx1036: the target's __oclc_ISA_version (ocml's logf and expf read it on gfx11) is written here
# the way those files define it (isa_version_bitcode).
DEVICE_LIBS_DIR = "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode"
DEVICE_LIBS = ("hip.bc", "ocml.bc", "ockl.bc", "oclc_abi_version_500.bc", "oclc_daz_opt_off.bc",
               "oclc_finite_only_off.bc", "oclc_unsafe_math_off.bc",
               "oclc_correctly_rounded_sqrt_on.bc")
# Registers one lane may use: (VGPRs, AGPRs). gfx90a and gfx942 have one file of 512 shared by both
# kinds (vgpr_count is the total); RDNA has 256 VGPRs per lane in wave32 and no AGPRs.
REGISTER_LIMIT = {"gfx908": (256, 256), "gfx90a": (512, 256), "gfx1030": (256, 0),
                  "gfx942": (512, 256), "gfx1100": (256, 0), "gfx1201": (256, 0)}

# The mask and modifier flags of the variants (attention_common.h), by name. IS_CAUSAL is also set
# by every row's causal column; "window" is a sliding window (left and right edges), "left" a
# window unbounded on the right. Softcap and ALiBi are never combined (xattn.api refuses it).
VARIANT_FLAGS = {
    "window": {"IS_CAUSAL": 1, "IS_LOCAL": 1},
    "left": {"IS_LOCAL": 1},
    "softcap": {"HAS_SOFTCAP": 1},
    "alibi": {"HAS_ALIBI": 1},
    "varlen": {"IS_VARLEN": 1},
    "all+softcap": {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1, "IS_VARLEN": 1},
    "all+alibi": {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_ALIBI": 1, "IS_VARLEN": 1},
    "paged": {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1, "IS_VARLEN": 1, "IS_PAGED": 1},
    # sinks with a sliding window (GPT-OSS's layers), softcap and packed batches
    "sinks": {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1, "IS_VARLEN": 1, "HAS_SINKS": 1},
    # FP8 caches of either format, the second paged with every flag the decode takes
    "fp8_e4m3fn": {"KV_FP8": 1},
    "fp8_e5m2": {"IS_CAUSAL": 1, "IS_LOCAL": 1, "HAS_SOFTCAP": 1, "IS_PAGED": 1, "KV_FP8": 2},
}
# Flags only some kernels have, and those kernels. Paged keys and values exist in the portable
# forward (attention_varlen's block_table) and the portable decode (attention_with_kvcache's): the
# hip backend sends every paged call there (configs.select_hip, select_hip_decode); the decode
# ignores IS_VARLEN (it has no packed batches). HAS_SINKS is the forwards' (the decode reads its
# sinks pointer at run time, the backward needs none). FP8 caches (KV_FP8) are the portable
# decode's (select_hip_decode sends them there).
PAGED_KERNELS = ("flash_fwd_portable", "flash_decode_portable")
FLAG_KERNELS = {"paged": PAGED_KERNELS,
                "sinks": ("flash_fwd_mfma", "flash_fwd_wmma", "flash_fwd_portable"),
                "fp8_e4m3fn": ("flash_decode_portable",), "fp8_e5m2": ("flash_decode_portable",)}
VARIANT_HEAD_DIM = 128
# The decode takes the band, the softcap, pages and FP8 caches only (no ALiBi, no packed batches:
# kvcache.py's API).
DECODE_VARIANT_FLAGS = ("window", "left", "softcap", "paged", "fp8_e4m3fn", "fp8_e5m2")
VARIANT_DTYPE = {"flash_fwd_portable": "float32", "flash_bwd_portable_dq": "float32",
                 "flash_bwd_portable_dkdv": "float32",
                 # the only dtype every target's portable decode serves (16-bit: the matrix decode)
                 "flash_decode_portable": "float32"}  # MFMA kernels: bfloat16 (the default)


def variant_head_dims(cfg) -> set[int]:
    """The head dims whose rows of cfg's kernel and family get the variant flags: for each form
    the rows take (operands in registers, in LDS, D split; configs' frags_in_lds and dim_split),
    its row at VARIANT_HEAD_DIM or the largest below it, or, for a form whose rows all lie above
    it, its largest; and where there are several forms, the largest row of all. Every structure a
    kernel source compiles to meets the flags."""
    forms = {}
    for r in configs.HIP_TABLE:
        if (r.kernel, r.arch) == (cfg.kernel, cfg.arch):
            forms.setdefault((r.frags_in_lds, r.dim_split), []).append(r.head_dim)
    chosen = {max(d for d in dims if d <= VARIANT_HEAD_DIM) if min(dims) <= VARIANT_HEAD_DIM else max(dims)
              for dims in forms.values()}
    if len(forms) > 1:  # and the largest row, the one with the most registers of its form
        chosen.add(max(d for dims in forms.values() for d in dims))
    return chosen


def _tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/bin/{name}-*"), reverse=True)), None)
    if found is None:
        raise SystemExit(f"{name} not found (Debian: apt-get install llvm-15, a dependency of hipcc)")
    return found


def hiprtc_compile(code: str, name: str, options: list[str]) -> tuple[bool, str, bytes]:
    lib = ctypes.CDLL("libamdhip64.so")
    prog = ctypes.c_void_p()
    status = lib.hiprtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0, None, None)
    if status != 0:
        return False, f"hiprtcCreateProgram returned {status}", b""
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = lib.hiprtcCompileProgram(prog, len(options), argv)
    size = ctypes.c_size_t()
    lib.hiprtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value + 1)
    lib.hiprtcGetProgramLog(prog, log)
    binary = b""
    if status == 0:
        lib.hiprtcGetCodeSize(prog, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        lib.hiprtcGetCode(prog, buffer)
        binary = buffer.raw
    lib.hiprtcDestroyProgram(ctypes.byref(prog))
    return status == 0, log.value.decode(errors="replace").strip(), binary


def isa_version_bitcode(target: str, directory: str) -> str:
    """A bitcode file defining __oclc_ISA_version for `target` as ROCm's oclc_isa_version_<gfx>.bc
    does: major * 1000 + minor * 100 + stepping (gfx942: 9402, gfx1100: 11000, gfx1201: 12001)."""
    digits = target.removeprefix("gfx")
    version = int(digits[:-2]) * 1000 + int(digits[-2], 16) * 100 + int(digits[-1], 16)
    text = os.path.join(directory, "isa_version.ll")
    with open(text, "w") as f:
        f.write('target triple = "amdgcn-amd-amdhsa"\n'
                f"@__oclc_ISA_version = linkonce_odr protected local_unnamed_addr addrspace(4) "
                f"constant i32 {version}, align 4\n")
    bitcode = os.path.join(directory, "isa_version.bc")
    subprocess.run(["/usr/lib/llvm-19/bin/llvm-as", text, "-o", bitcode], check=True)
    return bitcode


def device_libs(target: str, directory: str) -> list[str]:
    """clang options linking DEVICE_LIBS for `target` (wave64 on gfx9, wave32 on gfx10+) and its
    ISA version (written into `directory`)."""
    wave64 = "on" if target.startswith("gfx9") else "off"
    libs = [os.path.join(DEVICE_LIBS_DIR, lib) for lib in (*DEVICE_LIBS, f"oclc_wavefrontsize64_{wave64}.bc")]
    missing = [lib for lib in libs if not os.path.exists(lib)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing (Debian: apt-get install rocm-device-libs)")
    libs.append(isa_version_bitcode(target, directory))
    return [option for lib in libs for option in ("-Xclang", "-mlink-builtin-bitcode", "-Xclang", lib)]


def clang_compile(code: str, name: str, target: str, defines: dict[str, int]) -> tuple[bool, str, str]:
    """(ok, log, AMDGPU assembly) of one HIP source for `target` with clang-19. hiprtc provides the
    HIP device API (and hip_fp16.h) without an #include; here the headers come in with -include,
    and the device libraries with device_libs."""
    with tempfile.TemporaryDirectory() as tmp:
        source, out = os.path.join(tmp, name), os.path.join(tmp, "out.s")
        with open(source, "w") as f:
            f.write(code)
        env = dict(os.environ, PATH="/usr/lib/llvm-19/bin:" + os.environ.get("PATH", ""))
        result = subprocess.run([CLANG, "-x", "hip", f"--offload-arch={target}", "--cuda-device-only",
                                 "-nogpulib", "--rocm-path=/usr", "-O3", "-S", "-std=c++17",
                                 "-include", "hip/hip_runtime.h", "-include", "hip/hip_fp16.h",
                                 *device_libs(target, tmp), *jit.define_options(defines),
                                 source, "-o", out], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            return False, result.stderr.strip(), ""
        with open(out) as f:
            return True, result.stderr.strip(), f.read()


def clang_probe(target: str) -> str:
    ok, log, _ = clang_compile('extern "C" __global__ void k() {}', "probe.hip", target, {})
    return "compiles" if ok else f"not supported by {CLANG}: {log.splitlines()[0] if log else '?'}"


def inspect_assembly(assembly: str, kernel: str) -> dict[str, int]:
    """The same fields as `inspect`, from clang's assembly: the entry point's item of the
    amdhsa.kernels metadata list, and its matrix instructions between its label and its end."""
    items = assembly[assembly.index("amdhsa.kernels:"):].split("\n  - ")
    [meta] = [item for item in items if re.search(rf"\.name:\s+{kernel}\n", item)]
    body = re.search(rf"\n{kernel}:.*?\n(.*?)\n\.Lfunc_end", assembly, re.S)

    def field(key: str) -> int:
        match = re.search(rf"\.{key}:\s+(\d+)", meta)
        return int(match.group(1)) if match else 0

    return {
        "vgpr": field("vgpr_count"), "agpr": field("agpr_count"), "sgpr": field("sgpr_count"),
        "spills": field("vgpr_spill_count") + field("sgpr_spill_count"),
        "scratch": field("private_segment_fixed_size"), "static_lds": field("group_segment_fixed_size"),
        "wave": field("wavefront_size"),
        "mfma": len(re.findall(r"\bv_(?:mfma|wmma)_", body.group(1))) if body else 0,
        # function calls (s_swappc_b64) and symbols nothing defined (relocations against them)
        "calls": (len(re.findall(r"\bs_swappc_b64\b", body.group(1))) if body else 0)
                 + len(set(re.findall(r"\b(__o[ck]l[cm]?_\w+)@", assembly))),
    }


def probe(target: str) -> str:
    """Whether hiprtc knows `target`, asked in a child process: ROCm 5.2's hiprtc aborts the
    process (munmap_chunk: invalid pointer) on a target name it does not know."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", target],
                            capture_output=True, text=True)
    if result.returncode == 0:
        return result.stdout.strip()
    return (f"not supported by this compiler: hiprtc aborts on the target name (exit "
            f"{result.returncode}); the kernels are compiled for its older siblings instead")


def inspect(binary: bytes, target: str, kernel: str) -> dict[str, int]:
    """Metadata (AMDGPU note) and MFMA instruction count of entry point `kernel` in a code object
    (a source may hold several entry points: flash_bwd_portable.hip has _dq and _dkdv)."""
    with tempfile.NamedTemporaryFile(suffix=".co") as f:
        f.write(binary)
        f.flush()
        notes = subprocess.run([_tool("llvm-readelf"), "--notes", f.name], check=True,
                               capture_output=True, text=True).stdout
        disassembly = subprocess.run([_tool("llvm-objdump"), "-d", f"--mcpu={target}", f.name],
                                     check=True, capture_output=True, text=True).stdout
    # amdhsa.kernels is a YAML list, one "  - " item per entry point; pick this one's.
    items = notes[notes.index("amdhsa.kernels:"):].split("\n  - ")
    [meta] = [item for item in items if re.search(rf"\.name:\s+{kernel}\n", item)]
    # The disassembly of the entry point runs from its label to the next blank line.
    body = re.search(rf"<{kernel}>:\n(.*?)(\n\n|\Z)", disassembly, re.S)

    def field(key: str) -> int:
        match = re.search(rf"\.{key}:\s+(\d+)", meta)
        return int(match.group(1)) if match else 0

    return {
        "vgpr": field("vgpr_count"), "agpr": field("agpr_count"), "sgpr": field("sgpr_count"),
        "spills": field("vgpr_spill_count") + field("sgpr_spill_count"),
        "scratch": field("private_segment_fixed_size"), "static_lds": field("group_segment_fixed_size"),
        "wave": field("wavefront_size"),
        "mfma": len(re.findall(r"\bv_mfma_", body.group(1))) if body else 0,
        "calls": len(re.findall(r"\bs_swappc_b64\b", body.group(1))) if body else 0,
    }


def rows_used(dtype: str, target: str, head_dim: int, causal: bool) -> set:
    """The table rows a forward and a backward call would launch on a device of `target`."""
    used = set()
    for select in (lambda: (configs.select_hip(dtype, target, head_dim, causal),),
                   lambda: configs.select_hip_backward(dtype, target, head_dim, causal),
                   lambda: _decode_rows(dtype, target, head_dim)):
        try:
            used.update(select())
        except ValueError:
            pass
    return used


def _decode_rows(dtype: str, target: str, head_dim: int) -> tuple:
    """The decode row, and with a matrix-core one the portable row whose merge and append it
    launches (xattn.hip.launch_decode), which then is compiled in this dtype too."""
    row = configs.select_hip_decode(dtype, target, head_dim)
    if row.kernel == configs.HIP_DECODE_KERNEL:
        return (row,)
    return row, configs.hip_decode_aux_row(target, row.head_dim)


def defines_of(cfg, dtype: str, causal: bool, vec: bool, flags: str) -> dict[str, int]:
    """The -D defines of a row for one call: the row's, then the variant's flags (as xattn.hip
    merges them); the preprocess takes none of them."""
    defines = kernels.hip(cfg.kernel).defines(cfg, dtype, causal=causal, vec=vec)
    if flags != "plain" and cfg.kernel != "flash_bwd_preprocess":
        defines |= VARIANT_FLAGS[flags]
    return defines


def variants(targets, every_variant: bool = False):
    """(cfg, target, dtype, causal, vec, flags) for every call a device of `target` would send to
    cfg: plain and causal for every row; the VARIANT_FLAGS at VARIANT_HEAD_DIM in one dtype per
    kernel, or for every row and dtype with every_variant."""
    seen = set()
    for flags in ("plain", *VARIANT_FLAGS):
        for cfg in configs.HIP_TABLE:
            if flags != "plain" and (cfg.kernel == "flash_bwd_preprocess" or not every_variant
                                     and cfg.head_dim not in variant_head_dims(cfg)):
                continue
            if flags != "plain" and cfg.kernel in configs.HIP_DECODE_KERNELS and flags not in DECODE_VARIANT_FLAGS:
                continue
            if flags in FLAG_KERNELS and cfg.kernel not in FLAG_KERNELS[flags]:
                continue
            for target in targets:
                for dtype in configs.HIP_KERNELS_FOR_DTYPE:
                    if flags != "plain" and not every_variant and dtype != VARIANT_DTYPE.get(cfg.kernel, "bfloat16"):
                        continue
                    for causal in (False, True) if flags == "plain" else (bool(VARIANT_FLAGS[flags].get("IS_CAUSAL")),):
                        if cfg not in rows_used(dtype, target, cfg.head_dim, causal):
                            continue  # not a row a device of this target uses for this call
                        vecs = (True, False) if cfg.kernel in configs.HIP_MFMA_KERNELS else (False,)
                        for vec in vecs if flags == "plain" or every_variant else vecs[:1]:
                            # defines, not the row: the preprocess ignores causal and the head dim
                            key = (cfg.kernel, target, tuple(sorted(defines_of(cfg, dtype, causal, vec, flags).items())))
                            if key not in seen:
                                seen.add(key)
                                yield cfg, target, dtype, causal, vec, flags


def options(target: str, defines: dict[str, int]) -> list[str]:
    return [f"--offload-arch={target}", "-O3", "-std=c++17", *jit.define_options(defines)]


def compile_variant(variant):
    cfg, target, dtype, causal, vec, flags = variant
    defines = defines_of(cfg, dtype, causal, vec, flags)
    start = time.perf_counter()
    source = kernels.hip(cfg.kernel).source
    if target in CLANG_TARGETS:
        ok, log, assembly = clang_compile(jit.preprocess("hip", source), source, target, defines)
        result = inspect_assembly(assembly, cfg.kernel) if ok else None
    else:
        ok, log, binary = hiprtc_compile(jit.preprocess("hip", source), source, options(target, defines))
        result = inspect(binary, target, cfg.kernel) if ok else None
    return variant, ok, log, result, time.perf_counter() - start


def lds_bytes(variant) -> int:
    """The dynamic LDS a launch of this variant asks for (xattn/kernels.py)."""
    cfg, target, dtype, causal, vec, flags = variant
    return kernels.hip(cfg.kernel).shared_memory(defines_of(cfg, dtype, causal, vec, flags))


def check(variant, r) -> list[str]:
    cfg, target, dtype, causal, vec, flags = variant
    problems = []
    if r["scratch"] or r["spills"]:
        problems.append("SCRATCH/SPILLS")
    vgpr_limit, agpr_limit = REGISTER_LIMIT[target]
    if r["vgpr"] > vgpr_limit or r["agpr"] > agpr_limit:
        problems.append("REGISTERS")
    if lds_bytes(variant) + r["static_lds"] > configs.HIP_LDS_BYTES:
        problems.append("LDS")
    if r["wave"] != configs.hip_wave_size(cfg):
        problems.append("WAVE SIZE")
    if r.get("calls"):
        problems.append("CALLS")
    if cfg.kernel in configs.HIP_MFMA_KERNELS and r["mfma"] == 0:
        problems.append("NO WMMA" if cfg.kernel in configs.HIP_WMMA_KERNELS else "NO MFMA")
    return problems


def operands(cfg) -> str:
    """Where a row keeps its fixed operands: "lds" (frags_in_lds), "lds/2" (and dK/dV in two
    slices of D), or "-" (registers, or a kernel without such operands)."""
    if not cfg.frags_in_lds:
        return "-"
    return "lds" + (f"/{cfg.dim_split}" if cfg.dim_split != 1 else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--probe", metavar="TARGET", help="compile an empty kernel for TARGET only")
    parser.add_argument("--variants", choices=("some", "all"), default="some",
                        help="the window/softcap/ALiBi/varlen flags at one head dim (some) or every row (all)")
    parser.add_argument("--kernels", nargs="+", help="only these table kernels (default: all)")
    args = parser.parse_args(argv)
    if args.probe:
        ok, log, _ = hiprtc_compile('extern "C" __global__ void k() {}', "probe.hip",
                                    options(args.probe, {}))
        print("compiles" if ok else f"compile error: {log[:200]}")
        return 0

    if set(args.arch) & set(HIPRTC_TARGETS):
        version = ctypes.c_int()
        ctypes.CDLL("libamdhip64.so").hipRuntimeGetVersion(ctypes.byref(version))
        print(f"hiprtc from libamdhip64.so, HIP runtime version {version.value}")
        for target in NEWER_TARGETS:
            print(f"hiprtc, {target}: {probe(target)}")
    if set(args.arch) & set(CLANG_TARGETS):
        version = subprocess.run([CLANG, "--version"], capture_output=True, text=True,
                                 env=dict(os.environ, PATH="/usr/lib/llvm-19/bin:" + os.environ.get("PATH", "")))
        print(f"{version.stdout.splitlines()[0]} (targets {', '.join(CLANG_TARGETS)})")
        for target in UNKNOWN_TARGETS:
            print(f"{CLANG}, {target}: {clang_probe(target)}")

    failures = count = 0
    print(f"{'kernel':23} {'target':7} {'dtype':8} {'D':>3} {'tile':>7} {'ops':6} {'wave':>4} {'causal':>6} {'variant':11} {'vec':>3} "
          f"{'vgpr':>4} {'agpr':>4} {'sgpr':>4} {'LDS KB':>6} {'scratch':>7} {'spill':>5} {'mma':>4} {'sec':>4}")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        chosen = [v for v in variants(args.arch, args.variants == "all")
                  if not args.kernels or v[0].kernel in args.kernels]
        for variant, ok, log, r, seconds in pool.map(compile_variant, chosen):
            cfg, target, dtype, causal, vec, flags = variant
            count += 1
            if not ok:
                print(f"COMPILE ERROR {cfg} {target} {dtype} causal={causal} {flags} vec={vec}\n{log}")
                failures += 1
                continue
            problems = check(variant, r)
            failures += bool(problems)
            lds = (lds_bytes(variant) + r["static_lds"]) / 1024
            print(f"{cfg.kernel:23} {target:7} {dtype:8} {cfg.head_dim:>3} {cfg.block_m:>3}x{cfg.block_n:<3} {operands(cfg):6} "
                  f"{r['wave']:>4} {causal!s:>6} {flags:11} {int(vec):>3} {r['vgpr']:>4} {r['agpr']:>4} {r['sgpr']:>4} "
                  f"{lds:>6.1f} {r['scratch']:>7} {r['spills']:>5} {r['mfma']:>4} {seconds:>4.1f}"
                  + (f"  <-- {', '.join(problems)}" if problems else ""))
    print(f"hip compile check ({time.perf_counter() - start:.0f} s):",
          "FAILED" if failures else f"all {count} variants compiled; no scratch, no spills, registers "
          "and LDS within limits, MFMA/WMMA in every matrix-core variant")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
