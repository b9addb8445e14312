"""Decode tuning on a GPU: GPU time of attention_with_kvcache at forced split counts and L2
prefetch hints (decode_common.h, L2_PREFETCH), and the host time per call (the Python and launch
cost that bounds short caches), on the bench's decode shapes; --fp8 adds the same calls on an
e4m3fn copy of the cache (TB/s of the bytes read: 1 an element).

    PYTHONPATH=. python ci/tune_decode.py [--splits 0 1 2 4 8] [--prefetch 0 128 256]
                                          [--seqlens 4096 32768] [--heads-k 8 32] [--fp8]
"""

from __future__ import annotations

import argparse
import time

import torch

import xattn
from xattn import kvcache
from xattn.bench import _timer
from xattn.kvcache import quantize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--heads-k", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--fp8", action="store_true")
    args = parser.parse_args()
    timer = _timer()
    batch, heads_q, head_dim = 8, 32, 128
    print("cache    Hk      Sk  L2  splits  GPU us  TB/s  host us/call  (splits 0*: the planner's choice)")
    for heads_k in args.heads_k:
        for seqlen in args.seqlens:
            q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, heads_k, seqlen, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            lengths = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
            forms = [("bf16", k, v, None, None)]
            if args.fp8:
                one = torch.ones((), device="cuda")
                forms.append(("fp8", quantize(k, one, torch.float8_e4m3fn),
                              quantize(v, one, torch.float8_e4m3fn), one, one))
            for name, kc, vc, ks, vs in forms:
                kv_bytes = 2 * kc.numel() * kc.element_size()
                for prefetch in args.prefetch:
                    for splits in args.splits:
                        kvcache._FORCED_SPLITS = splits
                        kvcache.L2_PREFETCH = prefetch
                        kvcache.num_splits.cache_clear()
                        kvcache._plans.clear()  # plans hold their split count and kernels

                        def call():
                            return xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths,
                                                                causal=False, k_scale=ks, v_scale=vs)
                        ms = timer(call)
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        for _ in range(200):
                            call()
                        host_us = (time.perf_counter() - start) / 200 * 1e6
                        torch.cuda.synchronize()
                        chosen = kvcache._plan("bfloat16", 0, batch, heads_q, heads_k, 1, seqlen,
                                               head_dim, (-1, -1))[3]
                        print(f"{name:5} {heads_k:5} {seqlen:7} {prefetch:3} {splits or chosen:7}"
                              f"{'*' if not splits else ' '} {ms * 1e3:7.1f} {kv_bytes / ms / 1e9:5.2f} "
                              f"{host_us:12.1f}", flush=True)
            del q, k, v, forms
            torch.cuda.empty_cache()
    kvcache._FORCED_SPLITS = 0
    kvcache.L2_PREFETCH = 0


if __name__ == "__main__":
    main()
