"""Paged attention_varlen calls with device block tables whose ids are out of range (negative,
past the last page, 2^30) and device lengths past the table (seqused_k, and cu_seqlens_k through
the host-checked path with a good table): the kernels clamp, never touching memory outside the
caches or the table. bf16 through flash_fwd.cu (16-byte copies, D 128, 16-row pages, and the
element-wise copies of an odd head dim with 48-row pages), float32 through flash_fwd_f32.cu, and
the HIP portable forward on NVIDIA (hip-on-cuda, when tests/ is beside this script). Run under
compute-sanitizer memcheck; prints each result's finiteness (the sibling of decode_bad_table.py).

    PYTHONPATH=. compute-sanitizer --tool memcheck python ci/varlen_bad_table.py
"""

import sys
from pathlib import Path

import torch

import xattn


def call(dtype, head_dim, page_size, with_sinks=True):
    pages, hk, hq = 6, 2, 8
    lengths_q = [1, 37, 0, 5]
    kc, vc = (torch.randn(pages, page_size, hk, head_dim, device="cuda", dtype=dtype)
              for _ in range(2))
    q = torch.randn(sum(lengths_q), hq, head_dim, device="cuda", dtype=dtype)
    cu_q = torch.tensor([0, 1, 38, 38, 43], dtype=torch.int32, device="cuda")
    table = torch.tensor([[0, 1, 2], [-5, 99, 3], [2, 2**30, 1], [4, 5, -1]], dtype=torch.int32,
                         device="cuda")
    seqused = torch.tensor([40, 2**30, -3, 3 * page_size], dtype=torch.int32, device="cuda")
    sinks = torch.randn(hq, device="cuda")
    with torch.no_grad():
        out = xattn.attention_varlen(q, kc, vc, cu_q, None, 37, 3 * page_size, causal=True,
                                     block_table=table, seqused_k=seqused)
        out_window = xattn.attention_varlen(q, kc, vc, cu_q, None, 37, 3 * page_size,
                                            window=(20, 0), softcap=30.0, block_table=table,
                                            seqused_k=seqused)
        if not with_sinks:  # the hip backend has none
            return out, out_window
        out_sinks = xattn.attention_varlen(q, kc, vc, cu_q, None, 37, 3 * page_size, causal=True,
                                           block_table=table, seqused_k=seqused, sinks=sinks)
    return out, out_window, out_sinks


def hip_on_cuda():
    """The hip backend's portable kernels on this GPU (tests/conftest.py's hip-on-cuda path)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests))
    from test_hip_sources import HIP_ON_CUDA_OPTIONS

    from xattn import hip
    return hip.on_cuda(prefix=(tests / "hip_on_cuda.h").read_text(),
                       options=tuple(HIP_ON_CUDA_OPTIONS), forward_target="gfx1030",
                       backward_target="gfx1030")


results = {}
for dtype, head_dim, page_size in ((torch.bfloat16, 128, 16), (torch.float16, 72, 48),
                                   (torch.float32, 64, 32)):
    results[f"cuda {str(dtype).removeprefix('torch.')} D{head_dim} pages of {page_size}"] = \
        call(dtype, head_dim, page_size)
if "--no-hip" not in sys.argv:
    with hip_on_cuda():
        for dtype in (torch.bfloat16, torch.float32):
            results[f"hip-on-cuda {str(dtype).removeprefix('torch.')} D64 pages of 16"] = \
                call(dtype, 64, 16, with_sinks=False)
torch.cuda.synchronize()
for name, outs in results.items():
    print(f"bad table, {name}: finite output", all(bool(torch.isfinite(o).all()) for o in outs))
