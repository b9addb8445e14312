"""A few KV-cache decode calls for compute-sanitizer (memcheck, racecheck, synccheck): the
tensor-core decode contiguous and paged, bf16 and FP8 caches (float16 products, scaled Q tile), a
head dim below its tile's (zero columns), new rows and split keys (the merge), left padding
(cache_leftpad, including values out of range, which the kernels clamp). Prints whether each
output is finite.

    PYTHONPATH=. compute-sanitizer --tool racecheck python ci/decode_sanitize.py
"""

import torch

import xattn
from xattn import kvcache

gen = torch.Generator(device="cuda").manual_seed(0)


def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen, device="cuda").to(dtype)


def run(name, b, hq, hk, smax, d, page_size, fp8, snew, splits, leftpad=None):
    kvcache._FORCED_SPLITS = splits
    kvcache.num_splits.cache_clear()
    kvcache._plans.clear()
    q = randn(b, hq, 1, d)
    k_new, v_new = randn(b, hk, snew, d), randn(b, hk, snew, d)
    lengths = torch.tensor([smax - snew - i for i in range(b)], dtype=torch.int32, device="cuda")
    table = None
    if page_size:
        pages = b * smax // page_size
        k, v = randn(pages, page_size, hk, d), randn(pages, page_size, hk, d)
        table = torch.randperm(pages, device="cuda").reshape(b, -1).int()
    else:
        k, v = randn(b, hk, smax, d), randn(b, hk, smax, d)
    scales = {}
    if fp8:
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
        scales = dict(k_scale=torch.tensor(0.5, device="cuda"), v_scale=torch.tensor(2.0, device="cuda"))
    with torch.no_grad():
        pads = torch.tensor(leftpad, dtype=torch.int32, device="cuda") if leftpad else None
        out = xattn.attention_with_kvcache(q, k, v, cache_seqlens=lengths, k_new=k_new, v_new=v_new,
                                           block_table=table, cache_leftpad=pads, **scales)
    torch.cuda.synchronize()
    print(f"{name}: finite output {bool(torch.isfinite(out).all())}", flush=True)


CASES = [  # name, B, Hq, Hk, Smax, D, page size, FP8, new rows, forced splits (0: the planner's)
    ("bf16 contiguous D128", 2, 8, 2, 160, 128, 0, False, 1, 0),
    ("bf16 contiguous D72, split 3", 2, 8, 2, 200, 72, 0, False, 3, 3),
    ("bf16 paged D128, split 2", 2, 8, 2, 192, 128, 16, False, 2, 2),
    ("fp8 contiguous D128, split 3", 2, 8, 2, 160, 128, 0, True, 1, 3),
    ("fp8 paged D64", 2, 4, 4, 128, 64, 32, True, 2, 0),
    ("bf16 contiguous D128, left padding, split 2", 2, 8, 2, 160, 128, 0, False, 1, 2, [70, 10**6]),
    ("bf16 paged D128, left padding", 2, 8, 2, 192, 128, 16, False, 2, 0, [-3, 37]),
]
for case in CASES:
    run(*case)
