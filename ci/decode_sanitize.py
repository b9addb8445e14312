"""A few KV-cache decode calls for compute-sanitizer (memcheck, racecheck, synccheck): the
tensor-core decode contiguous and paged, bf16 and FP8 caches (float16 products, scaled Q tile), a
head dim below its tile's (zero columns), new rows and split keys (the merge), left padding
(cache_leftpad, including values out of range, which the kernels clamp); and the same calls in
float32, the CUDA-core body (kernels_common/flash_decode_simt.h) through flash_decode_f32.cu. With
--hip-on-cuda every call goes to the portable HIP decode instead (the same body, compiled by NVRTC
through tests/hip_on_cuda.h in RDNA2's wave32 rows, which have no matrix cores: 16-bit calls too;
its append and merge kernels as well). Prints whether each output is finite.

    PYTHONPATH=. compute-sanitizer --tool racecheck python ci/decode_sanitize.py [--hip-on-cuda]
"""

import contextlib
import sys
from pathlib import Path

import torch

import xattn
from xattn import hip, kvcache

gen = torch.Generator(device="cuda").manual_seed(0)


def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen, device="cuda").to(dtype)


def run(name, b, hq, hk, smax, d, page_size, fp8, snew, splits, leftpad=None, dtype=torch.bfloat16):
    kvcache._FORCED_SPLITS = splits
    kvcache.num_splits.cache_clear()
    kvcache._plans.clear()
    q = randn(b, hq, 1, d, dtype=dtype)
    k_new, v_new = randn(b, hk, snew, d, dtype=dtype), randn(b, hk, snew, d, dtype=dtype)
    lengths = torch.tensor([smax - snew - i for i in range(b)], dtype=torch.int32, device="cuda")
    table = None
    if page_size:
        pages = b * smax // page_size
        k, v = randn(pages, page_size, hk, d, dtype=dtype), randn(pages, page_size, hk, d, dtype=dtype)
        table = torch.randperm(pages, device="cuda").reshape(b, -1).int()
    else:
        k, v = randn(b, hk, smax, d, dtype=dtype), randn(b, hk, smax, d, dtype=dtype)
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
hip_on_cuda = "--hip-on-cuda" in sys.argv[1:]
if hip_on_cuda:  # the portable HIP decode, as tests/conftest.py's hip-on-cuda backend runs it
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import HIP_ON_CUDA, WAVE32_TARGET  # noqa: E402
    from test_hip_sources import HIP_ON_CUDA_OPTIONS  # noqa: E402
    served = hip.on_cuda(prefix=HIP_ON_CUDA.read_text(), options=tuple(HIP_ON_CUDA_OPTIONS),
                         forward_target=WAVE32_TARGET, backward_target=WAVE32_TARGET)
else:
    served = contextlib.nullcontext()
with served:
    for case in CASES:  # 16-bit: the tensor-core decode, or hip-on-cuda's portable one (RDNA2 rows)
        run(*case)
    for case in CASES:  # float32: the CUDA-core body
        run(f"float32 {case[0]}", *case[1:], dtype=torch.float32)
