"""NumPy attention on the host: exact float64 oracles and the tiled FlashAttention algorithms.

Forward: exact_attention_bhsd (oracle) and flash_attention_forward (tiled). Backward:
exact_attention_grad_bhsd (oracle) and flash_attention_backward (tiled, FlashAttention-2).

All functions take arrays in the "bhsd" layout: q is (B, Hq, Sq, D), k and v are
(B, Hk, Sk, D), any strides. Query head h reads key/value head h // (Hq // Hk) (GQA).

Masking rule shared with the GPU kernels (everything is bottom-right aligned, o = Sk - Sq):
query i sees key j  iff  i + o - left <= j <= i + o + right, where window = (left, right) and
-1 means unbounded; causal is right = 0. A row that sees no key has output 0 and log-sum-exp
-inf. The LSE is natural log (base e).

Score modifiers, applied in this order to s = scale * q.k (flash-attn's order):
softcap c > 0: s <- c * tanh(s / c);  ALiBi slope m (per query head, or per batch and head):
s <- s - m * |i + o - j|.

Attention sinks (GPT-OSS): sinks = float (Hq,) logits, one per query head. Each row's softmax
gains one more term exp(sink_h) in its denominator, as if a key with score sink_h and value 0
were visible to every row: the sink takes probability mass and adds nothing to the output. The
lse includes it (a row that sees no key then has lse = sink_h and output 0). Its gradient is
dsink_h = -sum over the rows of head h of exp(sink_h - lse) * delta, delta = rowsum(dO * O).
"""

from __future__ import annotations

import numpy as np

# Tile sizes of the tiled forward. Large tiles amortize NumPy's per-call overhead; the score
# tile is B * Hq * BLOCK_M * BLOCK_N elements, independent of Sq and Sk.
BLOCK_M = 256
BLOCK_N = 512
# Upper bound on score-tile elements (64 MiB in float32): batch and heads are processed in
# chunks so that many heads do not turn the O(block) tile into gigabytes.
TILE_ELEMENTS = 1 << 24


UNBOUNDED = (-1, -1)


def key_bounds(causal: bool, window, sq: int, sk: int) -> tuple[float, float]:
    """(lo, hi): query i sees key j iff i + lo <= j <= i + hi (infinite where unbounded)."""
    left, right = window
    if causal:
        right = 0
    offset = sk - sq
    lo = offset - left if left >= 0 else -np.inf
    hi = offset + right if right >= 0 else np.inf
    return lo, hi


def visible_keys(sq: int, sk: int, causal: bool, window=UNBOUNDED, q_start: int = 0,
                 q_end=None, k_start: int = 0, k_end=None) -> np.ndarray:
    """Boolean matrix [i, j] (rows q_start..q_end, keys k_start..k_end): does query i see key j."""
    q_end = sq if q_end is None else q_end
    k_end = sk if k_end is None else k_end
    lo, hi = key_bounds(causal, window, sq, sk)
    query = np.arange(q_start, q_end)[:, None]
    key = np.arange(k_start, k_end)[None, :]
    return (key >= query + lo) & (key <= query + hi)


def slopes_bh(alibi_slopes, batch: int, q_heads: int, dtype=np.float64):
    """ALiBi slopes as a (B, Hq) array, from (Hq,) or (B, Hq); None stays None."""
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes, dtype=dtype)
    return np.broadcast_to(slopes, (batch, q_heads)) if slopes.ndim == 1 else slopes


def modify_scores(scores, *, softcap: float, slopes, sq: int, sk: int, q_start: int = 0,
                  k_start: int = 0):
    """Softcap, then ALiBi, on scaled scores (B, Hq, rows, cols) in place; returns the tanh
    of the softcap (needed by the backward) or None. slopes: (B, Hq) or None."""
    tanh = None
    if softcap:
        tanh = np.tanh(scores / softcap)
        np.multiply(tanh, softcap, out=scores)
    if slopes is not None:
        rows, cols = scores.shape[-2:]
        query = np.arange(q_start, q_start + rows)[:, None]
        key = np.arange(k_start, k_start + cols)[None, :]
        distance = np.abs(query + (sk - sq) - key).astype(scores.dtype)
        scores -= slopes[:, :, None, None].astype(scores.dtype) * distance
    return tanh


def _sink_column(sinks, batch: int, q_heads: int, sq: int):
    """The sinks as one more score column (B, Hq, Sq, 1) in float64."""
    sinks = np.asarray(sinks, dtype=np.float64)
    return np.broadcast_to(sinks[None, :, None, None], (batch, q_heads, sq, 1))


def exact_attention_bhsd(q, k, v, *, causal: bool, scale: float, window=UNBOUNDED,
                         softcap: float = 0.0, alibi_slopes=None, sinks=None):
    """The oracle: materialize softmax(scale * Q K^T) V in float64. Returns (out, lse).

    Deliberately naive: K and V are repeated for GQA and the full (Sq, Sk) score matrix is
    built, so that each line can be checked against the definition. With sinks, the sink
    logits are one more score column whose value row is zero.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, q_heads, sq, head_dim = q.shape
    sk = k.shape[2]
    group = q_heads // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)

    scores = scale * (q @ k.swapaxes(-1, -2))             # (B, Hq, Sq, Sk)
    modify_scores(scores, softcap=softcap, slopes=slopes_bh(alibi_slopes, batch, q_heads),
                  sq=sq, sk=sk)
    scores = np.where(visible_keys(sq, sk, causal, window), scores, -np.inf)
    if sinks is not None:  # the sink: one more column, all of whose values are zero
        scores = np.concatenate([scores, _sink_column(sinks, batch, q_heads, sq)], axis=-1)

    # Rows that see no key have max -inf; use 0 there so no -inf - -inf (NaN) appears.
    row_max = scores.max(axis=-1, initial=-np.inf)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - safe_max[..., None])
    row_sum = weights.sum(axis=-1)
    has_keys = row_sum != 0  # a NaN row sum stays NaN (NaN in, NaN out), never -inf
    with np.errstate(divide="ignore"):
        lse = np.where(has_keys, safe_max + np.log(row_sum), -np.inf)
    probabilities = weights / np.where(has_keys, row_sum, 1.0)[..., None]
    out = probabilities[..., :sk] @ v
    assert out.shape == (batch, q_heads, sq, head_dim)
    return out, lse


def flash_attention_forward(q, k, v, *, causal: bool, scale: float, window=UNBOUNDED,
                            softcap: float = 0.0, alibi_slopes=None, sinks=None, out=None,
                            lse=None, block_m: int = BLOCK_M, block_n: int = BLOCK_N):
    """FlashAttention forward (Dao et al., Algorithm 1 / FlashAttention-2 forward) in NumPy.

    For each block of BLOCK_M queries, K/V blocks of BLOCK_N keys stream past it while a
    running row max m_i and row sum l_i are kept; the output accumulator O is rescaled
    whenever m_i grows, and divided by l_i once at the end (after folding in the sink, a key
    of score sink_h and value 0, when sinks are given). Memory per query block is
    O(B * Hq * BLOCK_M * BLOCK_N), never O(Sq * Sk). Batch and heads are vectorized.

    Computes in float64 for float64 inputs and in float32 otherwise. `out` (B, Hq, Sq, D)
    and `lse` (B, Hq, Sq) may be given as destinations (any strides, any float dtype);
    otherwise they are allocated in the compute dtype. Returns (out, lse).
    """
    batch, q_heads, sq, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    compute = np.float64 if q.dtype == np.float64 else np.float32
    if out is None:
        out = np.empty((batch, q_heads, sq, head_dim), dtype=compute)
    if lse is None:
        lse = np.empty((batch, q_heads, sq), dtype=compute)
    slopes = slopes_bh(alibi_slopes, batch, q_heads, compute)
    sinks = None if sinks is None else np.asarray(sinks, dtype=compute)
    variant = dict(causal=causal, window=window, softcap=softcap)

    # Chunk (batch, kv head) pairs so one score tile stays within TILE_ELEMENTS.
    heads_per_chunk = max(1, TILE_ELEMENTS // (max(group, 1) * block_m * block_n))
    batch_per_chunk = max(1, heads_per_chunk // kv_heads)
    heads_per_chunk = min(heads_per_chunk, kv_heads)
    for b in range(0, batch, batch_per_chunk):
        batches = slice(b, b + batch_per_chunk)
        for h in range(0, kv_heads, heads_per_chunk):
            kv = slice(h, h + heads_per_chunk)
            qo = slice(h * group, (h + heads_per_chunk) * group)
            _forward_chunk(q[batches, qo], k[batches, kv], v[batches, kv],
                           out[batches, qo], lse[batches, qo], scale=scale,
                           slopes=None if slopes is None else slopes[batches, qo],
                           sinks=None if sinks is None else sinks[qo],
                           compute=compute, block_m=block_m, block_n=block_n, **variant)
    return out, lse


def _forward_chunk(q, k, v, out, lse, *, causal, window, softcap, slopes, sinks, scale, compute,
                   block_m, block_n):
    """flash_attention_forward on one chunk of batch entries and kv heads, writing out/lse."""
    batch, q_heads, sq, head_dim = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    group = q_heads // kv_heads

    # GQA without repeating K/V: view query heads as (kv_head, group) and fold the group into
    # the row dimension, so one (G*BLOCK_M, D) x (D, BLOCK_N) product serves a whole group.
    # Splitting one axis in two never needs a copy, so out/lse below are views of the caller's.
    q_grouped = q.reshape(batch, kv_heads, group, sq, head_dim)
    out_grouped = out.reshape(batch, kv_heads, group, sq, head_dim)
    lse_grouped = lse.reshape(batch, kv_heads, group, sq)

    # One score buffer reused by every tile: a fresh multi-megabyte array per tile costs more
    # in page faults than the matrix product that fills it.
    score_buffer = np.empty(batch * q_heads * min(block_m, sq) * min(block_n, sk), dtype=compute)

    lo, hi = key_bounds(causal, window, sq, sk)  # query i sees keys i + lo .. i + hi
    for q_start in range(0, sq, block_m):
        q_end = min(q_start + block_m, sq)
        rows = q_end - q_start

        # Q block, pre-scaled once so scores need no multiply: (B, Hk, G*rows, D).
        Q = np.multiply(q_grouped[:, :, :, q_start:q_end], scale, dtype=compute)
        Q = Q.reshape(batch, kv_heads, group * rows, head_dim)
        O = np.zeros((batch, kv_heads, group * rows, head_dim), dtype=compute)
        m_i = np.full((batch, kv_heads, group * rows), -np.inf, dtype=compute)
        l_i = np.zeros((batch, kv_heads, group * rows), dtype=compute)

        # Keys outside the band of this block's rows are skipped, not masked: the first query
        # sees no key before q_start + lo, the last none after q_end - 1 + hi.
        key_begin = int(max(0, q_start + lo))
        key_end = int(min(sk, q_end + hi))
        for k_start in range(key_begin, key_end, block_n):
            k_end = min(k_start + block_n, key_end)

            # Load the K/V tile in the compute dtype.
            K = k[:, :, k_start:k_end].astype(compute, copy=False)
            V = v[:, :, k_start:k_end].astype(compute, copy=False)

            # S = Q K^T: (B, Hk, G*rows, cols).
            cols = k_end - k_start
            S = score_buffer[:batch * q_heads * rows * cols].reshape(
                batch, kv_heads, group * rows, cols)
            np.matmul(Q, K.swapaxes(-1, -2), out=S)

            per_head = S.reshape(batch, q_heads, rows, cols)
            modify_scores(per_head, softcap=softcap, slopes=slopes, sq=sq, sk=sk,
                          q_start=q_start, k_start=k_start)
            # Mask only tiles that cross a band edge (the causal diagonal, the window's).
            if k_end - 1 > q_start + hi or k_start < q_end - 1 + lo:
                visible = visible_keys(sq, sk, causal, window, q_start, q_end, k_start, k_end)
                np.copyto(per_head, -np.inf, where=~visible)

            # Online softmax: new running max; rows that have seen no key keep m = -inf, and
            # use 0 as the shift there so exp(-inf - shift) = 0 instead of NaN.
            m_new = np.maximum(m_i, S.max(axis=-1))
            shift = np.where(m_new == -np.inf, 0.0, m_new).astype(compute, copy=False)
            alpha = np.exp(m_i - shift)           # rescale factor of the old state (0 if m_i = -inf)
            S -= shift[..., None]
            P = np.exp(S, out=S)                  # P = exp(S - m_new), in place
            l_i = alpha * l_i + P.sum(axis=-1)
            O *= alpha[..., None]
            O += np.matmul(P, V)                  # O += P V
            m_i = m_new

        if sinks is not None:  # the sink: one more key, of score sink_h and value 0
            sink = np.repeat(sinks.reshape(kv_heads, group), rows, axis=-1)  # (Hk, G*rows)
            m_new = np.maximum(m_i, sink)  # finite: the sink is
            l_i = l_i * np.exp(m_i - m_new) + np.exp(sink - m_new)
            O *= np.exp(m_i - m_new)[..., None]
            m_i = m_new

        # Epilogue: one division per row; rows that saw no key give O = 0 and lse = -inf.
        has_keys = l_i != 0  # NaN l_i (a NaN input) gives NaN, not an empty row's -inf
        O /= np.where(has_keys, l_i, 1.0)[..., None]
        with np.errstate(divide="ignore"):
            block_lse = np.where(has_keys, m_i + np.log(np.where(has_keys, l_i, 1.0)), -np.inf)
        out_grouped[:, :, :, q_start:q_end] = O.reshape(batch, kv_heads, group, rows, head_dim)
        lse_grouped[:, :, :, q_start:q_end] = block_lse.reshape(batch, kv_heads, group, rows)


# ---------------------------------------------------------------------------------- backward
#
# With P = softmax(S), S = scale * Q K^T and O = P V, the gradients for an upstream dO are
#   dV = P^T dO        dP = dO V^T        dS = P ∘ (dP - rowsum(P ∘ dP))
#   dQ = scale * dS K  dK = scale * dS^T Q
# and rowsum(P ∘ dP) = rowsum(dO ∘ O) (= delta), which FlashAttention-2 uses so that P is
# never needed as a whole. For GQA, dK and dV of a key head sum over its query heads.

# Tile sizes of the tiled backward: it holds P, dP and dS tiles (three times the forward's one
# score tile), so its tiles are smaller than the forward's.
BWD_BLOCK_M = 128
BWD_BLOCK_N = 256


def exact_attention_grad_bhsd(q, k, v, dout, *, causal: bool, scale: float,
                              window=UNBOUNDED, softcap: float = 0.0, alibi_slopes=None,
                              sinks=None):
    """The gradient oracle: (dq, dk, dv) in float64 from the materialized softmax, and with
    sinks (dq, dk, dv, dsinks), dsinks (Hq,).

    Deliberately naive, like exact_attention_bhsd: K and V are repeated for GQA, the full
    (Sq, Sk) probability matrix is built (plus the sink column, whose value row is zero, so
    its dP is zero), and delta is taken from its definition, rowsum(P ∘ dP), not from O (the
    tiled algorithm's shortcut).
    """
    q, k, v, dout = (np.asarray(a, dtype=np.float64) for a in (q, k, v, dout))
    batch, q_heads, sq, head_dim = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    group = q_heads // kv_heads if kv_heads else 0

    # P, from the forward oracle's own definition (rows that see no key are all zero).
    k_rep = np.repeat(k, group, axis=1)
    v_rep = np.repeat(v, group, axis=1)
    scores = scale * (q @ k_rep.swapaxes(-1, -2))
    tanh = modify_scores(scores, softcap=softcap, slopes=slopes_bh(alibi_slopes, batch, q_heads),
                         sq=sq, sk=sk)
    scores = np.where(visible_keys(sq, sk, causal, window), scores, -np.inf)
    if sinks is not None:  # the sink column (value zero)
        scores = np.concatenate([scores, _sink_column(sinks, batch, q_heads, sq)], axis=-1)
    row_max = scores.max(axis=-1, initial=-np.inf)
    weights = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0)[..., None])
    row_sum = weights.sum(axis=-1, keepdims=True)
    probabilities = weights / np.where(row_sum > 0, row_sum, 1.0)
    p_sink = probabilities[..., sk:]                              # (B, Hq, Sq, 1) or empty
    probabilities = probabilities[..., :sk]

    dv_rep = probabilities.swapaxes(-1, -2) @ dout                # dV = P^T dO
    dp = dout @ v_rep.swapaxes(-1, -2)                            # dP = dO V^T (the sink's: 0)
    delta = (probabilities * dp).sum(axis=-1, keepdims=True)      # rowsum(P ∘ dP)
    ds = probabilities * (dp - delta)
    if tanh is not None:
        ds *= 1 - tanh**2                                         # d(c tanh(s/c))/ds
    dq = scale * (ds @ k_rep)                                     # dQ = scale dS K
    dk_rep = scale * (ds.swapaxes(-1, -2) @ q)                    # dK = scale dS^T Q

    # GQA: key head h served query heads h*G .. h*G+G-1; its gradient is their sum.
    dk = dk_rep.reshape(batch, kv_heads, group, sk, head_dim).sum(axis=2)
    dv = dv_rep.reshape(batch, kv_heads, group, sk, head_dim).sum(axis=2)
    if sinks is None:
        return dq, dk, dv
    dsinks = (p_sink * (0.0 - delta)).sum(axis=(0, 2, 3))        # dS of the sink column
    return dq, dk, dv, dsinks


def flash_attention_backward(q, k, v, out, dout, lse, *, causal: bool, scale: float,
                             window=UNBOUNDED, softcap: float = 0.0, alibi_slopes=None,
                             sinks=None, dq=None, dk=None, dv=None, block_m: int = BWD_BLOCK_M,
                             block_n: int = BWD_BLOCK_N):
    """FlashAttention-2 backward (Dao 2023, Algorithm 2) in NumPy. Returns (dq, dk, dv), and
    with sinks (dq, dk, dv, dsinks).

    With sinks the forward's lse already includes them, so P = exp(S - lse) and dS are the
    same formulas (the sink's value is zero: its dP is zero); only dsinks is added,
    dsink_h = -sum_rows exp(sink_h - lse) * delta.

    q, out, dout: (B, Hq, Sq, D); k, v: (B, Hk, Sk, D); lse: (B, Hq, Sq), natural log, as
    the forward wrote it (-inf for rows that see no key). Any strides.

    Preprocess: delta_i = rowsum(dO_i ∘ O_i). Then, for each block of BLOCK_N keys (the outer
    loop, one thread block per key block on a GPU), the query blocks that can see it stream
    past: P is recomputed from Q, K and the saved LSE, dK_j and dV_j accumulate locally and
    are written once, and dQ_i accumulates across key blocks (atomics on a GPU; here a float
    accumulator in sequence, so results are deterministic). Never more than
    O(B * Hq * BLOCK_M * BLOCK_N) score-sized memory.

    Computes in float64 for float64 inputs and float32 otherwise. dq/dk/dv may be given as
    destinations (any strides, any float dtype); every element is written.
    """
    batch, q_heads, sq, head_dim = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    compute = np.float64 if q.dtype == np.float64 else np.float32
    if dq is None:
        dq = np.empty(q.shape, dtype=compute)
    if dk is None:
        dk = np.empty(k.shape, dtype=compute)
    if dv is None:
        dv = np.empty(v.shape, dtype=compute)
    dsinks = None if sinks is None else _sinks_grad(out, dout, lse, sinks, compute)
    if group == 0 or sq == 0 or sk == 0:
        # No query head, query or key: nothing flows to q, k, v.
        for grad in (dq, dk, dv):
            grad[...] = 0
        return (dq, dk, dv) if sinks is None else (dq, dk, dv, dsinks)

    slopes = slopes_bh(alibi_slopes, batch, q_heads, compute)
    variant = dict(causal=causal, window=window, softcap=softcap)
    heads_per_chunk = max(1, TILE_ELEMENTS // (group * block_m * block_n))
    batch_per_chunk = max(1, heads_per_chunk // kv_heads)
    heads_per_chunk = min(heads_per_chunk, kv_heads)
    for b in range(0, batch, batch_per_chunk):
        batches = slice(b, b + batch_per_chunk)
        for h in range(0, kv_heads, heads_per_chunk):
            kv = slice(h, h + heads_per_chunk)
            qo = slice(h * group, (h + heads_per_chunk) * group)
            _backward_chunk(q[batches, qo], k[batches, kv], v[batches, kv], out[batches, qo],
                            dout[batches, qo], lse[batches, qo], dq[batches, qo],
                            dk[batches, kv], dv[batches, kv], scale=scale,
                            slopes=None if slopes is None else slopes[batches, qo],
                            compute=compute, block_m=block_m, block_n=block_n, **variant)
    return (dq, dk, dv) if sinks is None else (dq, dk, dv, dsinks)


def _sinks_grad(out, dout, lse, sinks, compute):
    """dsink_h = -sum over (b, i) of exp(sink_h - lse[b, h, i]) * delta[b, h, i]: the sink is a
    key of value 0, so its dS is P_sink * (0 - delta). lse >= sink_h, so the exp is at most 1."""
    delta = np.einsum("bhsd,bhsd->bhs", dout.astype(compute, copy=False),
                      out.astype(compute, copy=False))
    sinks = np.asarray(sinks, dtype=compute)
    p_sink = np.exp(sinks[None, :, None] - np.asarray(lse, dtype=compute))
    return -(p_sink * delta).sum(axis=(0, 2))


def _backward_chunk(q, k, v, out, dout, lse, dq, dk, dv, *, causal, window, softcap, slopes,
                    scale, compute, block_m, block_n):
    """flash_attention_backward on one chunk of batch entries and kv heads."""
    batch, q_heads, sq, head_dim = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    group = q_heads // kv_heads

    def grouped_rows(x, q_start, q_end):
        # (B, Hq, rows, ...) -> (B, Hk, G*rows, ...): one key head's whole group as rows, so
        # one product serves the group and P^T dO / dS^T Q sum over it (GQA, no K/V repeat).
        rows = q_end - q_start
        x = x.reshape(batch, kv_heads, group, *x.shape[2:])[:, :, :, q_start:q_end]
        return x.astype(compute, copy=False).reshape(batch, kv_heads, group * rows,
                                                     *x.shape[4:])

    # Preprocess: delta = rowsum(dO ∘ O), per query row.
    delta = np.einsum("bhsd,bhsd->bhs", dout.astype(compute, copy=False),
                      out.astype(compute, copy=False))
    # Rows that see no key have lse = -inf; +inf there makes P = exp(S - lse) exactly 0
    # (even where S is -inf too) instead of exp(+inf) or NaN.
    lse = np.where(np.isneginf(lse), np.inf, lse).astype(compute, copy=False)
    dq_acc = np.zeros((batch, kv_heads, group, sq, head_dim), dtype=compute)

    lo, hi = key_bounds(causal, window, sq, sk)  # query i sees keys i + lo .. i + hi
    for k_start in range(0, sk, block_n):
        k_end = min(k_start + block_n, sk)
        K = k[:, :, k_start:k_end].astype(compute, copy=False)
        V = v[:, :, k_start:k_end].astype(compute, copy=False)
        dK = np.zeros(K.shape, dtype=compute)
        dV = np.zeros(V.shape, dtype=compute)

        # Only queries whose band reaches this key block: i + hi >= k_start, i + lo < k_end.
        first_query = int(max(0, k_start - hi))
        query_end = int(min(sq, k_end - lo))
        for q_start in range(first_query // block_m * block_m, query_end, block_m):
            q_end = min(q_start + block_m, sq)
            rows, cols = q_end - q_start, k_end - k_start
            Q = grouped_rows(q, q_start, q_end)
            dO = grouped_rows(dout, q_start, q_end)
            L = grouped_rows(lse, q_start, q_end)
            D_i = grouped_rows(delta, q_start, q_end)

            # S = scale Q K^T, softcap and ALiBi as in the forward; mask tiles that cross a
            # band edge.
            S = np.matmul(Q, K.swapaxes(-1, -2))
            S *= scale
            per_head = S.reshape(batch, q_heads, rows, cols)
            tanh = modify_scores(per_head, softcap=softcap, slopes=slopes, sq=sq, sk=sk,
                                 q_start=q_start, k_start=k_start)
            if k_end - 1 > q_start + hi or k_start < q_end - 1 + lo:
                visible = visible_keys(sq, sk, causal, window, q_start, q_end, k_start, k_end)
                np.copyto(per_head, -np.inf, where=~visible)

            # P = exp(S - LSE): the forward's probabilities, recomputed (in place of S).
            S -= L[..., None]
            P = np.exp(S, out=S)
            dV += np.matmul(P.swapaxes(-1, -2), dO)            # dV_j += P^T dO_i
            dP = np.matmul(dO, V.swapaxes(-1, -2))             # dP = dO_i V_j^T
            dP -= D_i[..., None]
            dS = np.multiply(P, dP, out=dP)                    # dS = P ∘ (dP - delta_i)
            if tanh is not None:                               # through c tanh(s / c)
                dS *= (1 - tanh**2).reshape(dS.shape)
            dQ_tile = np.matmul(dS, K)                         # dQ_i += scale dS K_j
            dq_acc[:, :, :, q_start:q_end] += scale * dQ_tile.reshape(
                batch, kv_heads, group, rows, head_dim)
            dK += np.matmul(dS.swapaxes(-1, -2), Q)            # dK_j += scale dS^T Q_i

        dK *= scale
        dk[:, :, k_start:k_end] = dK
        dv[:, :, k_start:k_end] = dV
    dq[...] = dq_acc.reshape(batch, q_heads, sq, head_dim)


# ------------------------------------------------------------------ the backend's entry points

def _sequences(cu_seqlens):
    """(query rows, key rows) slices of each sequence of a packed batch."""
    cu_q, cu_k = (np.asarray(c).astype(np.int64) for c in cu_seqlens)
    return [(slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])) for b in range(len(cu_q) - 1)]


def _sequence_slopes(alibi_slopes, b):
    """Sequence b's slopes: (Hq,) slopes serve every sequence, (B, Hq) ones have a row each."""
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes)
    return slopes if slopes.ndim == 1 else slopes[b]


def paged_rows(pages, table_row, length: int):
    """A sequence's first `length` key (or value) rows, (1, Hk, length, D), gathered from the
    pages (P, Hk, page_size, D) in the order of its row of the block table."""
    _, heads, page_size, head_dim = pages.shape
    count = -(-length // page_size)
    used = pages[np.asarray(table_row[:count], dtype=np.int64)]
    return used.transpose(1, 0, 2, 3).reshape(heads, count * page_size, head_dim)[None, :, :length]


def forward(q, k, v, *, causal, scale, window=UNBOUNDED, softcap=0.0, alibi_slopes=None,
            sinks=None, cu_seqlens=None, max_seqlen=None, block_table=None, seqused_k=None,
            out=None, lse=None):
    """The reference backend's forward: flash_attention_forward, once per sequence for a packed
    batch (cu_seqlens given: q, k, v, out are (1, H, total, D) views, lse (1, Hq, total_q)).
    Paged keys and values (block_table given, host ints (B, max_pages)): k and v are (num_pages,
    Hk, page_size, D), and sequence b's keys are its first seqused_k[b] page rows (seqused_k
    given) or cu_seqlens_k[b + 1] - cu_seqlens_k[b] of them; the call has checked the table."""
    variant = dict(causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)
    if cu_seqlens is None:
        return flash_attention_forward(q, k, v, alibi_slopes=alibi_slopes, out=out, lse=lse,
                                       **variant)
    if block_table is not None:
        cu_q = np.asarray(cu_seqlens[0]).astype(np.int64)
        table = np.asarray(block_table)
        if seqused_k is not None:
            lengths = np.asarray(seqused_k).astype(np.int64)
        else:
            lengths = np.diff(np.asarray(cu_seqlens[1]).astype(np.int64))
        for b in range(len(cu_q) - 1):
            qs = slice(cu_q[b], cu_q[b + 1])
            flash_attention_forward(q[:, :, qs], paged_rows(k, table[b], int(lengths[b])),
                                    paged_rows(v, table[b], int(lengths[b])),
                                    alibi_slopes=_sequence_slopes(alibi_slopes, b),
                                    out=out[:, :, qs], lse=lse[:, :, qs], **variant)
        return out, lse
    for b, (qs, ks) in enumerate(_sequences(cu_seqlens)):
        flash_attention_forward(q[:, :, qs], k[:, :, ks], v[:, :, ks],
                                alibi_slopes=_sequence_slopes(alibi_slopes, b),
                                out=out[:, :, qs], lse=lse[:, :, qs], **variant)
    return out, lse


def backward(q, k, v, out, dout, lse, *, causal, scale, window=UNBOUNDED, softcap=0.0,
             alibi_slopes=None, sinks=None, cu_seqlens=None, max_seqlen=None, dq=None, dk=None,
             dv=None):
    """The reference backend's backward, per sequence for a packed batch (as forward).
    Returns (dq, dk, dv), and with sinks (dq, dk, dv, dsinks), dsinks summed over sequences."""
    variant = dict(causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)
    if cu_seqlens is None:
        return flash_attention_backward(q, k, v, out, dout, lse, alibi_slopes=alibi_slopes,
                                        dq=dq, dk=dk, dv=dv, **variant)
    dsinks = None
    for b, (qs, ks) in enumerate(_sequences(cu_seqlens)):
        grads = flash_attention_backward(q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs],
                                         dout[:, :, qs], lse[:, :, qs],
                                         alibi_slopes=_sequence_slopes(alibi_slopes, b),
                                         dq=dq[:, :, qs], dk=dk[:, :, ks], dv=dv[:, :, ks],
                                         **variant)
        if sinks is not None:
            dsinks = grads[3] if dsinks is None else dsinks + grads[3]
    if sinks is None:
        return dq, dk, dv
    if dsinks is None:  # no sequence at all
        dsinks = np.zeros(np.shape(sinks), dtype=np.float64 if q.dtype == np.float64 else np.float32)
    return dq, dk, dv, dsinks
