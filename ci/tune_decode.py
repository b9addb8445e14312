"""Decode tuning on a GPU: GPU time of attention_with_kvcache at forced split counts and L2
prefetch hints (decode_common.h, L2_PREFETCH), and the host time per call (the Python and launch
cost that bounds short caches), on the bench's decode shapes; --fp8 adds the same calls on the
bench's FP8 copy of the cache (e4m3fn, per-kv-head scales; TB/s of the bytes read: 1 an element),
--paged 16 the same caches in the bench's shuffled pages of 16 rows. First line: the GPU's
device-to-device copy bandwidth (read + write bytes of a 4 GiB copy), the yardstick of the
decode's read bandwidth.

--variants replaces fields of the decode's table row for the bench's head dim (each a
comma-separated list of field=value, "base" for the row as it is; an upper-case name is a
define of the kernel instead, e.g. L2_EVICT_FIRST=1 or DECODE_ROTATE=0), and --rounds N measures SDPA's cuDNN decode and
every variant N times in turn (ratios to cuDNN's median: the GPU's clock and power state drift
between calls, so side by side, alternated, is the only fair comparison).

    PYTHONPATH=. python ci/tune_decode.py [--splits 0 1 2 4 8] [--prefetch 0 128 256]
                                          [--paged 0 16] [--seqlens 4096 32768] [--heads-k 8 32]
                                          [--fp8] [--variants base stages=2 ...]
                                          [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import xattn
from xattn import configs, kvcache
from xattn.bench import _decode_caches, _sdpa_decode, _timer


def _decode_inputs(batch, heads_q, heads_k, seqlen, head_dim):
    """The bench's decode step: q (B, Hq, 1, D), full bf16 caches (B, Hk, Sk, D), lengths Sk."""
    q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads_k, seqlen, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    return q, k, v, torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")


def _variant_rows(specs, head_dim):
    """(name, table row) of each --variants spec applied to the sm_90 decode row at head_dim."""
    arch = int(torch.cuda.get_device_capability()[0] * 10 + torch.cuda.get_device_capability()[1])
    base = configs.select("flash_decode", arch, head_dim, False)
    out = []
    for spec in specs:
        pairs = [] if spec == "base" else [item.split("=") for item in spec.split(",")]
        fields = {k: int(v) for k, v in pairs if k.islower()}
        defines = {k: int(v) for k, v in pairs if k.isupper()}
        out.append((spec, base, base._replace(**fields), defines))
    return out


def _use_row(base, row, defines):
    configs.TABLE[configs.TABLE.index(base)] = row
    kvcache.EXTRA_DEFINES = defines
    kvcache.num_splits.cache_clear()
    kvcache._plans.clear()


def main_variants(args, timer) -> None:
    """Each variant of the decode row beside SDPA's cuDNN, alternated over args.rounds rounds."""
    batch, heads_q, head_dim = 8, 32, 128
    forms = _variant_rows(args.variants, head_dim)
    print("Hk      Sk  variant                               splits  GPU us (median of rounds)  "
          "TB/s  cuDNN/this")
    for heads_k in args.heads_k:
        for seqlen in args.seqlens:
            q, k, v, lengths = _decode_inputs(batch, heads_q, heads_k, seqlen, head_dim)
            kv_bytes = 2 * k.numel() * k.element_size()
            cudnn = _sdpa_decode("cudnn", gqa=heads_k != heads_q)
            times = {"cuDNN": []} | {name: [] for name, _, _, _ in forms}
            splits = {}
            for _ in range(args.rounds):
                times["cuDNN"].append(timer(lambda: cudnn(q, k, v)))
                for label, base, row, defines in forms:
                    _use_row(base, row, defines)
                    times[label].append(timer(lambda: xattn.attention_with_kvcache(
                        q, k, v, cache_seqlens=lengths, causal=False)))
                    splits[label] = kvcache._plan("bfloat16", 0, batch, heads_q, heads_k, 1, seqlen,
                                                  head_dim, (-1, -1))[3]
                    _use_row(row, base, {})
            peer = statistics.median(times["cuDNN"])
            for label, ts in times.items():
                ms = statistics.median(ts)
                print(f"{heads_k:2} {seqlen:7}  {label:36} {splits.get(label, '-'):>6}  {ms * 1e3:9.1f} "
                      f"({' '.join(f'{t * 1e3:.0f}' for t in ts)})  {kv_bytes / ms / 1e9:5.2f}  "
                      f"{peer / ms:5.3f}", flush=True)
            q = k = v = None
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--heads-k", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--paged", type=int, nargs="+", default=[0])
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    timer = _timer()
    if args.variants:
        main_variants(args, timer)
        return
    batch, heads_q, head_dim = 8, 32, 128
    src = torch.empty(2**31, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    print(f"# device copy: {2 * src.numel() * 2 / ms / 1e9:.2f} TB/s (read + write of 4 GiB)", flush=True)
    src = dst = None  # freed before the decode shapes
    print("cache    Hk      Sk  L2  page  splits  GPU us  TB/s  host us/call  (splits 0*: the planner's choice)")
    for heads_k in args.heads_k:
        for seqlen in args.seqlens:
            q, k, v, lengths = _decode_inputs(batch, heads_q, heads_k, seqlen, head_dim)
            gen = torch.Generator().manual_seed(0)
            forms = [(fp8, page) for fp8 in ([False, True] if args.fp8 else [False])
                     for page in args.paged]
            for fp8, page in forms:
                name = "fp8" if fp8 else "bf16"
                if fp8 or page:
                    kc, vc, table, ks, vs = _decode_caches(k, v, page, fp8, gen)
                else:
                    kc, vc, table, ks, vs = k, v, None, None, None
                kv_bytes = 2 * kc.numel() * kc.element_size()
                for prefetch, splits in itertools.product(args.prefetch, args.splits):
                    kvcache._FORCED_SPLITS = splits
                    kvcache.L2_PREFETCH = prefetch
                    kvcache.num_splits.cache_clear()
                    kvcache._plans.clear()  # plans hold their split count and kernels

                    def call():
                        return xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths,
                                                            causal=False, block_table=table,
                                                            k_scale=ks, v_scale=vs)
                    ms = timer(call)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    calls = 200 if ms < 1 else 20
                    for _ in range(calls):
                        call()
                    host_us = (time.perf_counter() - start) / calls * 1e6
                    torch.cuda.synchronize()
                    chosen = kvcache._plan("bfloat16", 0, batch, heads_q, heads_k, 1, seqlen,
                                           head_dim, (-1, -1))[3]
                    print(f"{name:5} {heads_k:5} {seqlen:7} {prefetch:3} {page:5} "
                          f"{splits or chosen:7}"
                          f"{'*' if not splits else ' '} {ms * 1e3:7.1f} {kv_bytes / ms / 1e9:5.2f} "
                          f"{host_us:12.1f}", flush=True)
                kc = vc = table = None
            q = k = v = None
            torch.cuda.empty_cache()
    kvcache._FORCED_SPLITS = 0
    kvcache.L2_PREFETCH = 0


if __name__ == "__main__":
    main()
