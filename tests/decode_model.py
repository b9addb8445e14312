"""The split-KV decode of one GQA group, driven through a matrix-core model of one decode block
(tests/test_hip_mfma_layout.py's for MFMA, tests/test_hip_wmma_layout.py's for WMMA) and checked
against a float64 oracle: the problem, the splits, the merge's formula and the oracle live here
once; each layout test passes its own `decode_block`."""

from __future__ import annotations

from typing import Callable, NamedTuple

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


class MatrixCore(NamedTuple):
    """What one matrix-core family gives the decode model (its layout test builds it):
    lanes and columns (the group rows a wave holds, padded), floats per lane of one accumulator
    block, the kernels' index functions F (acc_row, acc_col), the LDS row padding, and the three
    products as the kernel issues them: q_frags(lds, stride, d) -> Q's operand fragments,
    scores(lds, stride, n, q_frags) -> S^T blocks, pv(lds, stride, d, p) -> O^T blocks."""
    lanes: int
    columns: int
    per_lane: int
    F: dict
    pad: int
    q_frags: Callable
    scores: Callable
    pv: Callable


def decode_block(core: MatrixCore, lds, cfg, q_rows, k, v, visible, tiles):
    """One decode block (one wave) through a matrix-core model: the group's rows (head-in-group x
    token, padded with zero rows to core.columns) against the key tiles `tiles`, scores of
    invisible keys (visible[row, key] False, or past the keys) at -inf, the online softmax per
    lane with lane ^ (lanes / 2) holding the same row's other keys; returns the rows' O / l and
    base-2 LSE (scale_log2 = 1) as the epilogue writes them: element j of block b of lane l at
    dim acc_row(l, b, j) of row acc_col(l). lds(x, stride): x as the LDS tile the kernel reads."""
    F, lanes = core.F, core.lanes
    d, n, rows = cfg.head_dim, cfg.block_n, q_rows.shape[0]
    kq_stride, vt_stride = d + core.pad, n + core.pad
    q_pad = np.zeros((core.columns, d))
    q_pad[:rows] = q_rows
    q_frag = core.q_frags(lds(q_pad, kq_stride), kq_stride, d)
    acc_o = [np.zeros((lanes, core.per_lane)) for _ in range(d // (lanes // 2))]
    row_max, row_sum = np.full(lanes, -np.inf), np.zeros(lanes)
    partner = np.arange(lanes) ^ (lanes // 2)
    for tile in tiles:
        keys = np.arange(tile * n, tile * n + n)
        k_tile, v_tile = np.zeros((n, d)), np.zeros((n, d))  # zeros past the keys (load_tile)
        live = keys < k.shape[0]
        k_tile[live], v_tile[live] = k[keys[live]], v[keys[live]]
        acc_s = core.scores(lds(k_tile, kq_stride), kq_stride, n, q_frag)
        for nb, block in enumerate(acc_s):  # modify_scores: the lane's row is its column
            for lane in range(lanes):
                row = F["acc_col"](lane)
                for j in range(core.per_lane):
                    key = tile * n + F["acc_row"](lane, nb, j)
                    if key >= k.shape[0] or row >= rows or not visible[row, key]:
                        block[lane, j] = -np.inf
        m_lane = np.max([blk.max(axis=1) for blk in acc_s], axis=0)
        m_new = np.maximum(row_max, np.maximum(m_lane, m_lane[partner]))
        empty = m_new == -np.inf
        offset = np.where(empty, 0.0, m_new)
        alpha = np.where(empty, 1.0, np.exp2(row_max - offset))
        row_max = m_new
        p = [np.exp2(blk - offset[:, None]) for blk in acc_s]
        row_sum = row_sum * alpha + sum(blk.sum(axis=1) for blk in p)
        pv = core.pv(lds(v_tile.T.copy(), vt_stride), vt_stride, d, p)
        acc_o = [o * alpha[:, None] + x for o, x in zip(acc_o, pv)]
    l = row_sum + row_sum[partner]
    out, lse2 = np.full((rows, d), np.nan), np.full(rows, np.nan)
    for lane in range(lanes):
        row = F["acc_col"](lane)
        if row >= rows:
            continue  # padded rows write nothing
        lse2[row] = row_max[lane] + np.log2(l[lane]) if l[lane] != 0 else -np.inf
        for blk, block in enumerate(acc_o):
            for j in range(core.per_lane):
                out[row, F["acc_row"](lane, blk, j)] = block[lane, j] / l[lane] if l[lane] != 0 else 0.0
    assert not np.isnan(out).any() and not np.isnan(lse2).any(), "some dim or row never written"
    return out, lse2
