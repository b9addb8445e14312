"""Test harness: the `backend` fixture runs every property on every path to the kernels.

Paths: "reference" (NumPy, always runs); "cuda" (the CUDA kernels); "hip" (the HIP kernels on an
AMD GPU); "hip-on-cuda" and "hip-on-cuda-wave64" (the portable HIP kernels compiled by NVRTC
through tests/hip_on_cuda.h and run on an NVIDIA GPU by the hip backend's own launch code; the
backward with the wave32 rows, or with the wave64 rows of GCN/CDNA-without-MFMA). Every GPU path
carries the gpu marker and is skipped, with the reason shown by `pytest -ra`, where it cannot run.
While a test runs on a path, calls of xattn's public functions on GPU arrays go to that path
(Backend.serving). Each path says which (array library, dtype) pairs it is fed; inputs are built
from float64 NumPy data, so the oracle always sees exactly the values the backend saw. The error
bounds are tests/tolerances.py's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import xattn
from tolerances import TOLERANCES

# function_scoped_fixture: _serve_with_the_backend enters the test's path once per test; every
# Hypothesis example of the test runs on that same path, which is what is wanted.
settings.register_profile(
    "default", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
# CI replays the same examples each run, so a red CI is reproducible.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# The rows of tests/tolerances.py that most tests use, under the names they import.
TOLERANCE = TOLERANCES["out"]
LSE_TOLERANCE = TOLERANCES["lse"]

HAS_TORCH = importlib.util.find_spec("torch") is not None


HIP_ON_CUDA = Path(__file__).with_name("hip_on_cuda.h")
WAVE32_TARGET = "gfx1030"  # RDNA: the wave32 rows the portable kernels run with on NVIDIA
WAVE64_TARGET = "gfx906"   # gfx9 without MFMA: the portable kernels' wave64 rows
# path -> (forward target, backward target) of the portable HIP kernels on an NVIDIA GPU. The
# forward target is the decode's too, whose wave-wide shuffles need a real wave of 64: the
# forwards run their wave32 rows here (test_hip_portable.py runs the forward's wave64 rows, a
# "wave" of two warps); the backward needs no wave-wide operation, and both sizes run.
HIP_ON_CUDA_TARGETS = {"hip-on-cuda": (WAVE32_TARGET, WAVE32_TARGET),
                       "hip-on-cuda-wave64": (WAVE32_TARGET, WAVE64_TARGET)}


@dataclass(frozen=True)
class Backend:
    name: str   # the path: "reference", "cuda", "hip", "hip-on-cuda", "hip-on-cuda-wave64"
    kinds: tuple  # (library, dtype) pairs this backend's tests draw from

    @property
    def device(self) -> str:
        return "cpu" if self.name == "reference" else "cuda"

    def make(self, base: np.ndarray, library: str, dtype: str):
        """Convert float64 NumPy data to `library` arrays of `dtype` in this backend's memory."""
        if library == "numpy":
            return base.astype(dtype)
        if library == "torch":
            import torch
            return torch.from_numpy(base).to(device=self.device, dtype=getattr(torch, dtype))
        if library == "cupy":
            import cupy
            if dtype == "bfloat16":
                import ml_dtypes
                return cupy.asarray(base.astype(np.float32)).astype(ml_dtypes.bfloat16)
            return cupy.asarray(base).astype(dtype)
        raise AssertionError(library)

    def serving(self):
        """A context in which xattn's public functions send GPU arrays to this path. Only the
        portable HIP kernels on NVIDIA need one: the hook xattn.hip.on_cuda (see below)."""
        if self.name not in HIP_ON_CUDA_TARGETS:
            return contextlib.nullcontext()
        from xattn import hip
        from test_hip_sources import HIP_ON_CUDA_OPTIONS

        on_cuda = getattr(hip, "on_cuda", None)
        if on_cuda is None:
            pytest.fail("xattn.hip.on_cuda is missing: the hook through which the hip backend "
                        "serves CUDA memory with its portable kernels compiled by NVRTC "
                        "(tests/conftest.py, Backend.serving, describes it)")
        forward_target, backward_target = HIP_ON_CUDA_TARGETS[self.name]
        # The hook's contract: while the context is active, arrays in CUDA memory go to the hip
        # backend instead of the cuda backend -- through xattn.attention, attention_varlen and
        # autograd, and in direct calls of xattn.hip.forward / backward -- which selects the
        # table rows of forward_target for forwards and backward_target for backwards, and
        # compiles its kernels with CuPy's NVRTC from `prefix` followed by the preprocessed HIP
        # source, with `options` (MFMA rows cannot run there and raise ValueError); the launch
        # layer opts in to more than 48 KB of shared memory as CUDA requires.
        return on_cuda(prefix=HIP_ON_CUDA.read_text(), options=tuple(HIP_ON_CUDA_OPTIONS),
                       forward_target=forward_target, backward_target=backward_target)

    def forward_into(self, q, k, v, out, lse, *, causal: bool, scale: float) -> None:
        """This path's forward, called directly on (B, H, S, D) arrays, writing out and lse in
        place (the one adapter to the backends' launch signatures, for tests that poison the
        outputs first)."""
        if self.name == "reference":
            from xattn import reference
            reference.forward(q, k, v, causal=causal, scale=scale, out=out, lse=lse)
            return
        module = _gpu_module(self.name)
        module.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=_stream(q))

    def backward_into(self, q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool,
                      scale: float, deterministic: bool = False) -> None:
        """This path's backward, called directly, writing dq, dk, dv in place."""
        if self.name == "reference":
            from xattn import reference
            reference.backward(q, k, v, out, dout, lse, causal=causal, scale=scale, dq=dq, dk=dk,
                               dv=dv)
            return
        module = _gpu_module(self.name)
        module.backward(q, k, v, out, dout, lse, dq, dk, dv, causal=causal, scale=scale,
                        deterministic=deterministic, stream=_stream(q))


def _gpu_module(name: str):
    import importlib
    return importlib.import_module("xattn.cuda" if name == "cuda" else "xattn.hip")


def _stream(array) -> int:
    """The stream the array's library computes on (torch's current, or CuPy's)."""
    if type(array).__module__.startswith("torch"):
        import torch
        return torch.cuda.current_stream(array.device).cuda_stream
    import cupy
    return cupy.cuda.get_current_stream().ptr


def to_float64(x) -> np.ndarray:
    """Any test array (numpy, torch, cupy) as float64 NumPy on the host (synchronizes)."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    if type(x).__module__.startswith("torch"):
        return x.detach().double().cpu().numpy()
    return x.astype("float64").get()  # cupy


def permute(x, axes):
    return x.permute(*axes) if type(x).__module__.startswith("torch") else x.transpose(axes)


def _reference_kinds():
    kinds = [("numpy", "float64"), ("numpy", "float32"), ("numpy", "float16")]
    if HAS_TORCH:
        kinds += [("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16")]
    return tuple(kinds)


def _cuda_kinds():
    kinds = []
    if HAS_TORCH:
        import torch
        if torch.cuda.is_available():
            kinds += [("torch", d) for d in ("float16", "bfloat16", "float32")]
    kinds += [("cupy", "float16"), ("cupy", "float32")]
    if importlib.util.find_spec("ml_dtypes") is not None:
        kinds.append(("cupy", "bfloat16"))
    return tuple(kinds)


def _cuda_skip_reason():
    if importlib.util.find_spec("cupy") is None:
        return "cuda backend: cupy is not installed"
    usable, reason = xattn.available_backends()["cuda"]
    return None if usable else f"cuda backend unusable: {reason}"


def _hip_skip_reason():
    usable, reason = xattn.available_backends()["hip"]
    return None if usable else f"hip backend unusable: {reason}"


def _hip_on_cuda_skip_reason():
    reason = _cuda_skip_reason()
    return reason and f"portable HIP kernels on NVIDIA: {reason}"


_SKIP_REASON = {"cuda": _cuda_skip_reason, "hip": _hip_skip_reason,
                "hip-on-cuda": _hip_on_cuda_skip_reason,
                "hip-on-cuda-wave64": _hip_on_cuda_skip_reason}


@pytest.fixture(scope="session", params=[
    pytest.param("reference"),
    *(pytest.param(name, marks=pytest.mark.gpu) for name in _SKIP_REASON),
])
def backend(request) -> Backend:
    if request.param == "reference":
        return Backend("reference", _reference_kinds())
    reason = _SKIP_REASON[request.param]()
    if reason:
        pytest.skip(reason)
    return Backend(request.param, _cuda_kinds())


@pytest.fixture(autouse=True)
def _serve_with_the_backend(request):
    """A test that takes `backend` runs with xattn's GPU calls sent to that path."""
    if "backend" not in request.fixturenames:
        yield
        return
    with request.getfixturevalue("backend").serving():
        yield


@pytest.fixture(scope="session")
def cuda_backend() -> Backend:
    """For GPU-only tests (direct kernel calls, streams)."""
    reason = _cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    return Backend("cuda", _cuda_kinds())


def finite_difference_grads(loss, inputs, step=1e-6):
    """Central differences of the scalar loss(*inputs) with respect to every element of each input."""
    grads = []
    for which, x in enumerate(inputs):
        numeric = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            plus, minus = [y.copy() for y in inputs], [y.copy() for y in inputs]
            plus[which][index] += step
            minus[which][index] -= step
            numeric[index] = (loss(*plus) - loss(*minus)) / (2 * step)
        grads.append(numeric)
    return grads


@pytest.fixture
def stand_in_cupy(monkeypatch):
    """A CuPy stand-in for launcher tests on the CPU: `cupy.cuda.Device` becomes a no-op context
    manager and the runtime says "ROCm, device 0", so a launcher runs its arithmetic without a GPU
    (the driver launch itself: `stand_in_launches`)."""
    import sys

    class Device:  # cupy.cuda.Device as a context manager
        def __init__(self, *_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(Device=Device,
                                      runtime=types.SimpleNamespace(is_hip=True, getDevice=lambda: 0))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


class Launched(NamedTuple):
    """One launch the stand-in driver received: the entry point compile() was asked for (its
    kernels.Kernel), its defines, the grid and block, the dynamic shared memory, the stream, and
    the parameter block as the driver would copy it (its bytes at the argument's address, read at
    the launch)."""
    kernel: object
    defines: dict
    grid: tuple
    threads: int
    smem: int
    stream: int
    block: np.ndarray


class StandInLaunches:
    """Stand-ins for the compiled kernels (compile(kernel, defines, device), as the hip launchers
    and kernels.Kernel.launch take it) and for the driver's launchKernel, which records every
    launch (`launches`)."""

    def __init__(self):
        self.kernels: dict = {}
        self.launches: list[Launched] = []

    def compile(self, kernel, defines, device):
        handle = 0x1000 + len(self.kernels)  # a kernel's driver handle, unique per compile
        self.kernels[handle] = (kernel, defines)
        return types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=handle))

    def launchKernel(self, handle, gx, gy, gz, bx, by, bz, smem, stream, args_ptr, extra):
        import ctypes

        kernel, defines = self.kernels[handle]
        address = ctypes.c_uint64.from_address(args_ptr).value  # kernelParams[0]: the block
        block = np.frombuffer(ctypes.string_at(address, kernel.params.itemsize),
                              dtype=kernel.params).copy()
        assert (by, bz, extra) == (1, 1, 0)
        self.launches.append(Launched(kernel, defines, (gx, gy, gz), bx, smem, stream, block))


@pytest.fixture
def stand_in_launches(stand_in_cupy, monkeypatch):
    """StandInLaunches in place of the driver (xattn.launch._driver); each launch's block is read
    as the parameter block its entry point takes (kernels.Kernel.params)."""
    from xattn import launch

    recorder = StandInLaunches()
    monkeypatch.setattr(launch, "_driver", lambda: recorder)
    return recorder

