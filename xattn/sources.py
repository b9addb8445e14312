"""Kernel sources, read at run time with importlib.resources.

The wheel carries kernels_common/ (vendor-neutral headers), kernels_cuda/ and kernels_hip/ as
xattn/kernels_common, xattn/kernels_cuda and xattn/kernels_hip (pyproject maps them into the
package). Run from a source checkout (PYTHONPATH=.), they are
found beside the package instead.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_DIRECTORIES = {"common": "kernels_common", "cuda": "kernels_cuda", "hip": "kernels_hip"}
_SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".hip")


def kernel_directory(vendor: str):
    """The directory (a Traversable) holding the kernel sources of `vendor` ("cuda", "hip", or
    "common" for the vendor-neutral headers)."""
    if not isinstance(vendor, str) or vendor not in _DIRECTORIES:
        raise ValueError(f"vendor: expected 'cuda', 'hip' or 'common', got {vendor!r}")
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
    """The text of kernels_<vendor>/<name>, e.g. kernel_source("cuda", "flash_fwd.cu") or
    kernel_source("cuda", "sm90/flash_fwd.cu") (one folder level inside a vendor's directory)."""
    parts = name.split("/") if isinstance(name, str) else []
    if (not 1 <= len(parts) <= 2 or "\\" in name
            or any(not part or part.startswith(".") for part in parts)):
        raise ValueError(f"name: expected a file name inside kernels_{vendor}/ (or one folder "
                         f"below it), got {name!r}")
    source = kernel_directory(vendor)
    for part in parts:
        source = source / part
    if not source.is_file():
        raise FileNotFoundError(f"name: no kernel source {name!r} in {kernel_directory(vendor)}")
    return source.read_text(encoding="utf-8")


def kernel_files(vendor: str) -> list[str]:
    """Names of the kernel source files (.cu, .cuh, .h, .hpp, .hip) of `vendor`, sorted; files of a
    folder below it as "folder/name"."""
    names = []
    for entry in kernel_directory(vendor).iterdir():
        inner = entry.iterdir() if entry.is_dir() else ()
        names += [f"{entry.name}/{e.name}" for e in inner if e.is_file()
                  and e.name.endswith(_SOURCE_SUFFIXES)]
        if entry.is_file() and entry.name.endswith(_SOURCE_SUFFIXES):
            names.append(entry.name)
    return sorted(names)
