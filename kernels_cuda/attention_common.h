// Vendor-neutral attention logic shared by every kernel: which keys a query row may see and
// which key tiles a query block has to visit. No intrinsics here, only index arithmetic.
//
// Causal masking is bottom-right aligned: query i sees key j iff j <= i + (Sk - Sq), so the last
// query always sees the last key (flash-attn >= 2.1 and KV-cache decoding use this convention).
#pragma once

#define NEG_INF (-__int_as_float(0x7f800000))

#define LOG2_E 1.4426950408889634f

// A query row's LSE in base 2, as the backward kernels use it to recompute P = exp2(S' - lse2).
// Rows past the end (row >= seqlen_q) and rows that saw no key (LSE = -inf) get +inf, so that
// exp2(anything - inf) = 0: they add nothing, with no mask and no NaN.
__device__ __forceinline__ float backward_lse2(const float* lse, int row, int seqlen_q) {
    float l = row < seqlen_q ? lse[row] : NEG_INF;
    return l == NEG_INF ? -NEG_INF : l * LOG2_E;
}

struct KeyRange {
    int tile_begin;  // first key tile to visit
    int tile_end;    // one past the last key tile to visit (tile_end <= tile_begin: no tiles)
};

// Key tiles of BLOCK_N keys that rows [m_start, m_start + block_m) can see. Causal blocks stop at
// the diagonal of their last row: tiles right of it are skipped, never loaded.
__device__ __forceinline__ KeyRange key_tiles(int m_start, int block_m, int block_n, int seqlen_q,
                                              int seqlen_k, bool causal) {
    int key_end = seqlen_k;
    if (causal) {
        int last_row = min(m_start + block_m, seqlen_q) - 1;
        key_end = min(seqlen_k, last_row + seqlen_k - seqlen_q + 1);
    }
    KeyRange r;
    r.tile_begin = 0;
    r.tile_end = key_end > 0 ? (key_end + block_n - 1) / block_n : 0;
    return r;
}

// Does the key tile starting at n_start need element-wise masking for rows starting at m_start?
// Only tiles that cross the end of the keys or the causal diagonal do; the rest run unmasked.
__device__ __forceinline__ bool tile_needs_mask(int m_start, int n_start, int block_n,
                                                int seqlen_q, int seqlen_k, bool causal) {
    bool crosses_end = n_start + block_n > seqlen_k;
    bool crosses_diagonal = causal && n_start + block_n - 1 > m_start + seqlen_k - seqlen_q;
    return crosses_end || crosses_diagonal;
}

// One past the last key that query `row` sees: it sees exactly keys [0, visible_key_end).
__device__ __forceinline__ int visible_key_end(int row, int seqlen_q, int seqlen_k, bool causal) {
    return causal ? min(seqlen_k, row + 1 + seqlen_k - seqlen_q) : seqlen_k;
}

// The first query that sees `key` (the mirror of visible_key_end): with the causal mask, query i
// sees key j iff i >= j - (Sk - Sq). Keys past the end are seen by no query at all.
__device__ __forceinline__ int first_visible_query(int key, int seqlen_q, int seqlen_k, bool causal) {
    return causal ? key - (seqlen_k - seqlen_q) : 0;
}

__device__ __forceinline__ bool key_visible(int row, int key, int seqlen_q, int seqlen_k,
                                            bool causal) {
    return key < visible_key_end(row, seqlen_q, seqlen_k, causal);
}
