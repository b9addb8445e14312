"""Forward timing of xattn.cuda.forward against SDPA flash and cuDNN on a few shapes (bf16),
called below the public API. A development aid; `python -m xattn bench` is the benchmark.

    PYTHONPATH=. python ci/quick_perf.py
"""

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from xattn import cuda



def sdpa(backend, q, k, v, causal):
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


for d, causal, s in [(64, False, 4096), (128, False, 4096), (128, True, 4096), (64, True, 16384), (128, False, 16384)]:
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    impls = {
        "xattn": lambda: cuda.forward(q, k, v, out, lse, causal=causal, scale=1 / math.sqrt(d), stream=stream),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal),
    }
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    row = [f"D{d} S{s} {'causal' if causal else 'full  '}"]
    for name, fn in impls.items():
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        row.append(f"{name} {flops / ms / 1e9:6.1f}")
    print("  ".join(row), flush=True)
