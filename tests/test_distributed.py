"""xattn.distributed.ring_attention on the CPU: zigzag sharding, the log-sum-exp merge and the
ring itself over gloo, against xattn.attention on the whole sequence (reference backend).

* The work plan: over all ranks and ring steps, every (query, key) pair of the full sequence
  that the mask allows is computed exactly once, and no other (causal and not, N = 1..5).
* merge: two blocks' (out, lse) merged equal attention over the concatenated keys, also with
  rows that see no key in one block or in both.
* The ring: N = 1, 2, 3 processes (gloo), causal and not, GQA, forward and backward, gathered
  with zigzag_unshard, against single-process xattn.attention + autograd in float32.
The NCCL run on GPUs is ci/cp_test.py's job; this file checks the algorithm.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import xattn  # noqa: E402
from xattn import distributed  # noqa: E402

from tolerances import TOLERANCES  # noqa: E402


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_every_allowed_pair_is_computed_exactly_once(world, causal):
    c = 3
    positions = torch.arange(2 * world * c)[None, None, :, None]
    count = np.zeros((2 * world * c, 2 * world * c), dtype=int)
    for rank in range(world):
        q_pos = distributed.zigzag_shard(positions, rank, world)[0, 0, :, 0]
        for step in range(world):
            source = (rank - step) % world
            k_pos = distributed.zigzag_shard(positions, source, world)[0, 0, :, 0]
            rows, keys, block_causal = distributed._block(rank, source, causal, 2 * c)
            qs, ks = q_pos[rows].numpy(), k_pos[keys].numpy()
            allowed = np.ones((len(qs), len(ks)), dtype=bool)
            if block_causal:  # bottom-right over the block, as xattn's causal
                allowed = np.tril(allowed, k=len(ks) - len(qs))
            count[np.ix_(qs, ks)] += allowed
    want = np.tril(np.ones_like(count)) if causal else np.ones_like(count)
    np.testing.assert_array_equal(count, want)


def test_merge_equals_attention_over_concatenated_keys():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 8, generator=g)
    k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(2))
    # Causal with Sq < Sk so that the first key block is empty for some rows of the second.
    want, want_lse = xattn.attention(q, k, v, return_lse=True)
    out = torch.zeros(q.shape)
    lse = torch.full(q.shape[:3], float("-inf"))
    distributed.merge(out, lse, *xattn.attention(q, k[:, :, 4:], v[:, :, 4:], return_lse=True))
    distributed.merge(out, lse, *xattn.attention(q, k[:, :, :4], v[:, :, :4], return_lse=True))
    assert (out - want).norm() <= TOLERANCES["out"]["float32"] * want.norm()
    tolerance = TOLERANCES["lse"]["float32"]
    torch.testing.assert_close(lse, want_lse, rtol=tolerance, atol=tolerance)
    # A block no row sees leaves 0 / -inf, never NaN.
    empty_out = torch.zeros(q.shape)
    empty_lse = torch.full(q.shape[:3], float("-inf"))
    distributed.merge(empty_out, empty_lse, torch.zeros(q.shape), torch.full(q.shape[:3],
                                                                              float("-inf")))
    assert (empty_out == 0).all() and (empty_lse == float("-inf")).all()


CASES = [(True, 4), (False, 4), (True, 2)]  # (causal, Hk) with Hq = 4: MHA and GQA


def _ring_worker(rank, world, init_file, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        errors = {}
        for causal, hk in CASES:
            g = torch.Generator().manual_seed(0)
            seq = 2 * world * 5
            q = torch.randn(2, 4, seq, 16, generator=g)
            k, v = (torch.randn(2, hk, seq, 16, generator=g) for _ in range(2))
            dout = torch.randn(2, 4, seq, 16, generator=g)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            want = xattn.attention(*leaves, causal=causal)
            want.backward(dout)
            shards = [distributed.zigzag_shard(t, rank, world).requires_grad_()
                      for t in (q, k, v)]
            out = distributed.ring_attention(*shards, causal=causal)
            out.backward(distributed.zigzag_shard(dout, rank, world))
            gots = [distributed.zigzag_unshard(t.detach())
                    for t in (out, *(s.grad for s in shards))]
            wants = [want.detach()] + [t.grad for t in leaves]
            errors[causal, hk] = [float((a - b).norm() / b.norm()) for a, b in zip(gots, wants)]
        if rank == 0:
            torch.save(errors, results)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ring_attention_equals_one_process(world):
    """Causal and not, MHA and GQA, in one group of `world` processes."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "errors.pt")
        mp.spawn(_ring_worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world,
                 join=True)
        errors = torch.load(results)
    assert set(errors) == set(CASES)
    for case, (out_error, *grad_errors) in errors.items():
        assert out_error <= TOLERANCES["out"]["float32"], (case, out_error)
        assert all(e <= TOLERANCES["grad_plain"]["float32"] for e in grad_errors), (case,
                                                                                   grad_errors)
