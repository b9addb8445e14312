"""One backward shape through xattn and through SDPA's flash backend, for ncu:

    ncu --clock-control none -k regex:"dkdv|bwd" python ci/profile_bwd.py --head-dim 128
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from xattn import cuda

parser = argparse.ArgumentParser()
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--seqlen", type=int, default=4096)
args = parser.parse_args()
d, s = args.head_dim, args.seqlen
b, h = 16384 // s, 2048 // d
q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
stream = torch.cuda.current_stream().cuda_stream
cuda.forward(q, k, v, out, lse, causal=False, scale=1 / math.sqrt(d), stream=stream)
grads = [torch.empty_like(x) for x in (q, k, v)]
for _ in range(2):
    cuda.backward(q, k, v, out, dout, lse, *grads, causal=False, scale=1 / math.sqrt(d),
                  deterministic=False, stream=stream)
qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    o = F.scaled_dot_product_attention(qr, kr, vr)
for _ in range(2):
    torch.autograd.grad(o, (qr, kr, vr), dout, retain_graph=True)
torch.cuda.synchronize()
