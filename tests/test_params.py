"""The kernels' parameter blocks: each dtype of xattn/params.py (NumPy) against its struct in
kernels_common/params.h (C), field by field. A field added to one and not the other, or in another
place, fails here on the CPU.

The layout is checked with every compiler that builds a kernel taking the blocks, since each lays
the struct out for its own target: the host C compiler (gcc, which also prints the offsets), and
the device compilers reachable on the CPU machine: clang-19 for AMDGPU (gfx942 and gfx1100, HIP
device compilation), ROCm 5.2's hiprtc (gfx90a, the compiler CuPy uses on ROCm) and NVRTC (sm_80,
CUDA and the HIP-on-CUDA test path). The device compilers get the header followed by one
static_assert per field, generated from the dtype: the probe compiles only where every offset and
the size agree, and the failing assert names the field. A compiler that is not installed skips.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xattn import params

PARAMS_H = Path(__file__).resolve().parents[1] / "kernels_common" / "params.h"
CLANG = "/usr/lib/llvm-19/bin/clang"


def _leaves(dtype, prefix=""):
    """(C member path, offset) of every scalar field, in order."""
    for name in dtype.names:
        field, offset = dtype.fields[name][:2]
        if field.names:
            for sub, sub_offset in _leaves(field, f"{prefix}{name}."):
                yield sub, offset + sub_offset
        else:
            yield prefix + name, offset


STRUCTS = sorted(params.STRUCTS.items())


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler (gcc) here")
@pytest.mark.parametrize("struct, dtype", STRUCTS)
def test_params_layout_matches_the_c_struct(tmp_path, struct, dtype):
    leaves = list(_leaves(dtype))
    lines = [f'#include "{PARAMS_H}"', "#include <stdio.h>", "#include <stddef.h>",
             "int main(void) {", f'  printf("size %zu\\n", sizeof(struct {struct}));']
    lines += [f'  printf("{path} %zu\\n", offsetof(struct {struct}, {path}));' for path, _ in leaves]
    lines += ["  return 0;", "}"]
    source = tmp_path / "offsets.c"
    source.write_text("\n".join(lines) + "\n")
    binary = tmp_path / "offsets"
    subprocess.run(["gcc", "-std=c11", "-o", str(binary), str(source)], check=True,
                   capture_output=True, text=True)
    printed = dict(line.split() for line in subprocess.run([str(binary)], check=True, capture_output=True,
                                                          text=True).stdout.splitlines())
    assert int(printed.pop("size")) == dtype.itemsize
    assert {path: int(offset) for path, offset in printed.items()} == dict(leaves)


# ---- the device compilers ------------------------------------------------------------------------

def layout_probe() -> str:
    """params.h, then a static_assert on the size and on the offset of every field of every block
    (C++: what hiprtc, clang's HIP mode and NVRTC compile)."""
    lines = [PARAMS_H.read_text()]
    for struct, dtype in STRUCTS:
        lines.append(f'static_assert(sizeof({struct}) == {dtype.itemsize}, "sizeof({struct})");')
        lines += [f'static_assert(__builtin_offsetof({struct}, {path}) == {offset}, "{struct}.{path}");'
                  for path, offset in _leaves(dtype)]
    return "\n".join(lines) + "\n"


def test_the_probe_fails_on_a_wrong_offset(tmp_path):
    """The probe's asserts can fail: one offset off by 8 does not compile (with the host's clang or
    g++, whichever exists), and the error names the field."""
    compiler = shutil.which("g++") or (CLANG if os.path.exists(CLANG) else None)
    if compiler is None:
        pytest.skip("no C++ compiler (g++ or clang-19) here")
    probe = layout_probe()
    good = tmp_path / "good.cpp"
    good.write_text(probe)
    assert subprocess.run([compiler, "-std=c++17", "-fsyntax-only", str(good)],
                          capture_output=True, text=True).returncode == 0
    offset = params.ATTN_PARAMS.fields["seqlen_k"][1]
    bad = tmp_path / "bad.cpp"
    bad.write_text(probe.replace(f"seqlen_k) == {offset},", f"seqlen_k) == {offset + 8},"))
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "AttnParams.seqlen_k" in result.stderr


@pytest.mark.skipif(not os.path.exists(CLANG), reason="no clang-19 (apt-get install clang-19)")
@pytest.mark.parametrize("target", ["gfx942", "gfx1100"])
def test_params_layout_on_amdgpu_with_clang19(tmp_path, target):
    """The AMDGPU data layout (64-bit pointers and int64 aligned to 8) gives the dtypes' offsets,
    in HIP device compilation as the kernels get it."""
    source = tmp_path / "probe.hip"
    source.write_text(layout_probe())
    result = subprocess.run([CLANG, "-x", "hip", f"--offload-arch={target}", "--cuda-device-only",
                             "-nogpulib", "-nogpuinc", "-std=c++17", "-fsyntax-only", str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


_HIPRTC_PROBE = """
import ctypes, sys
lib = ctypes.CDLL("libamdhip64.so")
prog = ctypes.c_void_p()
code = sys.stdin.read().encode()
assert lib.hiprtcCreateProgram(ctypes.byref(prog), code, b"probe.hip", 0, None, None) == 0
options = [b"--offload-arch=gfx90a", b"-std=c++17"]
status = lib.hiprtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
size = ctypes.c_size_t()
lib.hiprtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value + 1)
lib.hiprtcGetProgramLog(prog, log)
print(log.value.decode(errors="replace"))
sys.exit(status)
"""


def _hiprtc_missing() -> bool:
    try:
        ctypes.CDLL("libamdhip64.so")
    except OSError:
        return True
    return False


@pytest.mark.skipif(_hiprtc_missing(), reason="no hiprtc (apt-get install libamdhip64-dev)")
def test_params_layout_on_amdgpu_with_hiprtc():
    """ROCm 5.2's hiprtc for gfx90a (in a child process: that hiprtc aborts its process on some
    errors)."""
    result = subprocess.run([sys.executable, "-c", _HIPRTC_PROBE], input=layout_probe(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_params_layout_with_nvrtc():
    """NVRTC for sm_80: the CUDA kernels and the HIP-on-CUDA test path take the same blocks."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="pip install cuda-bindings nvidia-cuda-nvrtc")
    err, prog = nvrtc.nvrtcCreateProgram(layout_probe().encode(), b"probe.cu", 0, [], [])
    options = [b"--gpu-architecture=sm_80", b"-std=c++17"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(prog)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")


@pytest.mark.parametrize("struct, dtype", STRUCTS)
def test_every_c_member_has_a_numpy_field(struct, dtype):
    """The other direction: members named in the C struct's body are all in the dtype (a member
    added in C only would otherwise shift nothing the offset test sees if it is the last one)."""
    text = PARAMS_H.read_text()
    body = text[text.index(f"struct {struct} {{"):]
    body = body[:body.index("};")]
    members = []
    for line in body.splitlines()[1:]:
        code = line.split("//")[0].strip().rstrip(";")
        if code:
            members += [name.strip().lstrip("*") for name in code.split(None, 1)[1].replace("TensorRef", "").split(",")]
    members = [m.split()[-1].lstrip("*") for m in members]
    assert members == list(dtype.names)


def test_pointer_words_are_the_pointers_of_each_block():
    """params.pointer_words (what a launch patches per call): every TensorRef's ptr and every
    other pointer field, at the word of its offset, and nothing else."""
    attn = params.pointer_words(params.ATTN_PARAMS)
    assert set(attn) == {*params.ATTN_TENSORS, "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "sinks",
                         "block_table", "seqused_k"}
    decode = params.pointer_words(params.DECODE_PARAMS)
    assert set(decode) == {"q", "k", "v", "o", "lse", "k_new", "v_new", "o_part", "lse_part",
                           "cache_seqlens", "block_table", "sinks", "cache_leftpad", "k_scale",
                              "v_scale"}
    for dtype, words in ((params.ATTN_PARAMS, attn), (params.DECODE_PARAMS, decode)):
        for name, word in words.items():
            field, offset = dtype.fields[name][:2]
            assert word * 8 == offset + (field.fields["ptr"][1] if field.names else 0)
