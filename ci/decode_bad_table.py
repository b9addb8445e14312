"""A paged decode call with a device block table whose ids are out of range (negative, past the
last page) and lengths past the table: the kernels clamp, never touching memory outside the caches.
Run under compute-sanitizer memcheck; prints the result's finiteness. The same call with FP8 caches
(e4m3fn, per-head k_scale, per-tensor v_scale), and an FP8 call on contiguous caches with an odd
head dim (the element-wise path) and split keys.

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
k_scale, v_scale = torch.tensor([0.5, 2.0], device="cuda"), torch.tensor(0.25, device="cuda")
with torch.no_grad():
    out = xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, k_new=kn, v_new=vn,
                                       block_table=table, sinks=sinks)
    k8, v8 = (x.to(torch.float8_e4m3fn) for x in (kc, vc))
    out8 = xattn.attention_with_kvcache(q, k8, v8, cache_seqlens=lengths, k_new=kn, v_new=vn,
                                        block_table=table, sinks=sinks, k_scale=k_scale,
                                        v_scale=v_scale)
    d_odd, smax = 72, 1000
    kc_odd, vc_odd = (torch.randn(b, hk, smax, d_odd, device="cuda").to(torch.float8_e5m2)
                      for _ in range(2))
    q_odd = torch.randn(b, 8, 3, d_odd, device="cuda", dtype=torch.float16)
    kn_odd, vn_odd = (torch.randn(b, hk, 3, d_odd, device="cuda", dtype=torch.float16) for _ in range(2))
    lengths_odd = torch.tensor([997, -1, 5000], dtype=torch.int32, device="cuda")
    out_odd = xattn.attention_with_kvcache(q_odd, kc_odd, vc_odd, cache_seqlens=lengths_odd,
                                           k_new=kn_odd, v_new=vn_odd, k_scale=k_scale[:1],
                                           v_scale=v_scale)
torch.cuda.synchronize()
print("bad table: finite output", bool(torch.isfinite(out).all()))
print("bad table, fp8: finite output", bool(torch.isfinite(out8).all()))
print("fp8, odd head dim, clamped lengths: finite output", bool(torch.isfinite(out_odd).all()))
