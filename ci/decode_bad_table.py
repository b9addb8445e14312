"""A paged decode call with a device block table whose ids are out of range (negative, past the
last page) and lengths past the table: the kernels clamp, never touching memory outside the caches.
Run under compute-sanitizer memcheck; prints the result's finiteness.

    PYTHONPATH=. compute-sanitizer --tool memcheck python ci/decode_bad_table.py
"""

import torch

import xattn

pages, size, hk, d, b = 6, 16, 2, 128, 3
kc, vc = (torch.randn(pages, size, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
q = torch.randn(b, 8, 1, d, device="cuda", dtype=torch.bfloat16)
kn, vn = (torch.randn(b, hk, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
table = torch.tensor([[0, 1], [-5, 99], [2, 2**30]], dtype=torch.int32, device="cuda")
lengths = torch.tensor([40, 31, -3], dtype=torch.int32, device="cuda")
sinks = torch.randn(8, device="cuda")
with torch.no_grad():
    out = xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, k_new=kn, v_new=vn,
                                       block_table=table, sinks=sinks)
torch.cuda.synchronize()
print("bad table: finite output", bool(torch.isfinite(out).all()))
