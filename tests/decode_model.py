"""The split-KV decode of one GQA group, driven through a matrix-core model of one decode block
(tests/test_hip_mfma_layout.py's for MFMA, tests/test_hip_wmma_layout.py's for WMMA) and checked
against a float64 oracle: the problem, the splits, the merge's formula and the oracle live here
once; each layout test passes its own `decode_block`."""

from __future__ import annotations

import numpy as np


def check_split_decode(decode_block, cfg, splits: int, seed: int) -> None:
    """decode_block(cfg, q_rows, k, v, visible, tiles) -> (out, lse2) of one block: a group of 5
    heads x 3 tokens (15 rows), a causal sliding window bottom-right aligned with Sk whose left
    edge falls inside a tile, a last tile past the keys, the key tiles split into `splits` runs
    whose partials flash_decode_merge's formula combines. Each row must get softmax(q k^T) v in
    base 2 (scale_log2 = 1) and its LSE, as the oracle gives them."""
    rng = np.random.default_rng(seed)
    heads_per_kv, seqlen_q, d = 5, 3, cfg.head_dim
    seqlen_k = 3 * cfg.block_n + 7  # the last tile crosses the end of the keys
    left = 2 * cfg.block_n + 3      # the window's left edge inside a tile
    rows = heads_per_kv * seqlen_q
    q = rng.standard_normal((heads_per_kv, seqlen_q, d)) * 0.3
    k, v = rng.standard_normal((seqlen_k, d)), rng.standard_normal((seqlen_k, d))
    q_rows = q.reshape(rows, d)  # row r = head-in-group * Sq + token (load_q_rows)
    token = np.arange(rows) % seqlen_q
    diag = token + seqlen_k - seqlen_q  # bottom-right aligned
    key = np.arange(seqlen_k)
    visible = (key[None, :] <= diag[:, None]) & (key[None, :] >= diag[:, None] - left)

    first = max(0, (seqlen_k - seqlen_q - left)) // cfg.block_n  # key_tiles of tokens 0..Sq-1
    last = -(-seqlen_k // cfg.block_n)
    per_split = -(-(last - first) // splits)
    parts = [decode_block(cfg, q_rows, k, v, visible, range(first + s * per_split,
                                                            min(last, first + (s + 1) * per_split)))
             for s in range(splits)]
    lse2 = np.stack([lse for _, lse in parts])  # flash_decode_merge_portable's formula
    total = np.log2(np.exp2(lse2 - lse2.max(axis=0)).sum(axis=0)) + lse2.max(axis=0)
    out = sum(np.exp2(lse - total)[:, None] * o for o, lse in parts)

    scores = np.where(visible, q_rows @ k.T, -np.inf)
    want_lse2 = np.log2(np.exp2(scores - scores.max(axis=1, keepdims=True)).sum(axis=1)) + scores.max(axis=1)
    want = np.exp2(scores - want_lse2[:, None]) @ v
    np.testing.assert_allclose(total, want_lse2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
