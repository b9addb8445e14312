"""`python -m xattn precompile` and the compile timing of `python -m xattn info`.

CPU: argument parsing (defaults, every option, rejected values with their message) and the
no-GPU answer (a clear message on stderr, a non-zero exit). GPU (`gpu` marker): after
precompile, real forward and backward calls of the same variants compile nothing, and the
kernels are in CuPy's disk cache for the next process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xattn import __main__ as cli
from xattn import precompile

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "xattn", *args], capture_output=True,
                          text=True, timeout=600, env=environment, cwd=ROOT)


# ------------------------------------------------------------------------ argument parsing

def test_defaults_are_the_common_training_variants():
    args = cli.parse_args(["precompile"])
    assert args.dtypes == ["bfloat16", "float16"]
    assert args.head_dims == [64, 128]
    assert args.causal == [False, True]
    assert not args.forward_only and not args.deterministic
    got = precompile.variants(args.dtypes, args.head_dims, args.causal)
    assert len(got) == 8 and len(set(got)) == 8
    assert precompile.Variant("bfloat16", 128, True) in got


def test_every_option_is_parsed():
    args = cli.parse_args(["precompile", "--dtypes", "float32", "float16", "--head-dims", "96",
                           "256", "--causal", "causal", "--forward-only", "--deterministic"])
    assert args.dtypes == ["float32", "float16"]
    assert args.head_dims == [96, 256]
    assert args.causal == [True]
    assert args.forward_only and args.deterministic
    assert [v.label() for v in precompile.variants(args.dtypes, args.head_dims, args.causal)] == [
        "float32 D=96 causal", "float32 D=256 causal", "float16 D=96 causal",
        "float16 D=256 causal"]


def test_repeated_values_give_each_variant_once():
    got = precompile.variants(["float16", "float16"], [64, 64], [True, True])
    assert got == [precompile.Variant("float16", 64, True)]


@pytest.mark.parametrize("argv, message", [
    (["precompile", "--dtypes", "float64"], "invalid choice: 'float64'"),
    (["precompile", "--head-dims", "0"], "argument --head-dims: expected a head dim in 1..256, got 0"),
    (["precompile", "--head-dims", "512"],
     "argument --head-dims: expected a head dim in 1..256, got 512"),
    (["precompile", "--head-dims", "sixty"], "argument --head-dims: expected an integer, got 'sixty'"),
    (["precompile", "--causal", "yes"], "expected 'causal' or 'full', got 'yes'"),
    (["compile"], "invalid choice: 'compile'"),
    ([], "the following arguments are required: command"),
])
def test_rejected_arguments_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    # A precompile option's error is the precompile command's, with its usage.
    usage = "python -m xattn precompile" if argv[:1] == ["precompile"] else "python -m xattn"
    assert err.splitlines()[-1].startswith(f"{usage}: error: "), err


def test_info_options():
    assert cli.parse_args(["info"]).no_timing is False
    assert cli.parse_args(["info", "--no-timing"]).no_timing is True


# -------------------------------------------------------------------------- no GPU present

# Hiding every device makes both GPU backends unusable on any machine, GPU or not.
NO_DEVICES = {"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": "", "ROCR_VISIBLE_DEVICES": ""}


def test_without_a_gpu_precompile_says_so_and_fails():
    done = run_cli("precompile", "--head-dims", "64", env=NO_DEVICES)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert "xattn precompile: no usable GPU backend here, nothing to compile" in done.stderr
    # the reason of each backend is passed on, not swallowed
    assert "cuda: " in done.stderr and "hip: " in done.stderr
    assert "Traceback" not in done.stderr


def test_without_a_gpu_info_has_no_compile_timing():
    done = run_cli("info", env=NO_DEVICES)
    assert done.returncode == 0, done
    assert "backend reference" in done.stdout
    assert "compile time" not in done.stdout


# ---------------------------------------------------------------------------------- GPU

GPU_VARIANTS = precompile.variants(["float16", "bfloat16"], [64, 128], [False, True])


def _gpu_or_skip():
    backend, why = precompile.gpu_backend()
    if backend is None:
        pytest.skip(f"no usable GPU backend: {why}")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch does not see a GPU (backward kernels are reached through torch)")
    return backend, torch


@pytest.mark.gpu
def test_after_precompile_real_calls_compile_nothing(monkeypatch):
    import xattn
    from xattn import jit

    backend, torch = _gpu_or_skip()
    assert precompile.precompile(GPU_VARIANTS, progress=False) == 0
    loaded = set(jit._modules)
    # The entry points a GPU of this architecture picks: Hopper's own kernels, or mma.sync's.
    assert any(key[-1] in ("flash_fwd", "flash_fwd_sm90") for key in loaded)
    assert any(key[-1] in ("flash_bwd_dkdv", "flash_bwd_sm90") for key in loaded)

    def no_compile(*args, **kwargs):
        raise AssertionError(f"compiled after precompile: {args[-2:]}")

    monkeypatch.setattr(jit, "_compile", no_compile)
    # Other shapes than the tiny ones precompile ran, GQA, both layouts: same variants.
    for variant in GPU_VARIANTS:
        dtype = getattr(torch, variant.dtype)
        q = torch.randn(2, 300, 8, variant.head_dim, device="cuda", dtype=dtype,
                        requires_grad=True)
        k, v = (torch.randn(2, 257, 2, variant.head_dim, device="cuda", dtype=dtype,
                            requires_grad=True) for _ in range(2))
        out = xattn.attention(q, k, v, causal=variant.causal, layout="bshd", backend=backend)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert set(jit._modules) == loaded


@pytest.mark.gpu
def test_precompile_fills_the_disk_cache_quietly(tmp_path):
    _gpu_or_skip()
    done = run_cli("precompile", "--dtypes", "float16", "--head-dims", "64", "--causal",
                   "causal", env={"CUPY_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done
    # stdout is a pipe here: one summary line, no progress bar (tqdm would write '\r').
    assert "\r" not in done.stdout and "\r" not in done.stderr
    assert re.fullmatch(r"xattn precompile: 1 of 1 variants \(forward and backward\) ready on "
                        r"\w+, \d+ kernels newly loaded, .*\n", done.stdout), done.stdout
    assert int(re.search(r"(\d+) kernels newly loaded", done.stdout).group(1)) >= 3
    assert any(path.is_file() for path in tmp_path.rglob("*")), "nothing in CuPy's disk cache"


@pytest.mark.gpu
def test_info_reports_compile_and_warm_load_times():
    _gpu_or_skip()
    done = run_cli("info")
    assert done.returncode == 0, done
    first = re.search(r"compile time\s+([\d.]+) s first call", done.stdout)
    warm = re.search(r"warm load\s+([\d.]+) s first call", done.stdout)
    assert first and warm, done.stdout
    # Loading a cached cubin must be cheaper than compiling it: otherwise the cache did not hit.
    assert float(warm.group(1)) < float(first.group(1))
