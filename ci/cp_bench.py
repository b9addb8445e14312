"""Per-GPU efficiency of context-parallel attention, forward + backward, xattn vs SDPA's own.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        torchrun --nproc-per-node 2 ci/cp_bench.py [--tokens-per-gpu 32768 131072] [--iters 3]

One attention layer, B=1, 16 heads, D=128, bfloat16. For L tokens per GPU and N ranks:
T1 = one GPU, full sequence L (each rank runs it on its own GPU; rank 0's time is reported),
Tcp = PyTorch's context_parallel over N GPUs, full sequence N·L (zigzag load balancing when
causal). Each GPU does N times the work of the one-GPU run (N·L queries / N ranks × N·L keys),
so efficiency = N·T1 / Tcp (1.0 = perfect). The same three implementations behind SDPA in one
process: xattn (activated), torch's FlashAttention-2 and cuDNN, and xattn's own ring
(xattn.distributed.ring_attention, "ring"). Times: median of --iters steps
after one warm-up, CUDA events, ranks synchronized before each step. Rows are printed as they
finish (a time limit keeps what is done).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist

from cp_common import (IMPLS, cp_forward_backward, implementation, ring_forward_backward, setup,
                       single_forward_backward)

HEADS, HEAD_DIM = 16, 128


def timed(step, iters):
    """Median seconds of `iters` steps after one warm-up, and the bytes the step itself allocated
    at its peak on this rank (beyond what was allocated before: the harness's inputs)."""
    times = []
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for i in range(iters + 1):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if i:  # the first is the warm-up (compiles, allocator growth)
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() - before


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens-per-gpu", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    args = parser.parse_args()
    rank, world, mesh = setup()
    if rank == 0:
        print(f"# {torch.cuda.get_device_name()} x{world}, torch {torch.__version__}, B=1 "
              f"H={HEADS} D={HEAD_DIM} bf16, fwd+bwd, median of {args.iters}", flush=True)
        print("| tokens/GPU | causal | impl | T1 (s) | Tcp (s) | per-GPU efficiency "
              "| step peak KiB/token 1 GPU | step peak KiB/token CP |", flush=True)
        print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    per_token = {}  # causal -> peak bytes per local token of xattn on 1 GPU, and of its ring
    for tokens in args.tokens_per_gpu:
        for causal in (True, False):
            g = torch.Generator().manual_seed(0)
            full = [torch.randn(1, HEADS, world * tokens, HEAD_DIM, generator=g).to(
                "cuda", torch.bfloat16) for _ in range(4)]  # q, k, v, dout
            local = [t[:, :, :tokens].contiguous() for t in full]
            for impl in args.impls:
                try:
                    with implementation(impl):
                        t1, peak1 = timed(lambda: single_forward_backward(*local, causal),
                                          args.iters)
                        if impl == "ring":
                            tcp, peakcp = timed(lambda: ring_forward_backward(*full, causal,
                                                                      unshard=False), args.iters)
                        else:
                            tcp, peakcp = timed(lambda: cp_forward_backward(mesh, *full, causal,
                                                                    unshard=False), args.iters)
                    row = (f"{t1:.4f} | {tcp:.4f} | {world * t1 / tcp:.3f} | "
                           f"{peak1 / tokens / 1024:.1f} | {peakcp / tokens / 1024:.1f}")
                    if impl == "ring":  # + q, k, v, dout of the rank's own tokens
                        inputs = 4 * HEADS * HEAD_DIM * 2
                        per_token[causal] = (peak1 / tokens + inputs, peakcp / tokens + inputs)
                except Exception as error:
                    row = f"- | - | {type(error).__name__}: {str(error)[:120]} | - | -"
                    torch.cuda.empty_cache()
                if rank == 0:
                    print(f"| {tokens} | {causal} | {impl} | {row} |", flush=True)
            del full, local
            torch.cuda.empty_cache()
    if rank == 0 and per_token:
        # Attention's memory is linear in the sequence (no S x S matrix), so the longest trainable
        # sequence follows from the measured peak per token; extrapolated, not run (a step at
        # millions of tokens takes minutes of GPU time).
        capacity = torch.cuda.get_device_properties(0).total_memory
        for causal, (one, ring) in per_token.items():
            print(f"# longest trainable, causal={causal} (extrapolated from the measured peak "
                  f"bytes per token): 1 GPU ~{capacity / one / 1e6:.2f}M tokens "
                  f"({one / 1024:.1f} KiB/token), {world} GPUs ~"
                  f"{world * capacity / ring / 1e6:.2f}M ({ring / 1024:.1f} KiB/token)",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
