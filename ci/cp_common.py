"""Shared by ci/cp_test.py and ci/cp_bench.py: PyTorch context parallelism (CP) over one
process group, and the attention implementation behind it.

`context_parallel` shards the sequence of the given buffers across the ranks (head-tail
"zigzag" load balancing when causal: rank r holds chunks r and 2N-1-r of 2N) and makes
F.scaled_dot_product_attention a ring over the aten SDPA ops, which, with
`torch.nn.attention.activate_flash_attention_impl("xattn")`, run on xattn's kernels.
PyTorch's ring requires load balancing off for non-causal attention, hence _load_balance().
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import xattn  # noqa: E402,F401  (registers "xattn" with torch.nn.attention)

# What runs the attention: PyTorch's CP over SDPA on xattn, on torch's FA2, on cuDNN; and
# xattn's own ring (xattn.distributed.ring_attention; its one-GPU runs go through SDPA on xattn).
IMPLS = ("xattn", "flash", "cudnn", "ring")


def setup():
    """(rank, world size, device mesh); one GPU per process, NCCL."""
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
        if os.environ.get(name) is None:
            raise SystemExit(f"{name} must be set (NVLink multicast stays off): run with "
                             f"NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    from torch.distributed.device_mesh import init_device_mesh
    return rank, world, init_device_mesh("cuda", (world,))


@contextlib.contextmanager
def implementation(name: str):
    """SDPA's flash backend on xattn, SDPA's flash backend on torch's FA2, or cuDNN."""
    from torch.nn.attention import (SDPBackend, activate_flash_attention_impl,
                                    restore_flash_attention_impl, sdpa_kernel)
    if name in ("xattn", "ring"):
        activate_flash_attention_impl("xattn")
    backend = SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION
    try:
        with sdpa_kernel(backend):
            yield
    finally:
        if name in ("xattn", "ring"):
            restore_flash_attention_impl()


@contextlib.contextmanager
def _load_balance(enabled: bool):
    from torch.distributed.tensor.experimental._attention import _cp_options
    old = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = enabled
    try:
        yield
    finally:
        _cp_options.enable_load_balance = old


def sdpa(q, k, v, causal):
    # Looked up at call time: context_parallel patches torch.nn.functional's attribute.
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def cp_forward_backward(mesh, q, k, v, dout, causal, *, unshard=True):
    """One context-parallel forward + backward of SDPA on full-sequence (B, H, S, D) tensors
    that every rank holds alike. Returns (out, dq, dk, dv), gathered back to full sequences in
    the original order when `unshard`, else this rank's shards."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    buffers = [t.detach().clone() for t in (q, k, v, dout)]
    with _load_balance(causal):
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2]):
            ql, kl, vl = (t.detach().requires_grad_() for t in buffers[:3])
            out = sdpa(ql, kl, vl, causal)
            out.backward(buffers[3])
        results = [out.detach(), ql.grad, kl.grad, vl.grad]
        if unshard:
            results = context_parallel_unshard(mesh, results, [2, 2, 2, 2])
    return results


def ring_forward_backward(q, k, v, dout, causal, *, unshard=True):
    """The same step through xattn.distributed.ring_attention over the default group."""
    from xattn import distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = [distributed.zigzag_shard(t, rank, world).requires_grad_() for t in (q, k, v)]
    out = distributed.ring_attention(*shards, causal=causal)
    out.backward(distributed.zigzag_shard(dout, rank, world))
    results = [out.detach()] + [t.grad for t in shards]
    return [distributed.zigzag_unshard(t) for t in results] if unshard else results


def single_forward_backward(q, k, v, dout, causal):
    """The same step on one GPU through SDPA (whatever `implementation` is active)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = sdpa(*leaves, causal)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]
