"""Command line: python -m xattn {info, demo, bench}.

  info   platform, library versions, backends (and why any is unusable), device, compiler,
         kernel cache
  demo   attention on the best backend present, checked against the float64 oracle
  bench  xattn against its peers on the GPU (xattn.bench)
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

import numpy as np

import xattn
from xattn import backends


def _version(module_name: str) -> str:
    try:
        return importlib.import_module(module_name).__version__
    except ImportError:
        return "not installed"
    except Exception as error:  # a broken install should show up, not crash `info`
        return f"unusable ({error!r})"


def info() -> int:
    lines = {
        "xattn": f"{xattn.__version__} ({os.path.dirname(xattn.__file__)})",
        "platform": f"{platform.platform()}, Python {platform.python_version()}",
        "numpy": np.__version__,
        "torch": _version("torch"),
        "cupy": _version("cupy"),
        backends.ENVIRONMENT_VARIABLE: os.environ.get(backends.ENVIRONMENT_VARIABLE, "(unset)"),
    }
    for vendor in ("cuda", "hip"):
        try:
            where = xattn.sources.kernel_directory(vendor)
            lines[f"kernels_{vendor}"] = f"{where} ({len(xattn.kernel_files(vendor))} sources)"
        except FileNotFoundError as error:
            lines[f"kernels_{vendor}"] = f"missing: {error}"
    for name, (usable, reason) in xattn.available_backends().items():
        lines[f"backend {name}"] = f"{'usable' if usable else 'unusable'}: {reason}"
    for name in ("cuda", "hip"):
        if backends.backend_status(name).usable:
            try:
                module = importlib.import_module(f"xattn.{name}")
                lines.update(module.info())
            except (ImportError, AttributeError) as error:
                lines[f"{name} info"] = f"unavailable ({error})"
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _demo_inputs(backend: str, rng):
    """(q, k, v, description) for the backend: GPU arrays when a GPU backend is usable."""
    if backend == "reference":
        shape_q, shape_kv, dtype = (1, 8, 1024, 64), (1, 2, 1024, 64), np.float32
        q, k, v = (rng.standard_normal(s).astype(dtype) for s in (shape_q, shape_kv, shape_kv))
        return q, k, v, "NumPy float32"
    import cupy
    shape_q, shape_kv = (4, 16, 2048, 128), (4, 4, 2048, 128)
    q, k, v = (cupy.asarray(rng.standard_normal(s), dtype=cupy.float16)
               for s in (shape_q, shape_kv, shape_kv))
    return q, k, v, "CuPy float16"


def demo() -> int:
    backend = next((name for name in ("cuda", "hip") if backends.backend_status(name).usable),
                   "reference")
    q, k, v, what = _demo_inputs(backend, np.random.default_rng(0))
    tolerance = 2e-3 if backend != "reference" else 1e-5
    print(f"backend {backend!r}: causal GQA attention, q {tuple(q.shape)}, "
          f"k/v {tuple(k.shape)}, {what}")

    def run():
        out = xattn.attention(q, k, v, causal=True, backend=backend)
        if backend != "reference":
            import cupy
            cupy.cuda.get_current_stream().synchronize()
        return out

    started = time.perf_counter()
    run()  # first call: on a GPU this includes compiling the kernel
    first = time.perf_counter() - started
    started = time.perf_counter()
    out = run()
    steady = time.perf_counter() - started

    expected, _ = xattn.exact_attention(q, k, v, causal=True)
    got = out.get() if hasattr(out, "get") else np.asarray(out)
    error = np.linalg.norm(got.astype(np.float64) - expected) / np.linalg.norm(expected)
    print(f"first call {first * 1e3:.1f} ms, second call {steady * 1e3:.1f} ms")
    print(f"relative error against the float64 oracle: {error:.2e} (tolerance {tolerance:.0e})")
    if not error <= tolerance:
        print("FAILED: error above tolerance", file=sys.stderr)
        return 1
    print("ok")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # bench has its own options; hand them over untouched.
        from xattn import bench
        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m xattn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("info", "demo", "bench"))
    args = parser.parse_args(argv)
    return {"info": info, "demo": demo}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
