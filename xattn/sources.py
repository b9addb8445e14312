"""Kernel sources, read at run time with importlib.resources.

The wheel carries kernels_cuda/ and kernels_hip/ as xattn/kernels_cuda and xattn/kernels_hip
(pyproject maps them into the package). Run from a source checkout (PYTHONPATH=.), they are
found beside the package instead.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_DIRECTORIES = {"cuda": "kernels_cuda", "hip": "kernels_hip"}
_SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".hip")


def kernel_directory(vendor: str):
    """The directory (a Traversable) holding the kernel sources of `vendor` ("cuda" or "hip")."""
    if not isinstance(vendor, str) or vendor not in _DIRECTORIES:
        raise ValueError(f"vendor: expected 'cuda' or 'hip', got {vendor!r}")
    name = _DIRECTORIES[vendor]
    installed = importlib.resources.files("xattn") / name
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parent.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"no {name}/ directory in the installed package ({installed}) "
                            f"nor in a source checkout ({checkout})")


def kernel_source(vendor: str, name: str) -> str:
    """The text of kernels_<vendor>/<name>, e.g. kernel_source("cuda", "flash_fwd.cu")."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"name: expected a plain file name inside kernels_{vendor}/, got {name!r}")
    source = kernel_directory(vendor) / name
    if not source.is_file():
        raise FileNotFoundError(f"name: no kernel source {name!r} in {kernel_directory(vendor)}")
    return source.read_text(encoding="utf-8")


def kernel_files(vendor: str) -> list[str]:
    """Names of the kernel source files (.cu, .cuh, .h, .hpp, .hip) of `vendor`, sorted."""
    return sorted(entry.name for entry in kernel_directory(vendor).iterdir()
                  if entry.is_file() and entry.name.endswith(_SOURCE_SUFFIXES))
