"""SASS instruction counts of an sm_90a kernel source, compiled here through NVRTC (cuda-bindings)
and disassembled with cuobjdump: the check scripts' evidence of HGMMA present and no local
memory (LDL/STL)."""

import os
import subprocess
import tempfile

from xattn import jit


def sass_counts(source: str, defines: dict, ops=("HGMMA",)) -> str:
    """'OP n ... LDL/STL n' for `source` (under kernels_cuda/) with `defines`, or why not."""
    try:
        from cuda.bindings import nvrtc
    except Exception as exc:  # no NVRTC through cuda-bindings here
        return f"sass: n/a ({type(exc).__name__})"
    code = jit.preprocess("cuda", source)
    opts = ["--gpu-architecture=sm_90a", "-std=c++17", *jit.define_options(defines)]
    err, prog = nvrtc.nvrtcCreateProgram(code.encode(), os.path.basename(source).encode(), 0, [], [])
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return "sass: compile failed"
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    cubin = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True,
                              timeout=60).stdout
    except Exception as exc:
        return f"sass: cuobjdump failed ({exc})"
    finally:
        os.unlink(f.name)
    lines = sass.splitlines()

    def count(*names):
        return sum(1 for line in lines if any(f" {name}" in line for name in names))

    return " ".join(f"{op} {count(op)}" for op in ops) + f" LDL/STL {count('LDL', 'STL')}"
