"""Run-time compilation of the kernel sources.

Sources are read with importlib.resources (xattn.kernel_source), so they load the same from a wheel
and from a checkout. Local `#include "x.h"` lines are inlined here, each piece preceded by a
`#line` directive, so that a compiler error names the real file and line and NVRTC needs no
include path. A HIP source may include the vendor-neutral CUDA header it shares,
`#include "../kernels_cuda/attention_common.h"`: a `../kernels_<vendor>/` prefix reads that
vendor's directory. Compiled modules are memoized per (device, source hash, options) in the
process; CuPy's own disk cache (CUPY_CACHE_DIR, by default ~/.cupy/kernel_cache) keeps them across processes.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_OTHER_VENDOR = re.compile(r"^\.\./kernels_(\w+)/([^/]+)$")  # "../kernels_cuda/x.h"


@functools.lru_cache(maxsize=None)
def preprocess(vendor: str, name: str) -> str:
    """The source of kernels_<vendor>/<name> with its local includes inlined (each once)."""
    seen: set[tuple[str, str]] = set()

    def expand(vendor: str, file: str) -> list[str]:
        if (vendor, file) in seen:
            return []
        seen.add((vendor, file))
        out = [f'#line 1 "kernels_{vendor}/{file}"']
        for number, line in enumerate(_read(vendor, file).splitlines(), start=1):
            match = _INCLUDE.match(line)
            if match:
                other = _OTHER_VENDOR.match(match.group(1))
                out += expand(*other.groups()) if other else expand(vendor, match.group(1))
                out.append(f'#line {number + 1} "kernels_{vendor}/{file}"')
            elif line.strip() == "#pragma once":
                out.append("")
            else:
                out.append(line)
        return out

    return "\n".join(expand(vendor, name)) + "\n"


def _read(vendor: str, name: str) -> str:
    try:
        from xattn import kernel_source
    except ImportError:  # package being assembled: read the checkout
        from pathlib import Path

        return (Path(__file__).resolve().parents[1] / f"kernels_{vendor}" / name).read_text()
    return kernel_source(vendor, name)


def define_options(defines: dict[str, int]) -> tuple[str, ...]:
    return tuple(f"-D{key}={value}" for key, value in sorted(defines.items()))


_modules: dict[tuple, object] = {}
_lock = threading.Lock()


def get_function(vendor: str, source: str, entry: str, defines: dict[str, int], device_id: int):
    """The compiled entry point of one variant on one device (a cupy.RawKernel)."""
    import cupy

    code = preprocess(vendor, source)
    options = ("-std=c++17",) + define_options(defines)
    key = (device_id, hashlib.sha256(code.encode()).hexdigest(), options, entry)
    kernel = _modules.get(key)
    if kernel is not None:
        return kernel
    with _lock:  # threads asking for the same new variant compile it once
        kernel = _modules.get(key)
        if kernel is None:
            with cupy.cuda.Device(device_id):  # CuPy derives -arch from the current device
                module = cupy.RawModule(code=code, options=options)
                kernel = module.get_function(entry)
                kernel.compile()
            _modules[key] = kernel
    return kernel
