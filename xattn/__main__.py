"""Command line: python -m xattn {info, demo, bench, precompile}.

  info        platform, library versions, backends (and why any is unusable), device, compiler,
              kernel cache, and on a GPU the first-compile and warm-load times of one variant
  demo        attention on the best backend present, checked against the float64 oracle
  bench       xattn against its peers on the GPU (xattn.bench)
  precompile  compile the common kernel variants (forward and backward) for the present GPU,
              so that the first training step pays no JIT time (xattn.precompile)
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


def info(timing: bool = True) -> int:
    lines = {
        "xattn": f"{xattn.__version__} ({os.path.dirname(xattn.__file__)})",
        "platform": f"{platform.platform()}, Python {platform.python_version()}",
        "numpy": np.__version__,
        "torch": _version("torch"),
        "cupy": _version("cupy"),
        backends.ENVIRONMENT_VARIABLE: os.environ.get(backends.ENVIRONMENT_VARIABLE, "(unset)"),
    }
    for vendor in ("common", "cuda", "hip"):
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
    if timing:
        lines.update(_compile_timing())
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _compile_timing() -> dict[str, str]:
    """First compile and warm load of one variant, each in a fresh process (xattn.precompile)."""
    from xattn import precompile

    backend, _ = precompile.gpu_backend()
    if backend is None:
        return {}
    try:
        times = precompile.first_compile_and_warm_load(backend)
    except Exception as error:  # info reports; it does not fail on a broken compiler
        return {"compile time": f"not measured ({type(error).__name__}: {error})"}
    return {
        "compile time": f"{times['first_compile_s']:.2f} s first call of {times['variant']} "
                        f"forward with an empty kernel cache (new process)",
        "warm load": f"{times['warm_load_s']:.2f} s first call in another new process, from "
                     f"the disk cache; {times['memoized_s'] * 1e3:.2f} ms once memoized",
    }


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
    args = parse_args(argv)
    if args.command == "info":
        return info(timing=not args.no_timing)
    if args.command == "precompile":
        from xattn import precompile
        return precompile.precompile(
            precompile.variants(args.dtypes, args.head_dims, args.causal),
            backward=not args.forward_only, deterministic=args.deterministic)
    return demo()


def _causal_flag(text: str) -> bool:
    if text not in ("causal", "full"):
        raise argparse.ArgumentTypeError(f"expected 'causal' or 'full', got {text!r}")
    return text == "causal"


def _head_dim(text: str) -> int:
    """A --head-dims value; argparse reports a rejection as the precompile command's error,
    naming the option (a check after parsing could only print the top-level usage)."""
    from xattn import precompile

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= precompile.MAX_HEAD_DIM:
        raise argparse.ArgumentTypeError(f"expected a head dim in 1..{precompile.MAX_HEAD_DIM}, "
                                         f"got {value}")
    return value


def parse_args(argv) -> argparse.Namespace:
    """Options of every command but bench (which parses its own)."""
    from xattn import precompile

    # The commands are listed once, by the subparsers (the module docstring lists them too, for
    # readers of the source; handing it to argparse printed them twice).
    parser = argparse.ArgumentParser(prog="python -m xattn",
                                     description="xattn's command line: flash attention through "
                                                 "JIT-compiled CUDA and HIP kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command",
                                     title="commands")
    commands.add_parser("bench", help="xattn against its peers on the GPU; --model: a whole "
                                      "model (options: bench --help)")
    commands.add_parser("demo", help="attention on the best backend, checked against the oracle")
    info_parser = commands.add_parser("info", help="versions, backends (and why any is unusable), "
                                                   "device, compiler, kernel cache")
    info_parser.add_argument("--no-timing", action="store_true",
                             help="skip the first-compile and warm-load measurement")
    pre = commands.add_parser("precompile", help="compile the common kernel variants now, for "
                                                 "the present GPU",
                              description=precompile.__doc__.split("\n\n")[0])
    pre.add_argument("--dtypes", nargs="+", choices=precompile.DTYPES,
                     default=list(precompile.DEFAULT_DTYPES),
                     help=f"default: {' '.join(precompile.DEFAULT_DTYPES)}")
    pre.add_argument("--head-dims", type=_head_dim, nargs="+",
                     default=list(precompile.DEFAULT_HEAD_DIMS), metavar="D",
                     help=f"head dims in 1..{precompile.MAX_HEAD_DIM} (default: "
                          f"{' '.join(map(str, precompile.DEFAULT_HEAD_DIMS))})")
    pre.add_argument("--causal", type=_causal_flag, nargs="+", default=[False, True],
                     metavar="{causal,full}", help="any of: causal full (default: both)")
    pre.add_argument("--forward-only", action="store_true",
                     help="skip the backward kernels (inference only)")
    pre.add_argument("--deterministic", action="store_true",
                     help="the backward kernels of deterministic=True instead")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
