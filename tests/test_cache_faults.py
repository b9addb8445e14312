"""Kernel cache faults: what xattn.jit does when CuPy's disk cache or run-time compiler fails.

CPU part: a fake `cupy` (installed in sys.modules) that keeps its disk cache the way CuPy does
(cupy/cuda/compiler.py: one file per variant, an md5 of the binary in front of it, written to a
temporary file and moved into place; an entry whose md5 does not match is ignored and recompiled).
It shows that xattn survives each fault and says so once. GPU part (gpu marker): the same faults
against the real CuPy, each scenario in fresh child processes started with its CUPY_CACHE_DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import xattn
from tolerances import TOLERANCES
from xattn import jit

GOOD_BINARY = b"CUBIN"  # what a loadable fake binary starts with


class FakeCompileException(Exception):
    pass


class FakeDriverError(RuntimeError):
    pass


class FakeCupy(types.ModuleType):
    """Just what jit.get_function touches: cuda.Device, RawModule, the two exception classes."""

    def __init__(self):
        super().__init__("cupy")
        self.compiles = 0  # NVRTC runs
        self.fail_with = None  # an exception every compile raises, when set
        fake = self

        class Device:
            def __init__(self, device_id):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class RawModule:
            def __init__(self, *, code, options):
                self.binary = fake._load_or_compile(code, options)

            def get_function(self, entry):
                return types.SimpleNamespace(entry=entry, binary=self.binary, compile=lambda: None)

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(
            Device=Device,
            compiler=types.SimpleNamespace(CompileException=FakeCompileException),
            driver=types.SimpleNamespace(CUDADriverError=FakeDriverError))

    def _compile(self, code, options):
        self.compiles += 1
        if self.fail_with is not None:
            raise self.fail_with
        return GOOD_BINARY + hashlib.sha256((code + str(options)).encode()).digest()

    def _load_or_compile(self, code, options):
        if os.environ.get("CUPY_CACHE_IN_MEMORY") == "1":
            return self._load(self._compile(code, options))
        directory = os.environ["CUPY_CACHE_DIR"]
        os.makedirs(directory, exist_ok=True)  # OSError where it cannot be made
        path = os.path.join(directory, hashlib.md5((code + str(options)).encode()).hexdigest()
                            + "_2.cubin")
        if os.path.exists(path):
            with open(path, "rb") as file:
                data = file.read()
            if len(data) >= 32 and data[:32] == hashlib.md5(data[32:]).hexdigest().encode():
                return self._load(data[32:])
        binary = self._compile(code, options)
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as temporary:
            temporary.write(hashlib.md5(binary).hexdigest().encode() + binary)
        os.replace(temporary.name, path)
        return self._load(binary)

    @staticmethod
    def _load(binary):
        if not binary.startswith(GOOD_BINARY):
            raise FakeDriverError("CUDA_ERROR_INVALID_IMAGE: device kernel image is invalid")
        return binary


@pytest.fixture
def fake_cupy(monkeypatch, tmp_path):
    fake = FakeCupy()
    monkeypatch.setitem(__import__("sys").modules, "cupy", fake)
    monkeypatch.setattr(jit, "_modules", {})
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "kernel_cache"))
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)  # restored after the test
    return fake


def compile_variant(block=64, vendor="cuda"):
    source = "flash_fwd.cu" if vendor == "cuda" else "flash_fwd_mfma.hip"
    return jit.get_function(vendor, source, "flash_fwd", {"BLOCK_M": block}, 0)


def new_process():
    """What a new process sees: nothing memoized, the disk cache as it is."""
    jit._modules.clear()


def cache_files(fake_dir):
    return sorted(p for p in fake_dir.iterdir() if p.suffix == ".cubin")


def test_a_warm_disk_cache_is_used(fake_cupy, tmp_path, recwarn):
    compile_variant()
    new_process()
    compile_variant()
    assert fake_cupy.compiles == 1
    assert not recwarn.list


@pytest.mark.parametrize("damage", ["truncated", "empty", "corrupted"])
def test_a_damaged_entry_is_recompiled_silently(fake_cupy, tmp_path, damage, recwarn):
    compile_variant()
    (entry,) = cache_files(tmp_path / "kernel_cache")
    data = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        entry.write_bytes(data[:40] + bytes(b ^ 0xFF for b in data[40:50]) + data[50:])
    new_process()
    kernel = compile_variant()
    assert kernel.binary.startswith(GOOD_BINARY)
    assert fake_cupy.compiles == 2
    assert entry.read_bytes() == data, "the entry is rewritten whole"
    assert not recwarn.list


def test_an_entry_that_passes_the_checksum_but_does_not_load_is_recompiled_once(
        fake_cupy, tmp_path):
    compile_variant()
    (entry,) = cache_files(tmp_path / "kernel_cache")
    garbage = b"not a cubin at all"
    entry.write_bytes(hashlib.md5(garbage).hexdigest().encode() + garbage)
    new_process()
    with pytest.warns(jit.KernelCacheWarning, match="kernel_cache failed .*INVALID_IMAGE"):
        kernel = compile_variant()
    assert kernel.binary.startswith(GOOD_BINARY)
    assert os.environ["CUPY_CACHE_IN_MEMORY"] == "1"


def test_an_unwritable_cache_directory_falls_back_to_memory_with_one_warning(
        fake_cupy, monkeypatch, tmp_path):
    # A directory below a regular file cannot be created, even by root (chmod would not do).
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("CUPY_CACHE_DIR", str(blocker / "kernel_cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = [compile_variant(block) for block in (16, 32, 64, 16, 32)]
    cache_warnings = [w for w in caught if issubclass(w.category, jit.KernelCacheWarning)]
    assert len(cache_warnings) == 1, [str(w.message) for w in caught]
    message = str(cache_warnings[0].message)
    assert str(blocker / "kernel_cache") in message and "CUPY_CACHE_IN_MEMORY=1" in message
    assert all(k.binary.startswith(GOOD_BINARY) for k in kernels)
    assert fake_cupy.compiles == 3  # three variants, each compiled once, in memory
    assert kernels[0] is kernels[3]


@pytest.mark.parametrize("vendor, library, words", [
    ("cuda", "libnvrtc.so.13", ["NVRTC", "pip install nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12",
                                "libnvrtc.so.13"]),
    ("hip", "libhiprtc.so.7", ["hiprtc", "apt install hiprtc", "libhiprtc.so.7"]),
])
def test_a_missing_run_time_compiler_names_the_package_to_install(fake_cupy, vendor, library,
                                                                  words):
    # The text CuPy raises when it cannot dlopen its compiler library.
    fake_cupy.fail_with = RuntimeError(f"CuPy failed to load {library}: OSError: {library}: "
                                       f"cannot open shared object file: No such file or directory")
    with pytest.raises(jit.CompilerNotFound) as caught:
        compile_variant(vendor=vendor)
    for word in words:
        assert word in str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert fake_cupy.compiles == 1, "no retry: the compiler is missing, not the cache"


def test_a_compile_error_propagates_unchanged(fake_cupy, recwarn):
    error = FakeCompileException("kernels_cuda/flash_fwd.cu(10): error: nvrtc says no")
    fake_cupy.fail_with = error
    with pytest.raises(FakeCompileException) as caught:
        compile_variant()
    assert caught.value is error
    assert fake_cupy.compiles == 1 and not recwarn.list


def test_a_fault_that_survives_the_retry_propagates(fake_cupy, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("CUPY_CACHE_DIR", str(blocker / "kernel_cache"))
    fake_cupy.fail_with = FakeDriverError("CUDA_ERROR_OUT_OF_MEMORY: out of memory")
    with pytest.warns(jit.KernelCacheWarning), pytest.raises(FakeDriverError, match="OUT_OF"):
        compile_variant()
    assert fake_cupy.compiles == 1  # the first try failed in makedirs, the retry in compile
    with pytest.raises(FakeDriverError):  # in memory now: no second warning, no retry
        compile_variant()
    assert fake_cupy.compiles == 2


def test_other_errors_are_not_retried(fake_cupy, recwarn):
    fake_cupy.fail_with = ValueError("something else")
    with pytest.raises(ValueError, match="something else"):
        compile_variant()
    assert fake_cupy.compiles == 1 and not recwarn.list


# ------------------------------------------------------------------------------------- GPU
#
# Each scenario runs in fresh Python processes whose environment sets CUPY_CACHE_DIR (and leaves
# CUPY_CACHE_IN_MEMORY unset) from the start, as a user's would: CuPy 14 reads CUPY_CACHE_DIR once,
# when it is imported, and keeps compiled modules per process, so changing it inside a running
# process proves nothing. The child (CHILD below) runs xattn.attention on CuPy arrays, checks it
# against xattn.exact_attention and prints a JSON report on its last stdout line.

CHILD = r"""
import json, os, sys, warnings

head_dims = json.loads(sys.argv[1])
cache_dir = os.environ["CUPY_CACHE_DIR"]  # as given: xattn may point CuPy elsewhere


def entries():
    try:
        return {name for name in os.listdir(cache_dir) if name.endswith(".cubin")}
    except OSError:  # not made yet, or cannot be
        return set()


report = {"results": [], "new_entries": []}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import numpy as np
    import xattn
    from xattn import jit
    # xattn first, as a user of torch tensors would: it imports CuPy for the cuda backend.
    usable, reason = xattn.available_backends()["cuda"]
    if not usable:
        sys.exit(f"cuda backend unusable in the child: {reason}")
    import cupy
    for head_dim in head_dims:
        rng = np.random.default_rng(head_dim)
        host = [rng.standard_normal((1, 2, 77, head_dim)).astype(np.float16) for _ in range(3)]
        want, _ = xattn.exact_attention(*host, causal=True)  # on the host: no CuPy kernels
        inputs = [cupy.asarray(a) for a in host]  # copies only: no CuPy kernels either
        before = entries()
        got = cupy.asnumpy(xattn.attention(*inputs, causal=True)).astype(np.float64)
        report["new_entries"] += sorted(entries() - before)  # xattn's kernels alone
        report["results"].append({
            "head_dim": head_dim, "finite": bool(np.isfinite(got).all()),
            "relative_error": float(np.linalg.norm(got - want) / np.linalg.norm(want))})
report["kernel_cache_warnings"] = [str(w.message) for w in caught
                                   if issubclass(w.category, jit.KernelCacheWarning)]
report["other_warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught
                            if not issubclass(w.category, jit.KernelCacheWarning)]
report["cache_in_memory"] = os.environ.get("CUPY_CACHE_IN_MEMORY")
report["cupy"] = cupy.__version__
print("XATTN-CHILD-REPORT " + json.dumps(report), flush=True)
"""

CHILD_TIMEOUT_S = 900  # NVRTC compiles a few flash variants from scratch
TOLERANCE_FP16 = TOLERANCES["out"]["float16"]


def _cuda_ready():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "cupy is not installed"
    usable, reason = xattn.available_backends()["cuda"]
    return None if usable else f"cuda backend unusable: {reason}"


@pytest.fixture
def cuda_child(tmp_path):
    """run(cache_dir, head_dims) -> the report of a fresh process with CUPY_CACHE_DIR=cache_dir."""
    reason = _cuda_ready()
    if reason:
        pytest.skip(reason)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root = str(Path(xattn.__file__).resolve().parents[1])  # the xattn under test
    runs = []

    def run(cache_dir, head_dims):
        env = {k: v for k, v in os.environ.items()
               if k not in ("CUPY_CACHE_IN_MEMORY", "CUPY_CACHE_SAVE_CUDA_SOURCE", "XATTN_BACKEND")}
        env["CUPY_CACHE_DIR"] = str(cache_dir)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        runs.append(len(runs) + 1)
        what = f"child {runs[-1]} (CUPY_CACHE_DIR={cache_dir}, head dims {head_dims})"
        try:
            done = subprocess.run([sys.executable, str(script), json.dumps(list(head_dims))],
                                  cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"{what} ran past {CHILD_TIMEOUT_S} s\n--- stdout\n{_text(error.stdout)}"
                        f"\n--- stderr\n{_text(error.stderr)}", pytrace=False)
        lines = [line for line in done.stdout.splitlines()
                 if line.startswith("XATTN-CHILD-REPORT ")]
        if done.returncode != 0 or not lines:
            pytest.fail(f"{what} failed with exit status {done.returncode}\n--- stdout\n"
                        f"{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-8000:]}", pytrace=False)
        report = json.loads(lines[-1].removeprefix("XATTN-CHILD-REPORT "))
        report["stderr"] = done.stderr[-4000:]
        for result in report["results"]:
            assert result["finite"] and result["relative_error"] <= TOLERANCE_FP16, (what, report)
        return report

    return run


def _text(output):
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _checksum_scheme(data):
    """How CuPy checksummed this cache entry: (algorithm, hex length) or None for no match.
    CuPy 14 writes a SHA-1 hex digest in front of the binary, earlier versions an MD5 one."""
    for algorithm, length in (("sha1", 40), ("md5", 32)):
        digest = hashlib.new(algorithm, data[length:], usedforsecurity=False).hexdigest()
        if data[:length] == digest.encode():
            return algorithm, length
    return None


def _damage(entry, damage):
    data = entry.read_bytes()
    scheme = _checksum_scheme(data)
    assert scheme, f"{entry.name}: not a checksummed CuPy cache entry ({data[:48]!r})"
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 3])
    elif damage == "corrupted":
        middle = len(data) // 2
        entry.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 64])
                          + data[middle + 64:])
    else:  # passes CuPy's checksum, fails to load
        garbage = b"\x7fELF not really a cubin" * 8
        algorithm, _ = scheme
        entry.write_bytes(hashlib.new(algorithm, garbage, usedforsecurity=False).hexdigest()
                          .encode() + garbage)


@pytest.mark.gpu
@pytest.mark.parametrize("damage", ["truncated", "corrupted", "checksummed garbage"])
def test_gpu_a_damaged_cache_entry_is_recompiled(cuda_child, tmp_path, damage):
    cache = tmp_path / "kernel_cache"
    first = cuda_child(cache, [64])
    assert not first["kernel_cache_warnings"], first
    listing = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else "no directory"
    assert first["new_entries"], f"CuPy wrote no cache entry for xattn's kernel: {listing}"
    entries = [cache / name for name in first["new_entries"]]
    for entry in entries:  # only xattn's entries: CuPy's own kernels are not under test
        _damage(entry, damage)

    second = cuda_child(cache, [64])  # a new process, this disk cache
    warned = second["kernel_cache_warnings"]
    if damage == "checksummed garbage":
        # The entry loads and fails (CUDADriverError): jit warns once, goes in memory, retries.
        assert len(warned) == 1, second
        assert str(cache) in warned[0] and "CUPY_CACHE_IN_MEMORY=1" in warned[0], second
        assert second["cache_in_memory"] == "1", second
    else:
        # CuPy's checksum catches it: recompiled and rewritten by CuPy, nothing for jit to do.
        assert warned == [], second
        assert second["cache_in_memory"] is None, second
        for entry in entries:
            assert _checksum_scheme(entry.read_bytes()), f"{entry.name} was not rewritten whole"


@pytest.mark.gpu
def test_gpu_an_unwritable_cache_directory_falls_back_with_one_warning(cuda_child, tmp_path):
    # A directory below a regular file cannot be made, even by root (chmod would not do). With
    # CuPy 14 that fails `import cupy` itself; xattn.jit catches it before the import.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cache = blocker / "kernel_cache"
    report = cuda_child(cache, [64, 128, 32, 64])  # three variants, the first one again
    warned = report["kernel_cache_warnings"]
    assert len(warned) == 1, report
    assert str(cache) in warned[0] and "CUPY_CACHE_IN_MEMORY=1" in warned[0], report
    assert report["cache_in_memory"] == "1", report
    assert len(report["results"]) == 4 and report["new_entries"] == [], report
    assert blocker.read_text() == ""


def test_a_cache_directory_that_cannot_be_made_does_not_fail_the_cupy_import(tmp_path):
    # CuPy 14 makes CUPY_CACHE_DIR when it is imported (cupy.cuda.compiler); a fake that does the
    # same, in a fresh process whose environment names a directory below a regular file.
    fake = tmp_path / "site" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os\nos.makedirs(os.environ['CUPY_CACHE_DIR'], exist_ok=True)\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    root = str(Path(xattn.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "CUPY_CACHE_IN_MEMORY"}
    env.update(CUPY_CACHE_DIR=str(blocker / "kernel_cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), root]))
    code = ("import json, os, warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from xattn import jit\n"
            "    import cupy\n"
            "print(json.dumps([[str(w.message) for w in caught\n"
            "                   if issubclass(w.category, jit.KernelCacheWarning)],\n"
            "                  os.environ.get('CUPY_CACHE_IN_MEMORY'),\n"
            "                  os.path.isdir(os.environ['CUPY_CACHE_DIR'])]))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warned, in_memory, stand_in_made = json.loads(done.stdout.splitlines()[-1])
    assert len(warned) == 1 and str(blocker / "kernel_cache") in warned[0], warned
    assert in_memory == "1" and stand_in_made
