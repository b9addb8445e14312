"""Sweep tile configurations of the dK/dV backward kernel on the present GPU (bf16, B*S = 16384,
H*D = 2048): backward TFLOP/s (2.5 x forward FLOPs) per candidate next to SDPA's flash backward.
Each candidate's dK is checked against the table's configuration first. A tuning aid.

    PYTHONPATH=. python ci/tune_bwd.py --head-dim 128 --tiles 64x128x8 64x64x4
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from xattn import configs, cuda

parser = argparse.ArgumentParser()
parser.add_argument("--head-dim", type=int, required=True)
parser.add_argument("--tiles", nargs="+", required=True, help="BLOCK_MxBLOCK_NxWARPS")
parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
parser.add_argument("--causal", action="store_true")
args = parser.parse_args()

d, causal = args.head_dim, args.causal
original_select = configs.select
for s in args.seqlens:
    b, h = 16384 // s, 2048 // d
    q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    cuda.forward(q, k, v, out, lse, causal=causal, scale=1 / math.sqrt(d), stream=stream)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    run = lambda: cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=1 / math.sqrt(d),
                                deterministic=False, stream=stream)
    run()
    reference_dk = grads[1].clone()
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
    ms = do_bench(lambda: torch.autograd.grad(o, (qr, kr, vr), dout, retain_graph=True), warmup=25, rep=100,
                  return_mode="median")
    line = [f"bwd D{d} S{s}{' causal' if causal else ''}: flash {flops / ms / 1e9:6.1f}"]
    for tile in args.tiles:
        bm, bn, w = (int(x) for x in tile.split("x"))
        base = original_select("flash_bwd_dkdv", cuda._arch(0), d, causal)
        cfg = base._replace(block_m=bm, block_n=bn, warps=w)
        configs.select = lambda kernel, a, hd, c, cfg=cfg: cfg if kernel == "flash_bwd_dkdv" else original_select(kernel, a, hd, c)
        run()
        err = ((grads[1].float() - reference_dk.float()).norm() / reference_dk.float().norm()).item()
        ms = do_bench(run, warmup=25, rep=100, return_mode="median")
        line.append(f"{tile} {flops / ms / 1e9:6.1f}" + ("" if err < 1e-2 else f" (DIFFERS {err:.1e})"))
        configs.select = original_select
    print("  ".join(line), flush=True)
