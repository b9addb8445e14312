"""`python -m xattn precompile`: compile the common kernel variants ahead of the first real call.

A variant is (dtype, head dim, causal) on the present GPU. Each one is compiled by running one
tiny attention call through the public API — forward, and through torch autograd the backward —
so exactly the kernels that a real call of that variant would pick (xattn.configs.select and
defines, xattn.jit.get_function) are compiled, memoized in this process and written to CuPy's
disk cache, which later processes load in a fraction of the compile time. Nothing here chooses
kernels itself. The selection does not depend on the sequence length or the number of heads,
only on dtype, head dim, causal, the device and whether rows are 16-byte aligned (they are for
head dims that are multiples of 8 in contiguous tensors, which is what training uses).

Backward kernels are reached only through torch (gradients are a torch feature); without torch,
only the forward kernels are compiled, on CuPy arrays.

`first_compile_and_warm_load` measures, for `python -m xattn info`, how long one variant takes
to compile from nothing and to load from the disk cache, in two fresh processes sharing an
empty temporary cache directory, so that neither figure is flattered by an earlier run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from xattn import backends
from xattn.api import MAX_HEAD_DIM

__all__ = ["MAX_HEAD_DIM", "Variant", "variants", "precompile", "first_compile_and_warm_load"]

DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_DTYPES = ("bfloat16", "float16")
DEFAULT_HEAD_DIMS = (64, 128)
# The sequence length of the tiny calls: long enough to look like real work, short enough to
# cost nothing next to a compile. It does not change which kernels are picked.
SEQLEN = 128


class Variant(NamedTuple):
    dtype: str
    head_dim: int
    causal: bool

    def label(self) -> str:
        return f"{self.dtype} D={self.head_dim} {'causal' if self.causal else 'full'}"


def variants(dtypes, head_dims, causal_flags) -> list[Variant]:
    """Every combination, in a stable order, without repeats."""
    seen: dict[Variant, None] = {}
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in causal_flags:
                seen[Variant(dtype, int(head_dim), bool(causal))] = None
    return list(seen)


def gpu_backend() -> tuple[str | None, str]:
    """(name of the usable GPU backend or None, a sentence saying what was found)."""
    reasons = []
    for name in ("cuda", "hip"):
        status = backends.backend_status(name)
        if status.usable:
            return name, status.reason
        reasons.append(f"{name}: {status.reason}")
    return None, "; ".join(reasons)


def _torch_gpu():
    """torch, when it is installed and sees a GPU (CUDA or ROCm); else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def compile_variant(variant: Variant, backend: str, *, backward: bool, deterministic: bool) -> None:
    """Compile one variant by running it once (forward, and backward when asked and possible)."""
    import xattn

    torch = _torch_gpu()
    shape = (1, 1, SEQLEN, variant.head_dim)
    if torch is not None:
        q, k, v = (torch.randn(shape, device="cuda", dtype=getattr(torch, variant.dtype),
                               requires_grad=backward) for _ in range(3))
        out = xattn.attention(q, k, v, causal=variant.causal, backend=backend,
                              deterministic=deterministic)
        if backward:
            out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        return
    import cupy

    if variant.dtype == "bfloat16":
        import ml_dtypes  # CuPy holds bfloat16 through ml_dtypes (in the cuda extras)

        dtype = ml_dtypes.bfloat16
    else:
        dtype = variant.dtype
    q, k, v = (cupy.ones(shape, dtype=cupy.float32).astype(dtype) for _ in range(3))
    xattn.attention(q, k, v, causal=variant.causal, backend=backend)
    cupy.cuda.get_current_stream().synchronize()


def _progress(items, enabled: bool):
    """A tqdm bar over items when enabled (stdout is a terminal), else items as they are."""
    if not enabled:
        return items, None
    from tqdm import tqdm

    bar = tqdm(items, unit="variant", desc="compiling", file=sys.stdout, dynamic_ncols=True)
    return bar, bar


def precompile(variant_list, *, backward: bool = True, deterministic: bool = False,
               progress: bool | None = None, out=None) -> int:
    """Compile every variant in variant_list on the present GPU. Returns an exit status."""
    out = sys.stdout if out is None else out
    backend, why = gpu_backend()
    if backend is None:
        print(f"xattn precompile: no usable GPU backend here, nothing to compile ({why})",
              file=sys.stderr)
        return 2
    torch = _torch_gpu()
    if backward and torch is None:
        print("xattn precompile: torch with GPU support is not installed: compiling forward "
              "kernels only (backward kernels serve torch autograd)", file=sys.stderr)
        backward = False
    if backward and backend == "hip":
        backward = False  # the hip backend has no backward kernels in this version
    if progress is None:
        progress = sys.stdout.isatty()

    from xattn import jit

    before = len(jit._modules)
    started = time.perf_counter()
    items, bar = _progress(variant_list, progress)
    failures = []
    for variant in items:
        if bar is not None:
            bar.set_postfix_str(variant.label())
        try:
            compile_variant(variant, backend, backward=backward, deterministic=deterministic)
        except Exception as error:  # e.g. a head dim this device has no kernel for
            failures.append(f"{variant.label()}: {type(error).__name__}: {error}")
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    what = "forward and backward" if backward else "forward"
    print(f"xattn precompile: {len(variant_list) - len(failures)} of {len(variant_list)} "
          f"variants ({what}{', deterministic' if deterministic else ''}) ready on {backend}, "
          f"{len(jit._modules) - before} kernels newly loaded, {elapsed:.1f} s; "
          f"cache: {jit.cache_location()}", file=out)
    for failure in failures:
        print(f"  failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


# ----------------------------------------------------------------------- timing for `info`

TIMED_VARIANT = Variant("float16", 64, False)

_CHILD = """
import json, sys, time
import cupy, xattn
q, k, v = (cupy.ones((1, 1, 128, {d}), dtype=cupy.{dtype}) for _ in range(3))
cupy.cuda.get_current_stream().synchronize()    # CUDA context and allocator are up: not timed
started = time.perf_counter()
xattn.attention(q, k, v, causal={causal}, backend={backend!r})
cupy.cuda.get_current_stream().synchronize()
first = time.perf_counter() - started
started = time.perf_counter()
xattn.attention(q, k, v, causal={causal}, backend={backend!r})
cupy.cuda.get_current_stream().synchronize()
json.dump({{"first_call_s": first, "second_call_s": time.perf_counter() - started}}, sys.stdout)
"""


def first_compile_and_warm_load(backend: str, variant: Variant = TIMED_VARIANT,
                                timeout: float = 300) -> dict:
    """Seconds of the first forward call of `variant` in a fresh process with an empty kernel
    cache (NVRTC/hiprtc compile) and in a second fresh process that finds it in that disk cache.
    The second call of each process (kernel memoized) is reported too, as the floor."""
    code = _CHILD.format(d=variant.head_dim, dtype=variant.dtype, causal=variant.causal,
                         backend=backend)
    with tempfile.TemporaryDirectory(prefix="xattn-info-cache-") as cache:
        env = dict(os.environ, CUPY_CACHE_DIR=cache)
        env.pop("CUPY_CACHE_IN_MEMORY", None)
        runs = []
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                  text=True, timeout=timeout)
            if done.returncode:
                raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                                   else f"exit status {done.returncode}")
            runs.append(json.loads(done.stdout))
    return {"variant": variant.label(), "first_compile_s": runs[0]["first_call_s"],
            "warm_load_s": runs[1]["first_call_s"], "memoized_s": runs[1]["second_call_s"]}
