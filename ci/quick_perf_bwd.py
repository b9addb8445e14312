"""Backward timing of xattn.cuda.backward against SDPA's flash and cuDNN backward (bf16,
B*S = 16384, H*D = 2048), called below the public API. A development aid; the benchmark is
`python -m xattn bench --bwd`.

    PYTHONPATH=. python ci/quick_perf_bwd.py [--deterministic]
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from xattn import cuda

parser = argparse.ArgumentParser()
parser.add_argument("--deterministic", action="store_true")
parser.add_argument("--cases", nargs="+", default=["64:0:2048", "128:0:2048", "128:1:2048", "64:0:16384", "128:0:16384", "128:1:16384"])
args = parser.parse_args()

for case in args.cases:
    d, causal, s = (int(x) for x in case.split(":"))
    causal = bool(causal)
    b, h = 16384 // s, 2048 // d
    q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    cuda.forward(q, k, v, out, lse, causal=causal, scale=1 / math.sqrt(d), stream=stream)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    impls = {"xattn": lambda: cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=1 / math.sqrt(d),
                                            deterministic=args.deterministic, stream=stream)}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
        impls[name] = (lambda o=o, inputs=(qr, kr, vr): torch.autograd.grad(o, inputs, dout, retain_graph=True))
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    row = [f"bwd D{d} S{s} {'causal' if causal else 'full  '}"]
    for name, fn in impls.items():
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        row.append(f"{name} {flops / ms / 1e9:6.1f}")
    print("  ".join(row), flush=True)
