"""Sweep tile configurations of the forward kernel on the present GPU (bf16, B*S = 16384,
H*D = 2048) and print TFLOP/s per candidate next to SDPA's flash backend. Each candidate's output
is checked against SDPA before it is timed. A tuning aid: the chosen rows go into xattn/configs.py.

    PYTHONPATH=. python ci/tune_fwd.py --head-dim 128 --tiles 128x32 128x48 128x64
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
parser.add_argument("--tiles", nargs="+", required=True, help="BLOCK_MxBLOCK_N[xWARPS]")
parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
parser.add_argument("--causal", action="store_true")
args = parser.parse_args()

arch = cuda._arch(torch.cuda.current_device())
base = configs.select("flash_fwd", arch, args.head_dim, args.causal)
original_select = configs.select
d = args.head_dim
for s in args.seqlens:
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * h * s * s * d / (2 if args.causal else 1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
        ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
                      warmup=25, rep=100, return_mode="median")
    line = [f"D{d} S{s}{' causal' if args.causal else ''}: flash {flops / ms / 1e9:6.1f}"]
    for tile in args.tiles:
        parts = [int(x) for x in tile.split("x")]
        cfg = base._replace(block_m=parts[0], block_n=parts[1], warps=parts[2] if len(parts) > 2 else base.warps)
        configs.select = lambda kernel, a, hd, c, cfg=cfg: cfg if kernel == "flash_fwd" else original_select(kernel, a, hd, c)
        out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
        run = lambda: cuda.forward(q, k, v, out, lse, causal=args.causal, scale=1 / math.sqrt(d),
                                   stream=torch.cuda.current_stream().cuda_stream)
        run()
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        ms = do_bench(run, warmup=25, rep=100, return_mode="median")
        line.append(f"{tile} {flops / ms / 1e9:6.1f}" + ("" if err < 1e-2 else f" (WRONG {err:.1e})"))
    configs.select = original_select
    print("  ".join(line), flush=True)
