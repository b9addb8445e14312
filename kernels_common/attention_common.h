// Vendor-neutral attention logic shared by every kernel: which keys a query row may see, which
// key tiles a query block has to visit, the score modifiers (softcap, ALiBi) and where a sequence
// of a packed (varlen) batch lives. No intrinsics here, only index arithmetic and float math.
//
// Masking is a band, bottom-right aligned: with o = Sk - Sq, query i sees key j iff
//   i + o - window_left <= j <= i + o + window_right,
// a window side of -1 meaning unbounded. Causal is window_right = 0, so the last query always sees
// the last key (flash-attn >= 2.1 and KV-cache decoding use this convention).
//
// Compile-time flags (default 0), set per variant by xattn/configs.py:
// IS_CAUSAL    the band has a right edge (causal, or a window with right >= 0)
// IS_LOCAL     the band has a left edge (a window with left >= 0)
// HAS_SOFTCAP  scores s become c * tanh(s / c)
// HAS_ALIBI    scores get -slope * |i + o - j|, one slope per (batch,) query head
// IS_VARLEN    sequences are packed: sequence b is rows [cu_seqlens[b], cu_seqlens[b + 1])
// IS_PAGED     (with IS_VARLEN, forward) the keys and values live in pages through a block table
// HAS_SINKS    (forward) p.sinks holds float32 (Hq,) sink logits, folded into each row's LSE and O
//              by the epilogue (fold_sink); the decode reads its sinks pointer at run time instead
#pragma once

#include "params.h"

#ifndef IS_CAUSAL
#define IS_CAUSAL 0
#endif
#ifndef IS_LOCAL
#define IS_LOCAL 0
#endif
#ifndef HAS_SOFTCAP
#define HAS_SOFTCAP 0
#endif
#ifndef HAS_ALIBI
#define HAS_ALIBI 0
#endif
#ifndef IS_VARLEN
#define IS_VARLEN 0
#endif
#ifndef IS_PAGED
#define IS_PAGED 0
#endif
#ifndef HAS_SINKS
#define HAS_SINKS 0
#endif

#define NEG_INF (-__int_as_float(0x7f800000))

#define LOG2_E 1.4426950408889634f

// A query row's LSE in base 2, as the backward kernels use it to recompute P = exp2(S' - lse2).
// Rows past the end (row >= seqlen_q) and rows that saw no key (LSE = -inf) get +inf, so that
// exp2(anything - inf) = 0: they add nothing, with no mask and no NaN.
__device__ __forceinline__ float backward_lse2(const float* lse, int row, int seqlen_q) {
    float l = row < seqlen_q ? lse[row] : NEG_INF;
    return l == NEG_INF ? -NEG_INF : l * LOG2_E;
}

// ---- the parameter block in a kernel's own names ----------------------------------------------------
// An entry point takes one AttnParams (params.h) and unpacks the fields its body uses into the
// paper's names: NAME, NAME_batch_stride, NAME_head_stride, NAME_row_stride for a tensor, and the
// shared scalars. seqlen_q and seqlen_k stay mutable: a packed sequence narrows them to its own.
#define TENSOR_FROM_PARAMS(T, NAME, REF)                                                          \
    T* __restrict__ NAME = (T*)(REF).ptr;                                                         \
    const i64 NAME##_batch_stride = (REF).batch_stride, NAME##_head_stride = (REF).head_stride,   \
              NAME##_row_stride = (REF).row_stride

#define ATTENTION_SCALARS_FROM_PARAMS(P)                                                          \
    const int* __restrict__ cu_seqlens_q = (P).cu_seqlens_q;                                      \
    const int* __restrict__ cu_seqlens_k = (P).cu_seqlens_k;                                      \
    const float* __restrict__ alibi_slopes = (P).alibi_slopes;                                    \
    const i64 alibi_batch_stride = (P).alibi_batch_stride;                                        \
    int seqlen_q = (P).seqlen_q, seqlen_k = (P).seqlen_k;                                         \
    const int head_dim = (P).head_dim, heads_per_kv = (P).heads_per_kv;                           \
    const int window_left = (P).window_left, window_right = (P).window_right;                     \
    const float softcap_scale = (P).softcap_scale, scale = (P).scale,                             \
                scale_log2 = (P).scale_log2, grad_scale = (P).grad_scale

// ---- the band of visible keys -------------------------------------------------------------------

// Query row i sees keys [i + lo, i + hi] (intersected with [0, Sk)). An unbounded side is stored as
// a bound no row can reach (lo = -Sq, hi = Sk), clamped in 64 bits so huge windows cannot overflow.
struct Band {
    int lo;
    int hi;
};

__device__ __forceinline__ Band make_band(int seqlen_q, int seqlen_k, int window_left,
                                          int window_right) {
    long long offset = (long long)seqlen_k - seqlen_q;
    Band band;
    band.lo = window_left >= 0 ? (int)max(offset - window_left, -(long long)seqlen_q) : -seqlen_q;
    band.hi = window_right >= 0 ? (int)min(offset + window_right, (long long)seqlen_k) : seqlen_k;
    return band;
}

// The keys [begin, end) that query `row` sees (end <= begin: none). Without an edge the bound is
// a constant: a bound the compiler can see is a register saved in the kernels' inner loops.
__device__ __forceinline__ int visible_key_begin(int row, Band band) {
    return IS_LOCAL ? max(0, row + band.lo) : 0;
}
__device__ __forceinline__ int visible_key_end(int row, Band band, int seqlen_k) {
    return IS_CAUSAL ? min(seqlen_k, row + band.hi + 1) : seqlen_k;
}
__device__ __forceinline__ bool key_visible(int row, int key, Band band, int seqlen_k) {
    return key >= visible_key_begin(row, band) && key < visible_key_end(row, band, seqlen_k);
}

// The mirror for the backward's key-major loops: the queries [first, last] that see `key`.
__device__ __forceinline__ int first_visible_query(int key, Band band) { return key - band.hi; }
__device__ __forceinline__ int last_visible_query(int key, Band band) { return key - band.lo; }

struct KeyRange {
    int tile_begin;  // first key tile to visit
    int tile_end;    // one past the last key tile to visit (tile_end <= tile_begin: no tiles)
};

// Key tiles of block_n keys that rows [m_start, m_start + rows) see: tiles outside the band of the
// block are skipped, never loaded.
__device__ __forceinline__ KeyRange key_tiles(int m_start, int rows, int block_n, int seqlen_k,
                                              Band band) {
    int key_begin = visible_key_begin(m_start, band);
    int key_end = visible_key_end(m_start + rows - 1, band, seqlen_k);
    KeyRange r;
    r.tile_begin = key_begin / block_n;
    r.tile_end = key_end > key_begin ? (key_end + block_n - 1) / block_n : r.tile_begin;
    return r;
}

// Does the key tile [n_start, n_start + block_n) need element-wise masking for rows
// [m_start, m_start + rows)? Only tiles that cross the end of the keys or an edge of the band do.
__device__ __forceinline__ bool tile_needs_mask(int m_start, int rows, int n_start, int block_n,
                                                int seqlen_k, Band band) {
    bool crosses_end = n_start + block_n > seqlen_k;
    bool crosses_right = IS_CAUSAL && n_start + block_n - 1 > m_start + band.hi;
    bool crosses_left = IS_LOCAL && n_start < m_start + rows - 1 + band.lo;
    return crosses_end || crosses_right || crosses_left;
}

// ---- score modifiers ------------------------------------------------------------------------------
// Kernels hold raw dot products x = q.k. The softmax sees s = scale * x, or with a softcap c,
// s = c * tanh(scale * x / c): the kernel then keeps t = tanh(x * softcap_scale) (softcap_scale =
// scale / c) and uses c as its scale, so the rest of the softmax is unchanged. The backward needs
// ds/dx = scale * (1 - t^2), available from t alone.

__device__ __forceinline__ float softcap_score(float x, float softcap_scale) {
    return fast_tanh(x * softcap_scale);  // platform.h: the vendor's fastest accurate tanh
}

// ALiBi adds -slope * |i + o - j| to s. In the kernel's units (s = score_scale * value) that is
// alibi_coef * |i + o - j| with alibi_coef = -slope / score_scale, formed once per block.
__device__ __forceinline__ float alibi_bias(float alibi_coef, int row, int key, int offset) {
    return alibi_coef * (float)abs(row + offset - key);
}

// Everything a kernel needs to turn raw dot products into the scores the softmax sees.
struct ScoreMods {
    Band band;
    int seqlen_k;
    int offset;           // Sk - Sq, the ALiBi distance's shift
    float softcap_scale;  // scale / c
    float alibi_coef;     // -slope / score_scale
};

// The score of raw dot product x at (row, key): softcap, then ALiBi, then -inf outside the band
// (checked only where the tile crosses an edge). Softcap and ALiBi are never combined (the API
// refuses it), so with a softcap the result is t, from which the backward takes 1 - t^2.
__device__ __forceinline__ float modified_score(float x, int row, int key, const ScoreMods& mods,
                                                bool check_mask) {
    if (HAS_SOFTCAP) x = softcap_score(x, mods.softcap_scale);
    if (HAS_ALIBI) x += alibi_bias(mods.alibi_coef, row, key, mods.offset);
    if (check_mask && !key_visible(row, key, mods.band, mods.seqlen_k)) x = NEG_INF;
    return x;
}

__device__ __forceinline__ ScoreMods make_score_mods(int seqlen_q, int seqlen_k, int window_left,
                                                     int window_right, float softcap_scale,
                                                     const float* alibi_slopes, float score_scale) {
    ScoreMods mods;
    mods.band = make_band(seqlen_q, seqlen_k, window_left, window_right);
    mods.seqlen_k = seqlen_k;
    mods.offset = seqlen_k - seqlen_q;
    mods.softcap_scale = softcap_scale;
    mods.alibi_coef = HAS_ALIBI ? -*alibi_slopes / score_scale : 0.f;
    return mods;
}

// d(score)/d(scale * x) under the softcap: 1 - t^2 (t = -inf where masked: its P is 0, and so is
// this factor, rather than 0 * inf = NaN).
__device__ __forceinline__ float softcap_grad(float t) { return 1.f - fminf(t * t, 1.f); }

// ---- sinks (HAS_SINKS, GPT-OSS) ----------------------------------------------------------------------

// The sink, one more key of score `sink` and value 0, folded into a row's natural-log LSE: returns
// the new LSE and scales *inv_l, O's normalization, by exp(lse - lse_new). A row with no key
// (lse -inf) gets lse = sink and O = 0; a sink of -inf changes nothing (and makes no NaN of
// -inf - -inf); a NaN lse stays NaN (the comparison, unlike fmaxf, keeps it).
__device__ __forceinline__ float fold_sink(float lse, float sink, float* inv_l) {
    if (sink == NEG_INF) return lse;
    const float m = lse > sink ? lse : sink;
    const float lse_new = m + logf(expf(lse - m) + expf(sink - m));
    *inv_l *= expf(lse - lse_new);
    return lse_new;
}

// ---- packed variable-length batches -----------------------------------------------------------------

// Where sequence `batch` lives: its first row in the packed q (and k) tensors and its lengths.
// Without IS_VARLEN every sequence has the launch's lengths and starts at row 0 of its batch entry.
struct Sequence {
    int q_start, k_start;  // first row, added to the batch entry's base pointer
    int seqlen_q, seqlen_k;
};

__device__ __forceinline__ Sequence sequence(int batch, const int* cu_seqlens_q,
                                             const int* cu_seqlens_k, int seqlen_q, int seqlen_k) {
    Sequence s;
    if (IS_VARLEN) {
        s.q_start = cu_seqlens_q[batch];
        s.seqlen_q = cu_seqlens_q[batch + 1] - s.q_start;
        // Paged keys are not packed: paged_rows() sets their count (cu_seqlens_k may be null).
        s.k_start = IS_PAGED ? 0 : cu_seqlens_k[batch];
        s.seqlen_k = IS_PAGED ? 0 : cu_seqlens_k[batch + 1] - s.k_start;
    } else {
        s.q_start = s.k_start = 0;
        s.seqlen_q = seqlen_q;
        s.seqlen_k = seqlen_k;
    }
    return s;
}

// ---- paged keys and values (IS_PAGED) ----------------------------------------------------------------
// flash-attn's convention: k and v are (num_pages, page_size, Hk, D) and key row r of sequence b
// lives at page block_table[b, r / page_size], row r % page_size. The sequence's key count is
// seqused_k[b] where given, else cu_seqlens_k[b + 1] - cu_seqlens_k[b]. On a GPU neither the table
// nor the counts are read by the host, so here counts are clamped to [0, max_pages * page_size]
// (a row past that would index past the sequence's row of the table) and page ids to
// [0, num_pages): a bad table reads wrong pages, never memory outside the caches or the table.
// Every kernel of either vendor that reads paged keys finds a row through paged_row_offset.

// Sequence `batch`'s key count under IS_PAGED: seqused_k's where given, else cu_seqlens_k's,
// clamped to the table's capacity.
__device__ __forceinline__ int paged_key_count(const AttnParams& p, int batch) {
    const int used = p.seqused_k ? p.seqused_k[batch] : p.cu_seqlens_k[batch + 1] - p.cu_seqlens_k[batch];
    return min(max(used, 0), p.max_pages * p.page_size);
}

// sequence() for a forward that may read paged keys: under IS_PAGED the key count is the pages'.
__device__ __forceinline__ Sequence forward_sequence(const AttnParams& p, int batch) {
    Sequence s = sequence(batch, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
    if (IS_PAGED) s.seqlen_k = paged_key_count(p, batch);
    return s;
}

// Offset in elements of page row `row` (0 <= row < max_pages * page_size) from the base of a
// kv head: page `pages[row / page_size]`, clamped. page_size may be a compile-time constant (the
// decode kernels' PAGE_SIZE), which turns the division into a shift.
__device__ __forceinline__ i64 paged_row_offset(const int* pages, int page_size, int last_page,
                                                int row, i64 page_stride, i64 row_stride) {
    const int page = min(max(pages[row / page_size], 0), last_page);
    return (i64)page * page_stride + (i64)(row % page_size) * row_stride;
}

// Offset of key row `row` (row < its key count) of sequence `batch` from its kv head's base:
// through the sequence's pages with IS_PAGED (page_stride: the tensor's batch stride), else
// row * row_stride. Everything but `batch` and `row` comes from the parameter block at the point
// of use, so nothing of the table stays live in registers through a kernel's main loop.
__device__ __forceinline__ i64 kv_row_offset(const AttnParams& p, int batch, int row, i64 page_stride,
                                             i64 row_stride) {
#if IS_PAGED
    return paged_row_offset(p.block_table + (i64)batch * p.block_table_stride, p.page_size,
                            p.num_pages - 1, row, page_stride, row_stride);
#else
    return (i64)row * row_stride;
#endif
}
