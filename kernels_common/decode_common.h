// Flash-decoding: what the two decode bodies share: kernels_cuda/flash_decode.cu on tensor cores
// (16-bit data, NVIDIA) and kernels_common/flash_decode_simt.h on plain FMA units (DECODE_SIMT:
// float32 on NVIDIA, every dtype on AMD without matrix cores). The includer includes its vendor's
// platform.h first. kernels_cuda/flash_decode_merge.cu and kernels_hip/flash_decode_portable.hip's
// merge combine the splits.
//
// A decode step has few query rows and many keys, so one thread block per (batch, kv head) would
// leave most of the GPU idle. Instead the keys of each (batch, kv head) are split into num_splits
// contiguous chunks, one thread block per chunk (flash-decoding). Each block keeps the online-
// softmax state (running max m_i, running sum l_i, unnormalized O) of its rows over its chunk and
// writes either the final rows (one split) or a partial result, O_s = O / l and LSE_s = m +
// log2(l), that flash_decode_merge combines: LSE = log2(sum_s 2^LSE_s), O = sum_s 2^(LSE_s - LSE) O_s.
//
// GQA: the Hq / Hk query heads that share a kv head, times the Sq query tokens, are the rows of
// one tile (row r = head-in-group * Sq + token), so each K/V tile is read once for the whole group.
// More rows than BLOCK_M: further row tiles (m_blocks), which read the same keys again.
//
// Inside a block the warps split the keys too: each pipeline step covers KEYS_PER_STAGE keys and
// warp w takes the w-th WARP_N of them. A warp owns its keys from the copy to the last product: it
// has its own STAGES-deep ring of K and V tiles (cp.async on NVIDIA; on AMD synchronous copies,
// platform.h: ASYNC_COPIES), its own (m_i, l_i, O) for all BLOCK_M rows, and needs only a wave
// barrier in the main loop. The warps' states are merged through shared memory at the end, like
// the splits are merged across blocks.
//
// Grid: x = split * m_blocks + m_block, y = kv head, z = batch - batch_offset. Block: NUM_WARPS warps.
//
// Keys of sequence b: Sk_b = min(cached + Snew, Smax) with cached = clamp(cache_seqlens[b], 0,
// Smax). Keys [0, cached) are cache rows; keys [cached, Sk_b) are this call's new rows, read from
// k_new / v_new directly, while the same launch writes them into the cache (append fused into the
// attention kernel: no block reads those cache rows, so the writes need no ordering; on AMD a
// separate kernel appends first and the decode reads them from the cache: FUSED_APPEND 0). New
// rows that would land at or past Smax are dropped. Masking is bottom-right aligned (Band of
// attention_common.h with both edges run-time values): query token i sees key j iff
// i + Sk_b - Sq - left <= j <= i + Sk_b - Sq + right (-1: unbounded; causal is right = 0).
// Left padding (cache_leftpad != null, flash-attn's cache_leftpad): keys below
// leftpad_b = clamp(cache_leftpad[b], 0, cached) are seen by no token; the band stays aligned with
// Sk_b, so a left-padded sequence reads as the unpadded keys [leftpad_b, Sk_b).
//
// Caches: contiguous (B, Hk, Smax, D), or paged (PAGED): (num_pages, PAGE_SIZE, Hk, D)
// with key j of sequence b at page block_table[b, j / PAGE_SIZE], row j % PAGE_SIZE (flash-attn's
// convention). Page ids are clamped to [0, num_pages): a bad table reads or writes wrong pages,
// never outside the caches. Smax is then max_pages * PAGE_SIZE, so j / PAGE_SIZE stays in the
// table's row. PAGE_SIZE is a compile-time constant on NVIDIA (-D PAGE_SIZE) and the run-time
// p.page_size on AMD (IS_PAGED: one compile serves every page size).
//
// Sinks (sinks != null): each query head h has a logit sink_h that joins its rows' softmax
// denominators as one more key of score sink_h and value 0; the LSE includes it.
//
// FP8 caches (KV_FP8): the caches hold float8 codes of x / scale (one float32 scale per tensor or
// per kv head, k_scale and v_scale). The ring moves the codes (half the bytes of a 16-bit cache,
// so the tables' FP8 rows keep about twice the steps in flight: fp8_stages). The tensor-core
// kernel reads the codes straight from the ring into its mma fragments and converts them there,
// exactly (flash_decode.cu says how); the CUDA-core body converts each landed tile into float32
// tiles first (convert_tile), or, with synchronous copies (AMD), each code as it copies it. The
// scales never touch the tiles: a block serves one kv head, so
// k_scale is one number folded into the scores' factor (S = Q K8^T * k_scale) and v_scale one
// factor of the rows written out (O = P V8 * v_scale). This call's new rows are quantized as the
// append writes them (fp8.h's rule, x / scale in IEEE float32) wherever they are read, so every
// block sees the codes the cache will hold.
//
// Scores are carried in base-2 units, s2 = scale * log2(e) * q.k (or the softcapped value times
// log2(e)), so every exponential is one ex2. The LSE written to lse is natural log.

#pragma once

// Both band edges are run-time values here (-1: unbounded), so the band helpers are compiled with
// both edges on, whatever -D says; an unbounded side is a bound no key reaches (make_band).
#undef IS_CAUSAL
#undef IS_LOCAL
#define IS_CAUSAL 1
#define IS_LOCAL 1
#include "params.h"
#include "attention_common.h"
#include "fp8.h"

// ---- compile-time configuration (set with -D by xattn/kernels.py) ----------------------------
// ELEM_F32    NVIDIA: 1 float32 (flash_decode_f32.cu), 0 16-bit (ELEM_BF16 picks bf16 or fp16);
//             AMD: the element type is platform.h's (ELEM_TYPE)
// DECODE_SIMT 1: the CUDA-core / plain-FMA body (flash_decode_simt.h), 0: tensor cores
// HEAD_DIM    padded head dim (a power of two, 32..256); the real one, head_dim, is <= it
// BLOCK_M     query rows per tile (each warp holds all of them)
// NUM_WARPS   warps (waves) per block;  WARP_N  keys per warp per pipeline step
// STAGES      cp.async pipeline depth of each warp (1 with synchronous copies)
// VEC_LOADS   1: q, the caches and k_new/v_new rows start 16-byte aligned and head_dim is a whole
//             number of 16-byte chunks: rows move in 16-byte copies; 0: 4-byte cp.async (float32)
//             or element-wise copies (16-bit)
// SOFTCAP     1: s = c * tanh(s / c) before the softmax
// PAGE_SIZE   0: contiguous caches; > 0: paged caches of PAGE_SIZE rows per page
// IS_PAGED    (AMD, with PAGE_SIZE 0) paged caches of p.page_size rows per page
// KV_FP8      0: the caches hold elem_t; FP8_E4M3FN (1) / FP8_E5M2 (2): float8 codes (fp8.h)
// FUSED_APPEND see below
// L2_PREFETCH 0, 128 or 256: the cache copies' L2 prefetch hint (platform.h, cp_async_16_zfill_l2)
// MIN_BLOCKS  thread blocks per SM that the register allocation must allow
#ifndef PAGE_SIZE
#define PAGE_SIZE 0
#endif
#ifndef L2_PREFETCH
#define L2_PREFETCH 0
#endif
#ifndef KV_FP8
#define KV_FP8 0
#endif
#ifndef DECODE_SIMT
#define DECODE_SIMT 0
#endif
// FUSED_APPEND 1: the append is fused into the decode (append_new_rows), whose copies read this
// call's new rows from k_new / v_new; 0: a separate kernel appended them before this launch (AMD:
// the one the matrix-core decode uses too), and they are read from the cache like the others.
#ifndef FUSED_APPEND
#define FUSED_APPEND 1
#endif
#define PAGED (PAGE_SIZE > 0 || IS_PAGED)

// cache_t: what one cache element is in memory (and in the K/V ring).
#if KV_FP8
typedef unsigned char cache_t;
#else
typedef elem_t cache_t;
#endif
// ring_t: what the copies write into the K/V ring. cp.async moves the cache's bytes as they are;
// synchronous copies (AMD) convert on the way, so the CUDA-core body's rings hold float32 values
// there and need no second pass.
#if ASYNC_COPIES || !DECODE_SIMT
typedef cache_t ring_t;
#else
typedef float ring_t;
#endif
// tile_t: what the products read (the Q tile, and the K/V tiles): the element type on tensor
// cores, float32 on CUDA cores.
#if DECODE_SIMT
typedef float tile_t;
__device__ __forceinline__ float to_tile(elem_t x) { return to_float(x); }
#else
typedef elem_t tile_t;
__device__ __forceinline__ elem_t to_tile(elem_t x) { return x; }
#endif
// FP8 ring tiles converted in shared memory before the products: the CUDA-core body's, where the
// copies move codes (cp.async).
#define FP8_TILES (KV_FP8 && DECODE_SIMT && ASYNC_COPIES)

#define NUM_THREADS (NUM_WARPS * WAVE_SIZE)
#define KEYS_PER_STAGE (NUM_WARPS * WARP_N)
#define ELEM_BYTES ((int)sizeof(elem_t))
#define TILE_ELEM_BYTES ((int)sizeof(tile_t))
// Shared-memory rows are padded by 16 bytes: consecutive rows start in different bank groups
// (conflict-free ldmatrix; float4 reads of 8 rows by 8 lanes hit 32 different banks).
#define TILE_STRIDE (HEAD_DIM + 16 / TILE_ELEM_BYTES)
#define UNIT_ELEMS (VEC_LOADS ? 16 / ELEM_BYTES : 1)  // elements per copy
#define CACHE_BYTES ((int)sizeof(cache_t))
#define CACHE_UNIT (VEC_LOADS ? 16 / CACHE_BYTES : 1)  // cache elements per copy
#define RING_BYTES ((int)sizeof(ring_t))
// The K/V ring tiles. RING_SWIZZLE (flash_decode.cu, whose products read them with ldmatrix):
// rows of exactly HEAD_DIM cache elements, 16-byte chunk c of row r stored at chunk
// c ^ ring_swizzle(r). Rows padded by 16 bytes instead (the float32 kernel) are also free of bank
// conflicts, but a warp's copy of two 256-byte cache rows then lands 16 bytes off every 128-byte
// line of shared memory: Nsight Compute showed the copy engine splitting those copies into 2.6x
// the L2 requests and 1.5x the sectors of aligned rows (a third of them L2 hits on data read
// once), and the decode stopping at 82% of DRAM bandwidth where cuDNN's aligned copies reach 94%
// (ci/results/2026-11-30-session5/).
#ifndef RING_SWIZZLE
#define RING_SWIZZLE 0
#endif
#define CACHE_STRIDE (RING_SWIZZLE ? HEAD_DIM : HEAD_DIM + 16 / RING_BYTES)
#define RING_CHUNKS (HEAD_DIM * CACHE_BYTES / 16)  // 16-byte chunks per ring row
static_assert(!RING_SWIZZLE || RING_CHUNKS >= 2, "the swizzle permutes at least two chunks a row");

// The chunk permutation of ring row r: any 8 consecutive rows, read at one chunk column by an
// ldmatrix, fall in 8 different 16-byte bank groups. Rows of 8 chunks or more: XOR with r % 8.
// Shorter rows (8 / RING_CHUNKS of them share a 128-byte line): XOR with (r % 8) / (8 / RING_CHUNKS).
__device__ __forceinline__ int ring_swizzle(int row) {
    if (!RING_SWIZZLE) return 0;
    return RING_CHUNKS >= 8 ? (row & 7) : (row & 7) / (8 / RING_CHUNKS);
}

// Ring row `row`'s physical column of logical column `col`, and its logical column of physical
// column `col` (the swizzle is its own inverse). The copies write each lane's fixed physical
// columns and read the logical ones from the cache: the swizzle then costs one XOR on a global
// address already computed per row, where writing swizzled shared addresses kept one register per
// unrolled pass alive and made ptxas spill the FP8 variants.
__device__ __forceinline__ int ring_col(int row, int col) {
#if RING_SWIZZLE
    constexpr int CHUNK = 16 / CACHE_BYTES;  // elements per 16-byte chunk
    return ((col / CHUNK) ^ ring_swizzle(row)) * CHUNK + col % CHUNK;
#else
    return col;
#endif
}
#define OUT_STRIDE (HEAD_DIM + 4)                      // floats per row of the merge scratch
#define LN_2 0.6931471805599453f

static_assert((HEAD_DIM & (HEAD_DIM - 1)) == 0 && HEAD_DIM >= 32, "HEAD_DIM: power of two >= 32");
static_assert(BLOCK_M <= NUM_THREADS, "one thread per row computes the row limits");
static_assert(PAGE_SIZE % 16 == 0, "pages hold a multiple of 16 rows");
static_assert(!KV_FP8 || HEAD_DIM % 8 == 0, "FP8 tiles convert in 8-element pieces");

// ---- shared-memory layout ---------------------------------------------------------------------
// sQ [BLOCK_M][TILE_STRIDE] tile_t | row_lo, row_hi [BLOCK_M] ints | then either
//   the K/V rings: per warp, STAGES x (K [WARP_N][CACHE_STRIDE], V [WARP_N][CACHE_STRIDE]) ring_t
//   elements, and with FP8_TILES after all rings the conversion tiles: per warp, K and V
//   [WARP_N][TILE_STRIDE] floats,
//   or, after the main loop, the merge scratch: O [BLOCK_M][OUT_STRIDE], m and l
//   [NUM_WARPS][BLOCK_M] floats.
// xattn/kernels.py (the decode's shared_memory) computes the same size.
#define Q_BYTES (BLOCK_M * TILE_STRIDE * TILE_ELEM_BYTES)
#define LIMIT_BYTES (2 * BLOCK_M * 4)
#define TILE_BYTES (WARP_N * TILE_STRIDE * TILE_ELEM_BYTES)    // a K or V tile the products read
#define CACHE_TILE_BYTES (WARP_N * CACHE_STRIDE * RING_BYTES)   // a K or V tile of the ring
#define STAGE_BYTES (2 * CACHE_TILE_BYTES)
#define RINGS_BYTES (NUM_WARPS * STAGES * STAGE_BYTES)

// ---- this block's share of the work -----------------------------------------------------------

struct DecodeBlock {
    int batch, kv_head, m_block, split;
    int m_start, rows;      // first query row of the tile; query rows of this (batch, kv head)
    int cached;             // cache rows before this call's new ones (clamped)
    int leftpad;            // the sequence's first cache row (cache_leftpad, clamped to [0, cached])
    int seqlen_k;           // Sk_b
    Band band;              // the sequence's band (attention_common.h)
    int key_begin, key_end; // this split's keys
    int full_lo, full_hi;   // keys [full_lo, full_hi) are seen by every query token
};

__device__ __forceinline__ DecodeBlock decode_block(const DecodeParams& p) {
    DecodeBlock b;
    b.m_block = blockIdx.x % p.m_blocks;
    b.split = blockIdx.x / p.m_blocks;
    b.kv_head = blockIdx.y;
    b.batch = blockIdx.z + p.batch_offset;
    b.m_start = b.m_block * BLOCK_M;
    b.rows = p.heads_per_kv * p.seqlen_q;
    const int cached = p.cache_seqlens ? p.cache_seqlens[b.batch * p.seqlens_stride] : p.uniform_seqlen;
    b.cached = min(max(cached, 0), p.seqlen_max);
    b.seqlen_k = min(b.cached + p.seqlen_new, p.seqlen_max);
    b.leftpad = p.cache_leftpad ? min(max(p.cache_leftpad[b.batch * p.leftpad_stride], 0), b.cached) : 0;
    b.band = make_band(p.seqlen_q, b.seqlen_k, p.window_left, p.window_right);
    // Token 0 has the lowest lower bound and the lowest upper bound, token Sq - 1 the highest.
    // Rows before the left padding are seen by no token (the band stays aligned with Sk_b).
    const int last = p.seqlen_q - 1;
    const int lo = max(visible_key_begin(0, b.band), b.leftpad), hi = visible_key_end(last, b.band, b.seqlen_k);
    b.full_lo = max(visible_key_begin(last, b.band), b.leftpad);
    b.full_hi = visible_key_end(0, b.band, b.seqlen_k);
    // This split's keys: equal chunks of the band, whole pipeline steps each. An empty chunk (or
    // band) still runs the epilogue, which writes the empty-row result (O = 0, LSE = -inf).
    const int band_keys = max(0, hi - lo);
    const int chunk = ((band_keys + p.num_splits - 1) / p.num_splits + KEYS_PER_STAGE - 1) /
                      KEYS_PER_STAGE * KEYS_PER_STAGE;
    b.key_begin = lo + b.split * chunk;
    b.key_end = min(hi, b.key_begin + chunk);
    return b;
}

// ---- where a key's row lives ------------------------------------------------------------------

// One kv head's keys of one sequence: cache rows (contiguous or paged) below `cached`, this
// call's new rows from `cached` on.
struct KeyRows {
    const cache_t* cache; // contiguous: row 0 of (batch, kv head); paged: kv head's column of page 0
    i64 row_stride;
    i64 page_stride;      // paged: elements from one page to the next
    const elem_t* fresh;  // k_new / v_new row 0 of (batch, kv head)
    i64 fresh_row_stride;
    float scale;          // KV_FP8: the cache's scale for this kv head (1 otherwise)
};

struct KeySource {
    KeyRows k, v;
    const int* pages;     // paged: this sequence's row of the block table
    int last_page;        // num_pages - 1: page ids are clamped to [0, last_page]
    int cached;
#if !PAGE_SIZE && IS_PAGED
    int page_size;        // rows per page, a run-time value here
#endif
};

// Rows per page of paged caches, of KeySource s.
#if PAGE_SIZE
#define PAGE_ROWS(s) PAGE_SIZE
#else
#define PAGE_ROWS(s) ((s).page_size)
#endif

__device__ __forceinline__ KeySource key_source(const DecodeParams& p, const DecodeBlock& b) {
    KeySource s;
    const i64 batch_k = PAGED ? 0 : (i64)b.batch * p.k.batch_stride;
    const i64 batch_v = PAGED ? 0 : (i64)b.batch * p.v.batch_stride;
    s.k.cache = (const cache_t*)p.k.ptr + batch_k + (i64)b.kv_head * p.k.head_stride;
    s.v.cache = (const cache_t*)p.v.ptr + batch_v + (i64)b.kv_head * p.v.head_stride;
#if KV_FP8
    s.k.scale = p.k_scale[b.kv_head * p.k_scale_stride];
    s.v.scale = p.v_scale[b.kv_head * p.v_scale_stride];
#else
    s.k.scale = s.v.scale = 1.f;
#endif
    s.k.row_stride = p.k.row_stride;
    s.v.row_stride = p.v.row_stride;
    s.k.page_stride = p.k.batch_stride;
    s.v.page_stride = p.v.batch_stride;
    s.k.fresh = (const elem_t*)p.k_new.ptr + (i64)b.batch * p.k_new.batch_stride + (i64)b.kv_head * p.k_new.head_stride;
    s.v.fresh = (const elem_t*)p.v_new.ptr + (i64)b.batch * p.v_new.batch_stride + (i64)b.kv_head * p.v_new.head_stride;
    s.k.fresh_row_stride = p.k_new.row_stride;
    s.v.fresh_row_stride = p.v_new.row_stride;
    s.pages = p.block_table + (i64)b.batch * p.block_table_stride;
    s.last_page = p.num_pages - 1;
    s.cached = b.cached;
#if !PAGE_SIZE && IS_PAGED
    s.page_size = p.page_size;
#endif
    return s;
}

// Offset (in elements, from KeyRows::cache) of cache row j, 0 <= j < Smax.
__device__ __forceinline__ i64 cache_row_offset(const KeySource& s, const KeyRows& r, int j) {
#if PAGED
    return paged_row_offset(s.pages, PAGE_ROWS(s), s.last_page, j, r.page_stride, r.row_stride);
#else
    return (i64)j * r.row_stride;
#endif
}

// Cache row j's K and V rows (0 <= j < cached).
__device__ __forceinline__ void cache_rows(const KeySource& s, int j, const cache_t*& k, const cache_t*& v) {
#if PAGED
    k = s.k.cache + paged_row_offset(s.pages, PAGE_ROWS(s), s.last_page, j, s.k.page_stride, s.k.row_stride);
    v = s.v.cache + paged_row_offset(s.pages, PAGE_ROWS(s), s.last_page, j, s.v.page_stride, s.v.row_stride);
#else
    k = s.k.cache + (i64)j * s.k.row_stride;
    v = s.v.cache + (i64)j * s.v.row_stride;
#endif
}

// This call's new row t (key cached + t): k_new / v_new row t.
__device__ __forceinline__ const elem_t* fresh_row(const KeyRows& r, int t) {
    return r.fresh + (i64)t * r.fresh_row_stride;
}

// ---- device helpers ---------------------------------------------------------------------------

#if KV_FP8
// x -> the FP8 code of the cache (fp8.h: saturating, round to nearest even, NaN kept).
__device__ __forceinline__ unsigned char float_to_fp8(float x) {
#if KV_FP8 == FP8_E4M3FN
    return float_to_e4m3fn(x);
#else
    return float_to_e5m2(x);
#endif
}
#endif

#if !ASYNC_COPIES
// A cache element's value as the synchronous copies write it into a ring of float32 (an FP8
// code's exact value, before the cache's scale).
__device__ __forceinline__ float ring_value(cache_t x) {
#if KV_FP8
    return KV_FP8 == FP8_E4M3FN ? e4m3fn_to_float(x) : e5m2_to_float(x);
#else
    return to_float(x);
#endif
}
#endif

// Copy one element-sized or 16-byte unit global -> shared, zeros where !valid (nothing is read).
// Asynchronous (platform.h: cp.async, completed by cp_async_wait) where the platform has it.
__device__ __forceinline__ void copy_unit(ring_t* dst, const cache_t* src, bool valid) {
#if VEC_LOADS
    cp_async_16_zfill_l2<L2_PREFETCH>(smem_addr(dst), src, valid);
#elif ASYNC_COPIES && ELEM_F32 && !KV_FP8
    cp_async_4_zfill(smem_addr(dst), src, valid);
#elif ASYNC_COPIES
    *dst = valid ? *src : (cache_t)0;
#else
    *dst = valid ? ring_value(*src) : 0.f;
#endif
}

#if KV_FP8
// CACHE_UNIT new-row elements -> their FP8 codes at dst (the cache, or a ring tile): x / scale in
// IEEE float32 (as the reference divides), then fp8.h's encoder. The append and every reader of a
// new row use this one function, so all of them see the codes the cache holds. Not inlined: new
// rows are few, and sixteen inlined encoders at every call site of the unrolled loads multiplied
// the compile time by ten. Inlined on AMD, whose kernels must call no function (ci/hip_compile.py)
// and copy element by element.
#if ASYNC_COPIES
#define QUANTIZE_INLINING __noinline__
#else
#define QUANTIZE_INLINING __forceinline__
#endif
__device__ QUANTIZE_INLINING void quantize_unit(cache_t* dst, const elem_t* src, float scale) {
#if VEC_LOADS
    u32 words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        words[w] = 0u;
#pragma unroll
        for (int e = 0; e < 4; ++e)
            words[w] |= (u32)float_to_fp8(__fdiv_rn(to_float(src[4 * w + e]), scale)) << (8 * e);
    }
    *(uint4*)dst = make_uint4(words[0], words[1], words[2], words[3]);
#else
    *dst = float_to_fp8(__fdiv_rn(to_float(*src), scale));
#endif
}
#endif

#if KV_FP8 && !ASYNC_COPIES
// The same into a ring of values (synchronous copies): the value of the code the cache will hold.
__device__ __forceinline__ void quantize_unit(float* dst, const elem_t* src, float scale) {
    static_assert(CACHE_UNIT == 1, "synchronous copies move one element at a time");
    cache_t code;
    quantize_unit(&code, src, scale);
    *dst = ring_value(code);
}
#endif

// One warp copies WARP_N keys, starting at key0, into its K and V tiles: zeros for keys
// >= key0 + valid_keys and columns >= head_dim (they must add nothing to Q.K, and V rows with
// P = 0 must not carry a NaN bit pattern in). Zero-filled copies read nothing, so keys past the
// end (and their pages) are never touched.
__device__ __forceinline__ void warp_load_keys(ring_t* sK, ring_t* sV, const KeySource& src, int key0,
                                               int valid_keys, int head_dim, int lane) {
    constexpr int UNITS_PER_ROW = HEAD_DIM / CACHE_UNIT;
    constexpr int LANES_PER_ROW = UNITS_PER_ROW < WAVE_SIZE ? UNITS_PER_ROW : WAVE_SIZE;
    constexpr int ROWS_PER_PASS = WAVE_SIZE / LANES_PER_ROW;
    constexpr int UNITS_PER_LANE = UNITS_PER_ROW / LANES_PER_ROW;
    static_assert(WARP_N % ROWS_PER_PASS == 0, "whole passes over the tile");
    const int row0 = lane / LANES_PER_ROW, col0 = (lane % LANES_PER_ROW) * CACHE_UNIT;
    // 16-byte copies: passes unrolled by 8 (all of them for 16-bit tiles up to D = 128), so many
    // copies are in flight. Element-wise copies: one pass at a time, or their addresses and values
    // would not fit the registers.
#if VEC_LOADS
#pragma unroll 8
#else
#pragma unroll 1
#endif
    for (int pass = 0; pass < WARP_N / ROWS_PER_PASS; ++pass) {
        const int row = row0 + pass * ROWS_PER_PASS;
        const bool row_valid = row < valid_keys;
        const int key = key0 + row;
#if KV_FP8
        if (FUSED_APPEND && row_valid && key >= src.cached) {  // a new row: quantized here, as the append does
            const elem_t* k = fresh_row(src.k, key - src.cached);
            const elem_t* v = fresh_row(src.v, key - src.cached);
#pragma unroll
            for (int j = 0; j < UNITS_PER_LANE; ++j) {
                const int col = col0 + j * LANES_PER_ROW * CACHE_UNIT, from = ring_col(row, col);
                if (from < head_dim) {
                    quantize_unit(sK + row * CACHE_STRIDE + col, k + from, src.k.scale);
                    quantize_unit(sV + row * CACHE_STRIDE + col, v + from, src.v.scale);
                } else {
#pragma unroll
                    for (int e = 0; e < CACHE_UNIT; ++e) sK[row * CACHE_STRIDE + col + e] = sV[row * CACHE_STRIDE + col + e] = 0;
                }
            }
            continue;
        }
        const cache_t* k = src.k.cache;  // any address: a zero-filled copy reads nothing
        const cache_t* v = src.v.cache;
        if (row_valid) cache_rows(src, key, k, v);
#else
        const cache_t* k = src.k.cache;  // any address: a zero-filled copy reads nothing
        const cache_t* v = src.v.cache;
        if (row_valid) {
            if (FUSED_APPEND && key >= src.cached) {
                k = fresh_row(src.k, key - src.cached);
                v = fresh_row(src.v, key - src.cached);
            } else {
                cache_rows(src, key, k, v);
            }
        }
#endif
#pragma unroll
        for (int j = 0; j < UNITS_PER_LANE; ++j) {
            const int col = col0 + j * LANES_PER_ROW * CACHE_UNIT, from = ring_col(row, col);
            const bool valid = row_valid && from < head_dim;
            copy_unit(sK + row * CACHE_STRIDE + col, k + from, valid);
            copy_unit(sV + row * CACHE_STRIDE + col, v + from, valid);
        }
    }
}

#if FP8_TILES
static_assert(!RING_SWIZZLE, "the float32 kernel's rings are read in place, unswizzled");
// A landed ring tile of FP8 codes -> the warp's tile of their exact values, every element of the
// padded HEAD_DIM (zero codes give zeros). Lane l converts 8 codes at a time (one 8-byte read, two
// float4 writes); the caller __syncwarp()s before and after.
__device__ __forceinline__ void convert_tile(tile_t* dst, const cache_t* src, int lane) {
    constexpr int PIECES_PER_ROW = HEAD_DIM / 8;
#pragma unroll 4
    for (int u = lane; u < WARP_N * PIECES_PER_ROW; u += WAVE_SIZE) {
        const int row = u / PIECES_PER_ROW, col = (u % PIECES_PER_ROW) * 8;
        const uint2 codes = *(const uint2*)(src + row * CACHE_STRIDE + col);
        const u32 words[2] = {codes.x, codes.y};
        tile_t* out = dst + row * TILE_STRIDE + col;
#pragma unroll
        for (int w = 0; w < 2; ++w) {
            float4 x;
            fp8x2_to_float2((u16)(words[w] & 0xffffu), x.x, x.y);
            fp8x2_to_float2((u16)(words[w] >> 16), x.z, x.w);
            *(float4*)(out + 4 * w) = x;
        }
    }
}
#endif

#if KV_FP8 && !DECODE_SIMT
// The tensor-core kernel's Q tile under FP8 caches: column c of Q goes to column fp8_q_slot(c)
// of the tile (a permutation inside each 16 columns, flash_decode.cu explains it).
__device__ __forceinline__ int fp8_q_slot(int c) {
    const int r = c & 15, t = r >> 2, j = r & 3;
    return (c & ~15) + 2 * t + (j & 1) + (j >> 1) * 8;
}
#endif

#if KV_FP8 && !DECODE_SIMT
// The tensor-core kernel's Q tile under FP8 caches is float16 (the products' type, platform.h),
// scaled by q_scale = 2^k that puts the tile's largest |q| (amax) in [2^14, 2^15): no value
// overflows float16, and every value down to amax * 2^-28 keeps all its bits (a bfloat16 value has
// 8 significant bits, float16 11). Exact powers of two, so the scores divide q_scale back out
// exactly. A tile of zeros, or with an infinite |q|, stays unscaled (NaN is ignored by the max and
// propagates through the tile as it would unscaled).
__device__ __forceinline__ float q_tile_scale(float amax) {
    if (!(amax > 0.f && amax < -NEG_INF)) return 1.f;
    const int e = max((int)((__float_as_uint(amax) >> 23) & 0xffu) - 127, -100);  // amax in [2^e, 2^(e+1))
    return __uint_as_float((u32)(127 + 14 - e) << 23);
}
#endif

// The Q tile: row r (r < rows) is query head r / seqlen_q of the group, token r % seqlen_q.
// Loaded once per block with plain loads; zeros past the last row and column. Returns the factor
// the tile's values were multiplied by: 1, but q_tile_scale's under FP8 caches on tensor cores.
__device__ __forceinline__ float load_q_tile(tile_t* sQ, const DecodeParams& p, const DecodeBlock& b, int tid) {
    constexpr int UNITS_PER_ROW = HEAD_DIM / UNIT_ELEMS;
    const elem_t* q = (const elem_t*)p.q.ptr + (i64)b.batch * p.q.batch_stride +
                      (i64)b.kv_head * p.heads_per_kv * p.q.head_stride;
    auto unit = [&](int u, int& row, int& col, bool& valid) {  // unit u's source, row and column
        row = u / UNITS_PER_ROW;
        col = (u % UNITS_PER_ROW) * UNIT_ELEMS;
        const int r = b.m_start + row;
        valid = r < b.rows && col < p.head_dim;
        return q + (i64)(r / p.seqlen_q) * p.q.head_stride + (i64)(r % p.seqlen_q) * p.q.row_stride + col;
    };
#if KV_FP8 && !DECODE_SIMT
    // Every warp finds the tile's largest |q| on its own: the tile is small, and no barrier is needed.
    float amax = 0.f;
    for (int u = tid % WAVE_SIZE; u < BLOCK_M * UNITS_PER_ROW; u += WAVE_SIZE) {
        int row, col;
        bool valid;
        const elem_t* src = unit(u, row, col, valid);
        if (valid)
#pragma unroll
            for (int e = 0; e < UNIT_ELEMS; ++e) amax = fmaxf(amax, fabsf(to_float(src[e])));
    }
#pragma unroll
    for (int offset = WAVE_SIZE / 2; offset > 0; offset /= 2) amax = fmaxf(amax, shfl_xor(amax, offset));
    const float q_scale = q_tile_scale(amax);
#else
    const float q_scale = 1.f;
#endif
    for (int u = tid; u < BLOCK_M * UNITS_PER_ROW; u += NUM_THREADS) {
        int row, col;
        bool valid;
        const elem_t* src = unit(u, row, col, valid);
#if KV_FP8 && !DECODE_SIMT
#pragma unroll
        for (int e = 0; e < UNIT_ELEMS; ++e)
            sQ[row * TILE_STRIDE + fp8_q_slot(col + e)] =
                valid ? (elem_t)(pack_half2(to_float(src[e]) * q_scale, 0.f) & 0xffffu) : (elem_t)0;
#elif VEC_LOADS
        static_assert(sizeof(tile_t) == sizeof(elem_t), "16-byte copies move the elements as they are");
        uint4 x = make_uint4(0, 0, 0, 0);
        if (valid) x = *(const uint4*)src;
        *(uint4*)(sQ + row * TILE_STRIDE + col) = x;
#else
        sQ[row * TILE_STRIDE + col] = valid ? to_tile(*src) : (tile_t)0;
#endif
    }
    return q_scale;
}

// The keys [row_lo, row_hi) each tile row's token sees.
__device__ __forceinline__ void row_limits(int* row_lo, int* row_hi, const DecodeParams& p,
                                           const DecodeBlock& b, int tid) {
    if (tid < BLOCK_M) {
        const int token = (b.m_start + tid) % p.seqlen_q;
        row_lo[tid] = max(visible_key_begin(token, b.band), b.leftpad);
        row_hi[tid] = visible_key_end(token, b.band, b.seqlen_k);
    }
}

// The fused append: row t of k_new / v_new goes to cache row cached + t (dropped at or past Smax).
// The blocks of one (batch, kv head) share the rows, block x taking rows x, x + blocks, ...
// FP8 caches: the rows are quantized (quantize_unit), CACHE_UNIT codes per store.
__device__ __forceinline__ void append_new_rows(const DecodeParams& p, const KeySource& s, int tid) {
    const int blocks = gridDim.x;
    const int units_per_row = p.head_dim / CACHE_UNIT;  // exact with VEC_LOADS
    const int my_rows = p.seqlen_new > (int)blockIdx.x ? (p.seqlen_new - 1 - blockIdx.x) / blocks + 1 : 0;
    for (int u = tid; u < my_rows * units_per_row; u += NUM_THREADS) {
        const int t = blockIdx.x + (u / units_per_row) * blocks, col = (u % units_per_row) * CACHE_UNIT;
        const int pos = s.cached + t;
        if (pos >= p.seqlen_max) continue;
        cache_t* kd = (cache_t*)s.k.cache + cache_row_offset(s, s.k, pos) + col;
        cache_t* vd = (cache_t*)s.v.cache + cache_row_offset(s, s.v, pos) + col;
        const elem_t* ks = fresh_row(s.k, t) + col;
        const elem_t* vs = fresh_row(s.v, t) + col;
#if KV_FP8
        quantize_unit(kd, ks, s.k.scale);
        quantize_unit(vd, vs, s.v.scale);
#elif VEC_LOADS
        *(uint4*)kd = *(const uint4*)ks;
        *(uint4*)vd = *(const uint4*)vs;
#else
        *kd = *ks;
        *vd = *vs;
#endif
    }
}

// Scores in base-2 units: s2 = scale_log2 * s, or with SOFTCAP c * log2(e) * tanh(scale * s / c).
// The tanh is attention_common.h's softcap_score (platform.h's fast_tanh). s is the raw product of
// the tiles, q.k, or with FP8 caches q.k8 (k = k8 * k_scale): `factor` (score_factor, once per
// block) carries scale_log2 or scale / c, times k_scale.
__device__ __forceinline__ float score_factor(const DecodeParams& p, const KeySource& src) {
#if SOFTCAP
    return p.scale_over_softcap * src.k.scale;
#else
    return p.scale_log2 * src.k.scale;
#endif
}

__device__ __forceinline__ float score_log2(float s, float factor, const DecodeParams& p) {
#if SOFTCAP
    return p.softcap_log2 * softcap_score(s, factor);
#else
    return s * factor;
#endif
}

// Online-softmax state update for one row: fold in the new max, return the rescale factor of the
// old state. A row that has seen no key yet keeps m = -inf; offset 0 then keeps exp2(-inf - m)
// from becoming exp2(-inf + inf) = NaN.
__device__ __forceinline__ float update_max(float& row_max, float tile_max, float& offset) {
    const float m_new = fmaxf(row_max, tile_max);
    const bool row_empty = m_new == NEG_INF;
    offset = row_empty ? 0.f : m_new;
    const float alpha = row_empty ? 1.f : fast_exp2(row_max - m_new);
    row_max = m_new;
    return alpha;
}

// A sink, one more key of score sink2 (base 2) and value 0, folded into a row's LSE (base 2):
// returns the new LSE and sets *o_scale, the factor of the row's normalized O. A row with no key
// (LSE -inf) gets LSE = sink2 and O scaled by 0; a NaN LSE stays NaN (the comparison, unlike
// fmaxf, does not drop it).
__device__ __forceinline__ float add_sink(float lse2, float sink2, float* o_scale) {
    const float m = lse2 > sink2 ? lse2 : sink2;
    const float lse2_new = m + __log2f(fast_exp2(lse2 - m) + fast_exp2(sink2 - m));
    *o_scale = fast_exp2(lse2 - lse2_new);
    return lse2_new;
}

// ---- epilogue: the merged rows of this block, out -----------------------------------------------
// Reads the warps' merged O (sO, weighted sums) and their m and l (sM, sL); writes the final rows
// (one split, sinks folded in here) or this split's partials for flash_decode_merge.
// Row r: m = max_w m_w, L = sum_w 2^(m_w - m) l_w, O = sO / L, LSE = m + log2 L. A row with no key
// in this split has L = 0: O = 0 and LSE = -inf. A NaN that reached the row makes L NaN, and O and
// LSE NaN with it.
// v_scale: FP8 caches' V scale of this kv head (1 otherwise), a factor of every O written.
__device__ __forceinline__ void write_rows(const DecodeParams& p, const DecodeBlock& b, const float* sO,
                                           const float* sM, const float* sL, float v_scale, int tid) {
    for (int u = tid; u < BLOCK_M * (HEAD_DIM / 4); u += NUM_THREADS) {
        const int row = u / (HEAD_DIM / 4), col = (u % (HEAD_DIM / 4)) * 4;
        const int r = b.m_start + row;
        if (r >= b.rows) continue;
        float m = NEG_INF;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) m = fmaxf(m, sM[w * BLOCK_M + row]);
        float l = 0.f;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) {
            const float mw = sM[w * BLOCK_M + row];
            if (mw != NEG_INF) l += fast_exp2(mw - m) * sL[w * BLOCK_M + row];
        }
        const float4 acc = *(const float4*)(sO + row * OUT_STRIDE + col);
        float inv_l = l != 0.f ? v_scale / l : 0.f;
        float lse2 = l != 0.f ? m + __log2f(l) : NEG_INF;
        const int head = b.kv_head * p.heads_per_kv + r / p.seqlen_q, token = r % p.seqlen_q;
        if (p.num_splits == 1) {  // the final result
            if (p.sinks != nullptr) {
                float o_scale;
                lse2 = add_sink(lse2, p.sinks[head] * LOG2_E, &o_scale);
                inv_l *= o_scale;
            }
            elem_t* dst = (elem_t*)p.o.ptr + (i64)b.batch * p.o.batch_stride + (i64)head * p.o.head_stride +
                          (i64)token * p.o.row_stride + col;
            const float out[4] = {acc.x * inv_l, acc.y * inv_l, acc.z * inv_l, acc.w * inv_l};
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (col + e < p.head_dim) dst[e] = from_float(out[e]);
            if (p.lse.ptr != nullptr && col == 0)
                ((float*)p.lse.ptr)[(i64)b.batch * p.lse.batch_stride + (i64)head * p.lse.head_stride + token] =
                    lse2 * LN_2;
        } else {  // this split's partial, merged by flash_decode_merge
            const i64 part_row = (((i64)b.batch * p.heads_q + head) * p.seqlen_q + token) * p.num_splits + b.split;
            *(float4*)(p.o_part + part_row * HEAD_DIM + col) =
                make_float4(acc.x * inv_l, acc.y * inv_l, acc.z * inv_l, acc.w * inv_l);
            if (col == 0) p.lse_part[part_row] = lse2;
        }
    }
}
