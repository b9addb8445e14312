"""Run one forward shape a few times through xattn and through SDPA's flash backend, for ncu:

    ncu --clock-control none -k regex:"flash" --launch-skip 2 --launch-count 2 \
        python ci/profile_fwd.py --head-dim 128
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
parser.add_argument("--causal", action="store_true")
args = parser.parse_args()
d, s = args.head_dim, args.seqlen
b, h = 16384 // s, 2048 // d
q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
for _ in range(3):
    cuda.forward(q, k, v, out, lse, causal=args.causal, scale=1 / math.sqrt(d),
                 stream=torch.cuda.current_stream().cuda_stream)
with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    for _ in range(3):
        F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
torch.cuda.synchronize()
