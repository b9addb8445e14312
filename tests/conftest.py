"""Test harness: the `backend` fixture runs every property on every backend.

"reference" always runs. "cuda" carries the gpu marker and is skipped, with the reason shown by
`pytest -ra`, where xattn's cuda backend is not usable (no CuPy, no GPU). Each backend says which
(array library, dtype) pairs it is fed and the tolerance per dtype; inputs are built from float64
NumPy data, so the oracle always sees exactly the values the backend saw.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import xattn

settings.register_profile(
    "default", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# CI replays the same examples each run, so a red CI is reproducible.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# ‖out - ref‖ / ‖ref‖ bounds; the lse is held to the same number (relative and absolute),
# except that attention() returns a float32 lse even for float64 inputs.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
LSE_TOLERANCE = dict(TOLERANCE, float64=1e-6)

HAS_TORCH = importlib.util.find_spec("torch") is not None


@dataclass(frozen=True)
class Backend:
    name: str
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


@pytest.fixture(scope="session", params=[
    pytest.param("reference"),
    pytest.param("cuda", marks=pytest.mark.gpu),
])
def backend(request) -> Backend:
    if request.param == "reference":
        return Backend("reference", _reference_kinds())
    reason = _cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    return Backend("cuda", _cuda_kinds())


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
