"""Backend selection: which backend serves given arrays, and which backends work here.

Backends:
  reference  NumPy, host memory (numpy arrays, CPU torch tensors, CPU DLPack producers)
  cuda       CUDA kernels JIT-compiled by a CUDA build of CuPy (xattn/cuda.py)
  hip        HIP kernels JIT-compiled by a ROCm build of CuPy (xattn/hip.py)
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

import numpy as np

BACKENDS = ("reference", "cuda", "hip")
ENVIRONMENT_VARIABLE = "XATTN_BACKEND"
# The backend that serves memory of each kind when none is asked for.
_NATURAL_BACKEND = {"cpu": "reference", "cuda": "cuda", "rocm": "hip"}
_EXTRA_FOR = {"cuda": "xattn[cuda12] or xattn[cuda13]", "hip": "xattn[rocm]"}
# True while xattn.hip.on_cuda (a test hook) has the hip backend serve CUDA memory with its
# portable kernels; xattn/dispatch.py reads it.
hip_on_cuda = False


class BackendStatus(NamedTuple):
    usable: bool
    reason: str


@functools.cache
def backend_status(name: str) -> BackendStatus:
    """Whether backend `name` works in this process, and why (cached: it does not change)."""
    if name == "reference":
        return BackendStatus(True, f"NumPy {np.__version__} on the host")
    if name == "cuda":
        try:
            module = importlib.import_module("xattn.cuda")
        except ImportError as error:
            return BackendStatus(False, f"xattn.cuda could not be imported: {error}")
        return _ask_availability(module)
    if name == "hip":
        try:
            import cupy
        except ImportError:
            return BackendStatus(False, f"cupy is not installed (pip install '{_EXTRA_FOR['hip']}')")
        if not cupy.cuda.runtime.is_hip:
            return BackendStatus(False, "cupy is a CUDA build; the hip backend needs a ROCm "
                                        "build (cupy-rocm-7-0)")
        return _ask_availability(importlib.import_module("xattn.hip"))
    raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {name!r}")


def _ask_availability(module) -> BackendStatus:
    try:
        return BackendStatus(*module.availability())
    except Exception as error:  # a broken driver must not break `import`-time probing
        return BackendStatus(False, f"{module.__name__}.availability() failed: {error!r}")


def available_backends() -> dict[str, BackendStatus]:
    """Every known backend mapped to (usable, reason): what works here and why the others don't."""
    return {name: backend_status(name) for name in BACKENDS}


def choose_backend(requested, device: str, device_text: str) -> str:
    """The backend for arrays living on `device` ("cpu", "cuda" or "rocm").

    `requested` is the backend argument; when it is None, XATTN_BACKEND may name one.
    Raises ValueError when the request is unknown or cannot serve that memory.
    """
    source = "backend"
    if requested is None:
        requested = os.environ.get(ENVIRONMENT_VARIABLE) or None
        source = ENVIRONMENT_VARIABLE
    if requested is None or requested == "auto":
        return _NATURAL_BACKEND[device]
    if not isinstance(requested, str):
        raise TypeError(f"{source}: expected a str or None, got {type(requested).__name__}")
    if requested not in BACKENDS:
        allowed = ", ".join(map(repr, BACKENDS + ("auto",)))
        unset = " or None" if source == "backend" else " (or unset)"
        raise ValueError(f"{source}: expected one of {allowed}{unset}, got {requested!r}")
    if requested != _NATURAL_BACKEND[device]:
        raise ValueError(f"{source}: expected a backend that can serve arrays on "
                         f"{device_text} ({_NATURAL_BACKEND[device]!r}), got {requested!r}; "
                         f"move the arrays, or use xattn.exact_attention for a host-side check")
    return requested


@functools.cache
def gpu_forward(name: str):
    """The forward function of GPU backend `name`, or RuntimeError saying why it is unusable."""
    usable, reason = backend_status(name)
    if not usable:
        raise RuntimeError(f"backend: {name!r} is needed for these arrays but is not usable "
                           f"here: {reason} (pip install '{_EXTRA_FOR[name]}')")
    return importlib.import_module(f"xattn.{name}").forward
