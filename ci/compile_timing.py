"""First-compile and warm-load time of one kernel variant, each in a fresh process: the first
with an empty CuPy kernel cache (NVRTC runs), the second reusing that cache from disk.

    PYTHONPATH=. python ci/compile_timing.py
"""

import os
import subprocess
import sys
import tempfile

CHILD = r"""
import time, torch, xattn
q = torch.randn(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
start = time.perf_counter()
xattn.attention(q, q, q, causal=True)
torch.cuda.synchronize()
print(f"{time.perf_counter() - start:.3f}")
"""


def first_call_seconds(cache_dir: str) -> float:
    env = dict(os.environ, CUPY_CACHE_DIR=cache_dir)
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


with tempfile.TemporaryDirectory() as cache:
    cold = first_call_seconds(cache)
    warm = first_call_seconds(cache)
print(f"compile timing (bf16, D=128, causal): first call with NVRTC compile {cold:.2f} s, "
      f"first call loading from CuPy's disk cache {warm:.2f} s")
