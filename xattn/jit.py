"""Run-time compilation of the kernel sources.

Sources are read with importlib.resources (xattn.kernel_source), so they load the same from a wheel
and from a checkout. Local `#include "x.h"` lines are inlined here, each piece preceded by a
`#line` directive, so that a compiler error names the real file and line and NVRTC needs no
include path. Includes are relative to the including file (kernels_common/ holds the
vendor-neutral headers both vendors include). Compiled modules are memoized per (device, source hash, options) in the
process; CuPy's own disk cache (CUPY_CACHE_DIR, by default ~/.cupy/kernel_cache) keeps them across processes.

Cache faults (tests/test_cache_faults.py): CuPy checksums its cache entries and recompiles a truncated
or corrupted one by itself. What it raises instead is handled here, once per process: a cache
directory it cannot create or write (OSError), or an entry that passes the checksum but does not load
(CUDADriverError), gives one KernelCacheWarning, switches CuPy to its in-memory cache
(CUPY_CACHE_IN_MEMORY=1) for the rest of the process, and the compile is retried once. A run-time
compiler that cannot be loaded (NVRTC, hiprtc) raises CompilerNotFound naming what to install.

CuPy 14 opens its disk cache when it is imported (cupy.cuda.compiler makes CUPY_CACHE_DIR then,
whatever CUPY_CACHE_IN_MEMORY says), so a directory that cannot be made fails `import cupy` itself,
before any compile. This module is imported before xattn first imports CuPy (xattn.cuda imports it
at its top), and _prepare_cupy_import below handles that fault there: the same one warning and
switch, and CUPY_CACHE_DIR pointed at an empty temporary directory for the import to make.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import warnings

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


@functools.lru_cache(maxsize=None)
def preprocess(vendor: str, name: str) -> str:
    """The source of kernels_<vendor>/<name> with its local includes inlined (each once).

    An include names a file relative to the including one, as a C compiler reads it:
    `#include "../kernels_common/attention_common.h"` from kernels_cuda/ reads the vendor-neutral
    headers, `#include "hopper.h"` from kernels_cuda/sm90/ reads kernels_cuda/sm90/hopper.h."""
    seen: set[str] = set()

    def expand(path: str) -> list[str]:  # path: "kernels_<vendor>/[folder/]file"
        if path in seen:
            return []
        seen.add(path)
        out = [f'#line 1 "{path}"']
        for number, line in enumerate(_read(path).splitlines(), start=1):
            match = _INCLUDE.match(line)
            if match:
                out += expand(posixpath.normpath(posixpath.join(posixpath.dirname(path),
                                                                match.group(1))))
                out.append(f'#line {number + 1} "{path}"')
            elif line.strip() == "#pragma once":
                out.append("")
            else:
                out.append(line)
        return out

    return "\n".join(expand(f"kernels_{vendor}/{name}")) + "\n"


def _read(path: str) -> str:
    directory, name = path.split("/", 1)
    if not directory.startswith("kernels_"):
        raise FileNotFoundError(f"{path}: kernel sources include files of kernels_*/ only")
    from xattn.sources import kernel_source
    return kernel_source(directory.removeprefix("kernels_"), name)


def define_options(defines: dict[str, int]) -> tuple[str, ...]:
    return tuple(f"-D{key}={value}" for key, value in sorted(defines.items()))


_modules: dict[tuple, object] = {}
_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _source_and_digest(vendor: str, source: str) -> tuple[str, str]:
    """The preprocessed source and its hash, computed once: get_function runs on every call."""
    code = preprocess(vendor, source)
    return code, hashlib.sha256(code.encode()).hexdigest()


def get_function(vendor: str, source: str, entry: str, defines: dict[str, int], device_id: int,
                 options: tuple[str, ...] = ()):
    """The compiled entry point of one variant on one device (a cupy.RawKernel). options: extra
    compiler options (the sm90 kernels pass -arch=sm_90a: wgmma and setmaxnreg need the "a"
    target, and CuPy's own -arch names the plain one)."""
    import cupy

    code, digest = _source_and_digest(vendor, source)
    options = ("-std=c++17",) + tuple(options) + define_options(defines)
    key = (device_id, digest, options, entry)
    kernel = _modules.get(key)
    if kernel is not None:
        return kernel
    with _lock:  # threads asking for the same new variant compile it once
        kernel = _modules.get(key)
        if kernel is None:
            kernel = _modules[key] = _compile(cupy, vendor, code, options, entry, device_id)
    return kernel


class KernelCacheWarning(UserWarning):
    """CuPy's on-disk kernel cache failed; kernels are cached in memory from then on."""


class CompilerNotFound(RuntimeError):
    """The run-time compiler (NVRTC or hiprtc) could not be loaded."""


_INSTALL_COMPILER = {
    "cuda": ("NVRTC, CUDA's run-time compiler", "pip install nvidia-cuda-nvrtc (CUDA 13, with "
             "'xattn[cuda13]') or nvidia-cuda-nvrtc-cu12 (CUDA 12, with 'xattn[cuda12]'), or a CUDA "
             "toolkit whose lib64 holds libnvrtc"),
    "hip": ("hiprtc, ROCm's run-time compiler", "install ROCm's hiprtc package (apt install hiprtc, "
            "from the ROCm release that matches 'xattn[rocm]')"),
}
_COMPILER_LIBRARY = re.compile(r"nvrtc|hiprtc", re.IGNORECASE)
_LOAD_FAILURE = re.compile(r"failed to load|cannot open|no such file|not found|undefined symbol",
                           re.IGNORECASE)


def _compile(cupy, vendor: str, code: str, options: tuple, entry: str, device_id: int):
    try:
        return _build(cupy, code, options, entry, device_id)
    except Exception as error:
        if isinstance(error, cupy.cuda.compiler.CompileException):
            raise  # the source does not compile: nothing to retry
        text = f"{type(error).__name__}: {error}"
        if _COMPILER_LIBRARY.search(text) and _LOAD_FAILURE.search(text):
            what, install = _INSTALL_COMPILER[vendor]
            raise CompilerNotFound(f"{what} could not be loaded ({text}); xattn compiles its "
                                   f"kernels with it at run time: {install}") from error
        if (not isinstance(error, (OSError, cupy.cuda.driver.CUDADriverError))
                or os.environ.get("CUPY_CACHE_IN_MEMORY") == "1"):
            raise  # not a fault of the disk cache, or that cache is off already
        _cache_in_memory(error)
    return _build(cupy, code, options, entry, device_id)  # a second failure propagates


def _build(cupy, code: str, options: tuple, entry: str, device_id: int):
    with cupy.cuda.Device(device_id):  # CuPy derives -arch from the current device
        module = cupy.RawModule(code=code, options=options)
        kernel = module.get_function(entry)
        kernel.compile()
    return kernel


def _cache_in_memory(error: Exception) -> None:
    """Warn (once per process: the switch below is process-wide) and stop using the disk cache."""
    directory = os.environ.get("CUPY_CACHE_DIR", "~/.cupy/kernel_cache")
    warnings.warn(f"xattn: CuPy's kernel cache in {directory} failed ({type(error).__name__}: "
                  f"{error}); compiling again and keeping kernels in memory for the rest of this "
                  f"process (CUPY_CACHE_IN_MEMORY=1). Fix or delete that directory, or point "
                  f"CUPY_CACHE_DIR at a writable one.", KernelCacheWarning, stacklevel=4)
    os.environ["CUPY_CACHE_IN_MEMORY"] = "1"


def cache_location() -> str:
    """Where compiled kernels persist, for `python -m xattn info`."""
    if os.environ.get("CUPY_CACHE_IN_MEMORY") == "1":
        return "in memory (CUPY_CACHE_IN_MEMORY=1)"
    return os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))


def _prepare_cupy_import() -> None:
    """Before CuPy is first imported: keep a cache directory that cannot be made from failing the
    import (CuPy 14). Makes the directory as the import would, and does nothing more when it can."""
    if "cupy" in sys.modules or importlib.util.find_spec("cupy") is None:
        return
    directory = os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
    try:
        os.makedirs(directory, exist_ok=True)
        return
    except OSError as error:
        if os.environ.get("CUPY_CACHE_IN_MEMORY") != "1":
            _cache_in_memory(error)
    # Nothing is written here while CUPY_CACHE_IN_MEMORY=1; CuPy only needs it to exist.
    stand_in = tempfile.mkdtemp(prefix="xattn-cupy-cache-")
    atexit.register(shutil.rmtree, stand_in, ignore_errors=True)
    os.environ["CUPY_CACHE_DIR"] = stand_in


_prepare_cupy_import()
