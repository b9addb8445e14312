"""Ring attention across the ranks of a torch.distributed group, on xattn's kernels.

    shard = zigzag_shard(x, rank, world)           # (B, H, S, D) -> this rank's (B, H, 2S/2N, D)
    out = ring_attention(q_shard, k_shard, v_shard, causal=True, group=None)   # differentiable
    full = zigzag_unshard(out_shard, group)        # all ranks' shards back in sequence order

The sequence is cut into 2N chunks of equal length (N = world size) and rank r holds chunks r
and 2N-1-r ("zigzag"), so under a causal mask every rank does the same work: with K/V from
rank s, rank r computes
  s == r: causal attention of its two chunks over its two chunks (their order is kept),
  s <  r: all its queries against the first K/V chunk of s (the second lies in its future),
  s >  r: its second query chunk against both K/V chunks of s (its first chunk sees neither).
Without causal every step is all queries against all keys (the zigzag order is then only a
permutation, harmless).

Forward: K and V travel round the ring (send to r+1, receive from r-1) while the current block
is computed; the partial outputs are merged by their log-sum-exp in float32
(out = Σ exp(lse_j - lse) out_j, lse = log Σ exp lse_j). Backward: dQ accumulates locally; dK
and dV travel with their K/V block, one step behind, each rank adding its share in float32,
and a last step hands every block's gradients back to its owner. Each block's backward is
xattn's backward kernels given the merged out and lse (P = exp(S - lse) is exact per block),
so nothing is recomputed beyond what FlashAttention-2's backward always does. Point-to-point
transfers (torch.distributed.batch_isend_irecv) are started before the block's kernels and
waited for after them, the gradient sums too (those sent at the end of one step are waited for
after the next step's kernels): communication overlaps compute. Works for any world size (1
included) and any backend torch.distributed has (NCCL on GPUs, gloo on the CPU, where xattn runs
its reference backend).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["ring_attention", "zigzag_shard", "zigzag_unshard", "merge"]


# --------------------------------------------------------------------------------- sharding

def zigzag_shard(x: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s chunks r and 2N-1-r of x along `dim` (its length a multiple of 2N)."""
    if x.shape[dim] % (2 * world):
        raise ValueError(f"x: expected a sequence length divisible by 2 * world size = "
                         f"{2 * world}, got {x.shape[dim]}")
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shard: torch.Tensor, group=None, dim: int = 2) -> torch.Tensor:
    """Every rank's zigzag shard gathered back into sequence order (all_gather)."""
    world = dist.get_world_size(group)
    shards = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(shards, shard.contiguous(), group=group)
    chunks = [None] * (2 * world)
    for rank, part in enumerate(shards):
        chunks[rank], chunks[2 * world - 1 - rank] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


# ------------------------------------------------------------------------------------ merge

def merge(out, lse, block_out, block_lse):
    """Fold one block's (out, lse) into the running float32 (out, lse), in place where the
    running ones are views (their slices for half-query blocks). Rows with lse -inf on both
    sides (no key seen yet) stay 0 / -inf instead of NaN."""
    new_lse = torch.logaddexp(lse, block_lse.float())
    seen = torch.isfinite(new_lse)
    old_weight = torch.where(seen, torch.exp(lse - new_lse), 0.0).unsqueeze(-1)
    block_weight = torch.where(seen, torch.exp(block_lse.float() - new_lse), 0.0).unsqueeze(-1)
    out.copy_(out * old_weight + block_out.float() * block_weight)
    lse.copy_(new_lse)


# ------------------------------------------------------------------------------------ ring

class _Ring:
    """Send a list of tensors to rank r+1 and receive same-shaped ones from r-1, asynchronously."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        def global_rank(rank):
            return rank if group is None else dist.get_global_rank(group, rank)
        self.next = global_rank((self.rank + 1) % self.world)
        self.prev = global_rank((self.rank - 1) % self.world)

    def start(self, tensors):
        if self.world == 1:  # the ring of one: what is sent is what comes back
            return list(tensors), []
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received]
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(requests):
        for request in requests:
            request.wait()


def _block(rank: int, source: int, causal: bool, length: int):
    """(query slice, key slice, causal) of the work of `rank` against K/V from `source`, in
    local rows of length 2c: see the module docstring."""
    everything = slice(0, length)
    if not causal:
        return everything, everything, False
    half = length // 2
    if source == rank:
        return everything, everything, True
    if source < rank:
        return everything, slice(0, half), False
    return slice(half, length), everything, False


def _forward(q, k, v, causal, scale, group):
    import xattn
    ring = _Ring(group)
    length = q.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    kv = (k, v)
    for step in range(ring.world):
        pending = ring.start(kv) if step < ring.world - 1 else None
        rows, keys, block_causal = _block(ring.rank, (ring.rank - step) % ring.world, causal,
                                          length)
        block_out, block_lse = xattn.attention(
            q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], causal=block_causal,
            scale=scale, return_lse=True)
        merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
        if pending is not None:
            kv, requests = pending
            ring.wait(requests)
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, causal, scale, group, deterministic):
    from xattn.integrations import _torch_backward
    ring = _Ring(group)
    length = q.shape[2]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = (k, v)
    dkv_pending = None  # (the float32 (dk, dv) sums of the block in hand, their transfer)
    for step in range(ring.world):
        # K/V move on one step ahead; their gradients follow one step behind.
        pending = ring.start(kv) if step < ring.world - 1 else None
        rows, keys, block_causal = _block(ring.rank, (ring.rank - step) % ring.world, causal,
                                          length)
        grads = _torch_backward.backward(
            dout[:, :, rows], q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys],
            out[:, :, rows], lse[:, :, rows], layout="bhsd", causal=block_causal, scale=scale,
            deterministic=deterministic)
        dq[:, :, rows] += grads[0]
        # The sums of this block's gradients, as the ranks before this one left them, were sent
        # during the kernels above: wait for them only now, so the transfer overlaps the compute.
        if dkv_pending is None:
            dkv = tuple(torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in kv)
        else:
            dkv, requests = dkv_pending
            ring.wait(requests)
        dkv[0][:, :, keys] += grads[1]
        dkv[1][:, :, keys] += grads[2]
        # Hand them on to r+1, which holds the block next step; the last send brings every
        # block home (rank r ends with the block of r+1).
        dkv_pending = ring.start(dkv)
        if pending is not None:
            kv, requests = pending
            ring.wait(requests)
    dkv, requests = dkv_pending
    ring.wait(requests)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, deterministic):
        out, lse = _forward(q, k, v, causal, scale, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, scale, group, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, group, deterministic = ctx.options
        return (*_backward(dout, q, k, v, out, lse, causal, scale, group, deterministic),
                None, None, None, None)


def ring_attention(q, k, v, *, causal: bool, group=None, scale=None, deterministic=False):
    """Attention of this rank's zigzag shard of the queries over the whole sequence's keys.

    q (B, Hq, 2c, D), k and v (B, Hk, 2c, D): this rank's chunks r and 2N-1-r of the full
    (B, H, 2Nc, D) tensors (zigzag_shard), torch tensors on this rank's device; GQA as in
    xattn.attention. Returns this rank's shard of the output; differentiable (dk and dv of a
    shard come back to the rank that holds it). scale defaults to 1/sqrt(D).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError(f"{name}: expected a 4-d torch tensor (B, H, S, D), got "
                            f"{type(x).__name__} of shape {getattr(x, 'shape', None)}")
    if q.shape[2] != k.shape[2] or k.shape != v.shape or q.shape[2] % 2:
        raise ValueError(f"q, k, v: expected shards of one even length (zigzag_shard), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _RingAttention.apply(q, k, v, causal, float(scale), group, deterministic)
