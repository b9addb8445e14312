"""Kernel cache faults: what xattn.jit does when CuPy's disk cache or run-time compiler fails.

CPU part: a fake `cupy` (installed in sys.modules) that keeps its disk cache the way CuPy does
(cupy/cuda/compiler.py: one file per variant, an md5 of the binary in front of it, written to a
temporary file and moved into place; an entry whose md5 does not match is ignored and recompiled).
It shows that xattn survives each fault and says so once. GPU part (gpu marker): the same faults
against the real CuPy, with a fresh CUPY_CACHE_DIR.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import types
import warnings

import numpy as np
import pytest

import xattn
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

def _cuda_ready():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "cupy is not installed"
    usable, reason = xattn.available_backends()["cuda"]
    return None if usable else f"cuda backend unusable: {reason}"


@pytest.fixture
def fresh_cuda_cache(monkeypatch, tmp_path):
    """Real CuPy, an empty CUPY_CACHE_DIR, and nothing memoized by xattn or CuPy."""
    reason = _cuda_ready()
    if reason:
        pytest.skip(reason)
    from xattn import cuda
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "kernel_cache"))
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    forget_compiled_kernels(monkeypatch)
    monkeypatch.setattr(cuda, "_smem_configured", set())
    return tmp_path / "kernel_cache"


def forget_compiled_kernels(monkeypatch):
    import cupy
    from xattn import cuda
    monkeypatch.setattr(jit, "_modules", {})
    # Kernel objects die with the memo; their ids may be reused, so the shared-memory opt-in
    # record keyed by id must go too.
    monkeypatch.setattr(cuda, "_smem_configured", set())
    clear = getattr(cupy._util, "clear_memo", None) or getattr(cupy, "clear_memo", None)
    if clear is not None:  # CuPy memoizes RawModule compiles per process too
        clear()


def problem(head_dim):
    """CuPy inputs and the oracle's output; CuPy's own cast kernels get compiled here."""
    import cupy
    rng = np.random.default_rng(head_dim)
    q, k, v = (cupy.asarray(rng.standard_normal((1, 2, 77, head_dim))).astype(cupy.float16)
               for _ in range(3))
    want, _ = xattn.exact_attention(q, k, v, causal=True)
    return (q, k, v), want


def check(inputs, want):
    import cupy
    got = cupy.asnumpy(xattn.attention(*inputs, causal=True)).astype(np.float64)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) <= 2e-3 * np.linalg.norm(want)


def cache_warnings_of(caught):
    return [w for w in caught if issubclass(w.category, jit.KernelCacheWarning)]


@pytest.mark.gpu
@pytest.mark.parametrize("damage", ["truncated", "corrupted", "checksummed garbage"])
def test_gpu_a_damaged_cache_entry_is_recompiled(fresh_cuda_cache, monkeypatch, damage):
    inputs, want = problem(64)
    before = set(fresh_cuda_cache.iterdir())
    check(inputs, want)
    entries = [p for p in set(fresh_cuda_cache.iterdir()) - before if p.is_file()]
    assert entries, "CuPy wrote no cache entry for xattn's kernel"
    for entry in entries:  # only xattn's entries: CuPy's own kernels are not under test
        data = entry.read_bytes()
        if damage == "truncated":
            entry.write_bytes(data[: len(data) // 3])
        elif damage == "corrupted":
            middle = len(data) // 2
            entry.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 64])
                              + data[middle + 64:])
        else:  # passes CuPy's md5 check, fails to load
            garbage = b"\x7fELF not really a cubin" * 8
            entry.write_bytes(hashlib.md5(garbage).hexdigest().encode() + garbage)
    forget_compiled_kernels(monkeypatch)  # what a new process would see: this disk cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(inputs, want)
    expected = 1 if damage == "checksummed garbage" else 0
    assert len(cache_warnings_of(caught)) == expected, [str(w.message) for w in caught]


@pytest.mark.gpu
def test_gpu_an_unwritable_cache_directory_falls_back_with_one_warning(fresh_cuda_cache,
                                                                      monkeypatch, tmp_path):
    problems = [problem(head_dim) for head_dim in (64, 128, 32, 96)]  # CuPy's casts, warm
    check(*problems[0])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("CUPY_CACHE_DIR", str(blocker / "kernel_cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for inputs, want in problems[1:]:  # three variants not compiled yet
            check(inputs, want)
    assert len(cache_warnings_of(caught)) == 1, [str(w.message) for w in caught]
