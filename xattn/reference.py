"""NumPy attention on the host: the exact float64 oracle and the tiled FlashAttention forward.

Both functions take arrays in the "bhsd" layout: q is (B, Hq, Sq, D), k and v are
(B, Hk, Sk, D), any strides. Query head h reads key/value head h // (Hq // Hk) (GQA).

Masking rule shared with the GPU kernels (causal is bottom-right aligned):
query i sees key j  iff  not causal  or  j <= i + (Sk - Sq).
A row that sees no key has output 0 and log-sum-exp -inf. The LSE is natural log (base e).
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


def visible_keys(sq: int, sk: int, causal: bool) -> np.ndarray:
    """Boolean (Sq, Sk) matrix: entry [i, j] says whether query i sees key j."""
    if not causal:
        return np.ones((sq, sk), dtype=bool)
    query = np.arange(sq)[:, None]
    key = np.arange(sk)[None, :]
    return key <= query + (sk - sq)


def exact_attention_bhsd(q, k, v, *, causal: bool, scale: float):
    """The oracle: materialize softmax(scale * Q K^T) V in float64. Returns (out, lse).

    Deliberately naive: K and V are repeated for GQA and the full (Sq, Sk) score matrix is
    built, so that each line can be checked against the definition.
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
    scores = np.where(visible_keys(sq, sk, causal), scores, -np.inf)

    # Rows that see no key have max -inf; use 0 there so no -inf - -inf (NaN) appears.
    row_max = scores.max(axis=-1, initial=-np.inf)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - safe_max[..., None])
    row_sum = weights.sum(axis=-1)
    has_keys = row_sum > 0
    with np.errstate(divide="ignore"):
        lse = np.where(has_keys, safe_max + np.log(row_sum), -np.inf)
    probabilities = weights / np.where(has_keys, row_sum, 1.0)[..., None]
    out = probabilities @ v
    assert out.shape == (batch, q_heads, sq, head_dim)
    return out, lse


def flash_attention_forward(q, k, v, *, causal: bool, scale: float, out=None, lse=None,
                            block_m: int = BLOCK_M, block_n: int = BLOCK_N):
    """FlashAttention forward (Dao et al., Algorithm 1 / FlashAttention-2 forward) in NumPy.

    For each block of BLOCK_M queries, K/V blocks of BLOCK_N keys stream past it while a
    running row max m_i and row sum l_i are kept; the output accumulator O is rescaled
    whenever m_i grows, and divided by l_i once at the end. Memory per query block is
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
                           out[batches, qo], lse[batches, qo], causal=causal, scale=scale,
                           compute=compute, block_m=block_m, block_n=block_n)
    return out, lse


def _forward_chunk(q, k, v, out, lse, *, causal, scale, compute, block_m, block_n):
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

    causal_offset = sk - sq  # query i sees key j iff j <= i + causal_offset
    for q_start in range(0, sq, block_m):
        q_end = min(q_start + block_m, sq)
        rows = q_end - q_start

        # Q block, pre-scaled once so scores need no multiply: (B, Hk, G*rows, D).
        Q = np.multiply(q_grouped[:, :, :, q_start:q_end], scale, dtype=compute)
        Q = Q.reshape(batch, kv_heads, group * rows, head_dim)
        O = np.zeros((batch, kv_heads, group * rows, head_dim), dtype=compute)
        m_i = np.full((batch, kv_heads, group * rows), -np.inf, dtype=compute)
        l_i = np.zeros((batch, kv_heads, group * rows), dtype=compute)

        # Causal: keys past the last visible one of this block's last query are skipped.
        key_end = min(sk, q_end + causal_offset) if causal else sk
        for k_start in range(0, max(key_end, 0), block_n):
            k_end = min(k_start + block_n, key_end)

            # Load the K/V tile in the compute dtype.
            K = k[:, :, k_start:k_end].astype(compute, copy=False)
            V = v[:, :, k_start:k_end].astype(compute, copy=False)

            # S = Q K^T: (B, Hk, G*rows, cols).
            cols = k_end - k_start
            S = score_buffer[:batch * q_heads * rows * cols].reshape(
                batch, kv_heads, group * rows, cols)
            np.matmul(Q, K.swapaxes(-1, -2), out=S)

            # Mask only tiles that cross the causal diagonal.
            if causal and k_end - 1 > q_start + causal_offset:
                visible = (np.arange(k_start, k_end)[None, :]
                           <= np.arange(q_start, q_end)[:, None] + causal_offset)
                tiles = S.reshape(batch, kv_heads, group, rows, cols)
                np.copyto(tiles, -np.inf, where=~visible)

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

        # Epilogue: one division per row; rows that saw no key give O = 0 and lse = -inf.
        has_keys = l_i > 0
        O /= np.where(has_keys, l_i, 1.0)[..., None]
        with np.errstate(divide="ignore"):
            block_lse = np.where(has_keys, m_i + np.log(np.where(has_keys, l_i, 1.0)), -np.inf)
        out_grouped[:, :, :, q_start:q_end] = O.reshape(batch, kv_heads, group, rows, head_dim)
        lse_grouped[:, :, :, q_start:q_end] = block_lse.reshape(batch, kv_heads, group, rows)
