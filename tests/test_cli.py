"""`python -m xattn`'s help and errors, and `bench` where it cannot run (no torch, no GPU).

The benchmarks themselves are not tests; `bench --model --model-size tiny` runs here on the CPU
only so that every code path of the model benchmark is exercised, and what it checks is that it
ran and reported, plus that xattn and sdpa generated the same tokens (float32, tiny model)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def run_cli(*args, code=None):
    """`python -m xattn ARGS` (or `python -c CODE ARGS`) in a fresh process, on the checkout."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "xattn", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment,
                          cwd=ROOT)


def test_help_lists_each_command_once():
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    for command in ("bench", "demo", "info", "precompile"):
        listed = [line for line in done.stdout.splitlines() if line.split()[:1] == [command]]
        assert len(listed) == 1, (command, done.stdout)


def test_bench_help_is_whole_and_every_option_has_help():
    done = run_cli("bench", "--help")
    assert done.returncode == 0, done.stderr
    # The description is the module's whole docstring, not its first line cut mid-sentence.
    assert "A benchmark, not a test" in done.stdout
    for option in ("--dtypes", "--head-dims", "--seqlens", "--causal", "--tokens", "--width",
                   "--out", "--bwd", "--model", "--model-size", "--model-reps"):
        assert option in done.stdout, option
    # Every option's own line or the next carries a help text.
    lines = done.stdout.splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("--"):
            rest = stripped.split("  ", 1)[1].strip() if "  " in stripped else ""
            following = lines[index + 1].strip() if index + 1 < len(lines) else ""
            assert rest or (following and not following.startswith("-")), line


def test_bench_without_torch_says_what_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from xattn.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))")
    done = run_cli("bench", code=code)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert "pip install 'xattn[torch]'" in done.stderr


def test_precompile_head_dim_out_of_range_is_the_commands_error():
    done = run_cli("precompile", "--head-dims", "512")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == ("python -m xattn precompile: error: argument "
                                            "--head-dims: expected a head dim in 1..256, got 512")


@pytest.mark.skipif(not (HAS_TORCH and HAS_TRANSFORMERS), reason="needs torch and transformers")
def test_bench_model_tiny_runs_every_measurement_on_the_cpu(tmp_path):
    code = ("import sys, torch; torch.cuda.is_available = lambda: False\n"
            "from xattn.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))")
    done = run_cli("bench", "--model", "--model-size", "tiny", "--model-reps", "1",
                   "--out", str(tmp_path), code=code)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bench_model.json").read_text())
    assert result["errors"] == {}
    rows = {row["key"]: row for row in result["model"]}
    for key in ("prefill_ms", "generate_dynamic_tokens_per_s", "generate_static_tokens_per_s",
                "train_step_ms"):
        assert rows[key]["xattn"] > 0 and rows[key]["sdpa"] > 0, key
        assert rows[key]["ratio"] > 0, key
    assert rows["train_peak_gib"]["xattn"] is None  # measured on a GPU only
    # float32, tiny: xattn's reference backend and sdpa agree on every greedy token.
    assert result["checks"]["generate_dynamic_token_agreement"] == 1.0
    assert result["checks"]["generate_static_token_agreement"] == 1.0
    assert result["checks"]["prefill_logits_rel_diff"] <= 1e-4
    assert "xattn/sdpa" in done.stdout


def test_bench_model_1b_on_the_cpu_says_it_needs_a_gpu():
    if not HAS_TORCH:
        pytest.skip("needs torch")
    code = ("import sys, torch; torch.cuda.is_available = lambda: False\n"
            "from xattn.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))")
    done = run_cli("bench", "--model", code=code)
    assert done.returncode == 2, done
    assert "--model-size tiny runs on the CPU" in done.stderr and "Traceback" not in done.stderr
