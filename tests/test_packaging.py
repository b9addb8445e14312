"""The wheel carries the kernel sources and they load from an installed package.

Builds the wheel from a copy of the source tree (the build leaves nothing in the checkout),
installs it into a fresh virtual environment and reads every kernel source back through
importlib.resources, from a directory where the checkout is not importable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".hip")
TREE = ("pyproject.toml", "README.md", "xattn", "kernels_cuda", "kernels_hip")


def run(*command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory):
    """The interpreter of a fresh venv with only the built wheel (and NumPy) installed."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for name in TREE:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy2(path, source / name)
    run(sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q",
        "-w", str(work / "dist"))
    wheels = list((work / "dist").glob("xattn-*.whl"))
    assert len(wheels) == 1, wheels

    # --system-site-packages keeps this fast where the base Python has NumPy; otherwise pip
    # installs it. The wheel itself goes in without an index: only what was just built.
    run(sys.executable, "-m", "venv", "--system-site-packages", str(work / "venv"))
    python = str(work / "venv" / "bin" / "python")
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0]))
    if subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode:
        run(python, "-m", "pip", "install", "-q", "numpy")
    return python, work


def test_wheel_carries_and_loads_kernel_sources(installed_python):
    # Sources may sit one folder down (kernels_cuda/sm90/); kernel_files names them by their
    # path inside the vendor folder.
    expected = {vendor: {path.relative_to(ROOT / f"kernels_{vendor}").as_posix():
                         path.read_text(encoding="utf-8")
                         for path in sorted((ROOT / f"kernels_{vendor}").rglob("*"))
                         if path.suffix in SOURCE_SUFFIXES}
                for vendor in ("cuda", "hip")}
    assert all(expected.values()), {vendor: len(files) for vendor, files in expected.items()}
    python, work = installed_python
    check = textwrap.dedent("""
        import importlib.resources, json, sys
        import xattn
        package = importlib.resources.files("xattn")
        assert "site-packages" in str(package), package   # the installed copy, not the checkout
        loaded = {}
        for vendor in sys.argv[1:]:
            folder = package / f"kernels_{vendor}"
            assert folder.is_dir(), folder
            loaded[vendor] = {name: xattn.kernel_source(vendor, name)
                              for name in xattn.kernel_files(vendor)}
            for name, text in loaded[vendor].items():
                assert text == (folder / name).read_text(encoding="utf-8")
        json.dump(loaded, sys.stdout)
    """)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    loaded = json.loads(run(python, "-c", check, *expected, cwd=work, env=environment))
    assert loaded == expected


def test_installed_package_runs_the_reference_backend(installed_python):
    python, work = installed_python
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    output = run(python, "-m", "xattn", "demo", cwd=work, env=environment)
    assert "ok" in output
