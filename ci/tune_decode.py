"""Decode tuning on a GPU: GPU time of attention_with_kvcache at forced split counts, and the host
time per call (the Python and launch cost that bounds short caches), on the bench's decode shapes.

    PYTHONPATH=. python ci/tune_decode.py [--splits 1 2 4 8 16 32] [--seqlens 4096 32768]
"""

from __future__ import annotations

import argparse
import time

import torch

import xattn
from xattn import kvcache
from xattn.bench import _timer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 32768])
    args = parser.parse_args()
    timer = _timer()
    batch, heads_q, head_dim = 8, 32, 128
    print("Hk      Sk  splits  GPU TB/s  host us/call  (splits 0: the planner's choice)")
    for heads_k in (8, 32):
        for seqlen in args.seqlens:
            q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, heads_k, seqlen, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            lengths = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
            kv_bytes = 2 * k.numel() * k.element_size()
            for splits in args.splits:
                kvcache._FORCED_SPLITS = splits
                kvcache._plans.clear()  # plans hold their split count
                call = lambda: xattn.attention_with_kvcache(q, k, v, cache_seqlens=lengths, causal=False)
                ms = timer(call)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(200):
                    call()
                host_us = (time.perf_counter() - start) / 200 * 1e6
                torch.cuda.synchronize()
                chosen = kvcache._plan("bfloat16", 0, batch, heads_q, heads_k, 1, seqlen, head_dim, (-1, -1))[3]
                print(f"{heads_k:2} {seqlen:7} {splits or chosen:7}{'*' if not splits else ' '} "
                      f"{kv_bytes / ms / 1e9:8.2f} {host_us:12.1f}", flush=True)


if __name__ == "__main__":
    main()
