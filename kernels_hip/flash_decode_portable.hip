// Flash-decoding on HIP without matrix instructions: attention of a few query tokens against a long
// KV cache, the keys split over thread blocks, every product a plain FMA over float32 LDS tiles.
// The wave size is a compile-time parameter, so the same source runs in wave64 (CDNA, GCN), wave32
// (RDNA) and, through the test-only tests/hip_on_cuda.h, on NVIDIA GPUs (tests/test_hip_decode.py).
//
// Same semantics as kernels_cuda/flash_decode.cu (xattn.attention_with_kvcache):
// - Keys of sequence b: cache rows [0, Sk_b), Sk_b = min(clamp(cache_seqlens[b], 0, Smax) + Snew,
//   Smax), after kvcache_append (below) wrote k_new/v_new at rows [cache_seqlens[b], +Snew), rows at
//   or past Smax dropped. Nothing outside [0, Smax) is read or written. With cache_leftpad, the
//   rows below clamp(cache_leftpad[b], 0, cached) are masked and never read (load_rows).
// - Masks and softcap: attention_common.h's band, bottom-right aligned with Sk_b (query token i
//   sees key j iff i + Sk_b - Sq - left <= j <= i + Sk_b - Sq + right), and modified_score.
// - GQA: the Hq / Hk query heads that share a kv head, times the Sq tokens, are the rows of one
//   tile (row r = head-in-group * Sq + token), so each K/V tile is read once for the whole group;
//   more rows than BLOCK_M take further row tiles (m_blocks).
// - Split-KV: the key tiles the group's tokens see are cut into num_splits runs of whole tiles, one
//   block per run. A block keeps the online-softmax state (m_i, l_i, O) of its rows over its run
//   and writes, with one split, the output itself (O / l, natural-log LSE), else a partial
//   (O / l and LSE2 = m * scale_log2 + log2(l), base 2) that flash_decode_merge combines:
//   LSE2 = log2(sum_s 2^LSE2_s), O = sum_s 2^(LSE2_s - LSE2) O_s. An empty run (more splits than
//   tiles, or no visible key) writes the empty-row result, O = 0 and LSE = -inf.
//
// Inside a block the loop is flash_fwd_portable.hip's: for S = Q K^T a wave splits into ROW_GROUPS
// groups of BLOCK_N lanes, lane (g, n) scoring key n against rows g, g + ROW_GROUPS, ...; for
// O += P V lane l owns head dims l, l + WAVE_SIZE, ... of the wave's rows, P through LDS.
//
// Grid: x = split * m_blocks + m_block, y = kv head, z = batch. Block: NUM_WAVES waves.
// Layouts: q, o (B, Hq, Sq, D); k, v (B, Hk, Smax, D); each with batch, head and row strides in
// elements, D contiguous. lse (B, Hq, Sq) float32, natural log (or null: not written). Partials:
// o_part (B, Hq, Sq, num_splits, HEAD_DIM) and lse_part (B, Hq, Sq, num_splits) float32.
// Run time: all three entry points take one DecodeParams by value (kernels_common/params.h, the
// CUDA decode's block; xattn/hip.py's launch_decode fills it): k and v are the caches, batch z is
// blockIdx.z + batch_offset.
// Sinks (p.sinks non-null, read at run time as the CUDA decode does): query head h's sink is one
// more key of score sinks[h] and value 0. It touches no tile: with one split the decode's epilogue
// folds it into the row's LSE and O (attention_common.h, fold_sink), with several the merge adds
// it as one more partial of LSE2 sinks[h] * log2(e) and O 0 (kernels_cuda/flash_decode_merge.cu's
// rule).
// FP8 caches (KV_FP8): the caches hold float8 codes of x / scale (kernels_common/fp8.h; one float32
// scale per tensor or per kv head, p.k_scale and p.v_scale). Tiles are float32 in LDS anyway, so
// each code is decoded there, exactly, with fp8.h's integer decoders: portable C, the OCP formats
// (float8_e4m3fn, float8_e5m2); CDNA3's hardware conversions are for the FNUZ formats, which
// differ, and are not used. The scales never touch the tiles: a block serves one kv head, so
// k_scale joins the scores' factor (S = Q K8^T * k_scale) and v_scale the rows' 1 / l
// (O = P V8 * v_scale). The append quantizes k_new / v_new with fp8.h's encoders (x / scale in
// IEEE float32, as the reference divides) before the decode reads them from the cache. The
// matrix-core decode has no FP8 variant: xattn/configs.py sends FP8 caches here.
// Paged caches (IS_PAGED): k and v are (num_pages, page_size, Hk, D), k.batch_stride and
// v.batch_stride the page strides, and cache row j of sequence b lives at page
// block_table[b, j / page_size], row j % page_size; Smax = max_pages * page_size, so
// j / page_size stays in the table's row. Rows are found through attention_common.h's
// paged_row_offset, as the CUDA decode's (decode_common.h): page ids clamped to [0, num_pages),
// so a bad table reads or writes wrong pages, never memory outside the caches or the table.

// ---- compile-time configuration (set with -D by xattn/kernels.py) ------------------------------
// ELEM_TYPE   0: float16, 1: bfloat16, 2: float32
// HEAD_DIM    padded head dim (multiple of WAVE_SIZE);  BLOCK_N  keys per tile (divides WAVE_SIZE)
// BLOCK_M     query rows per tile;  NUM_WAVES  waves per block;  WAVE_SIZE  32 or 64
// IS_CAUSAL, IS_LOCAL: the band's right and left edges;  HAS_SOFTCAP  (attention_common.h)
// IS_PAGED    caches in pages through block_table (page_size, num_pages: run-time fields)
// KV_FP8      0: the caches hold elem_t; FP8_E4M3FN (1) / FP8_E5M2 (2): float8 codes (fp8.h)

#include "platform.h"
#include "../kernels_common/attention_common.h"
#include "../kernels_common/fp8.h"

#ifndef KV_FP8
#define KV_FP8 0
#endif

#define NUM_THREADS (NUM_WAVES * WAVE_SIZE)
#define ROWS_PER_WAVE (BLOCK_M / NUM_WAVES)
#define ROW_GROUPS (WAVE_SIZE / BLOCK_N)
#define ROWS_PER_LANE (ROWS_PER_WAVE / ROW_GROUPS)
#define D_PER_LANE (HEAD_DIM / WAVE_SIZE)
#define QK_STRIDE (HEAD_DIM + 1)  // odd: a group's lanes read one dim of different rows, different banks
#define LN_2 0.6931471805599453f

static_assert(WAVE_SIZE % BLOCK_N == 0, "a wave holds whole groups of BLOCK_N lanes");
static_assert(BLOCK_M % NUM_WAVES == 0 && ROWS_PER_WAVE % ROW_GROUPS == 0, "rows split evenly");
static_assert(HEAD_DIM % WAVE_SIZE == 0, "each lane owns whole head dims");

// ---- LDS layout (float32) ---------------------------------------------------------------------
// sQ [BLOCK_M][QK_STRIDE] | sK [BLOCK_N][QK_STRIDE] | sV [BLOCK_N][HEAD_DIM] | sP [BLOCK_M][BLOCK_N]
// | sRow [BLOCK_M]: flash_fwd_portable.hip's layout; xattn/kernels.py computes the same size.

// ---- device helpers ---------------------------------------------------------------------------

// cache_t: one cache element in memory; cache_to_float: its value (for FP8 codes, before the
// cache's scale, which is applied later); float_to_cache (FP8): x / scale as the cache stores it.
#if KV_FP8
typedef unsigned char cache_t;
__device__ __forceinline__ float cache_to_float(cache_t code) {
    return KV_FP8 == FP8_E4M3FN ? e4m3fn_to_float(code) : e5m2_to_float(code);
}
// x / scale in IEEE float32: division is correctly rounded by default with hiprtc, clang's HIP
// mode and NVRTC (no fast-math flag is passed), so the code matches the reference's quantize.
__device__ __forceinline__ cache_t float_to_cache(float x, float scale) {
    return KV_FP8 == FP8_E4M3FN ? float_to_e4m3fn(x / scale) : float_to_e5m2(x / scale);
}
#else
typedef elem_t cache_t;
__device__ __forceinline__ float cache_to_float(cache_t x) { return to_float(x); }
#endif

// The cache's scale for kv head `kv_head` (KV_FP8; 1 otherwise): per tensor (stride 0) or per head.
__device__ __forceinline__ float cache_scale(const float* scale, i64 stride, int kv_head) {
    return KV_FP8 ? scale[kv_head * stride] : 1.f;
}

__device__ __forceinline__ float group_max(float x) {
#pragma unroll
    for (int lane_mask = BLOCK_N / 2; lane_mask > 0; lane_mask /= 2) x = fmaxf(x, shfl_xor(x, lane_mask));
    return x;
}

__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int lane_mask = BLOCK_N / 2; lane_mask > 0; lane_mask /= 2) x += shfl_xor(x, lane_mask);
    return x;
}

// One kv head's cache rows of one sequence: contiguous from `head`, or (IS_PAGED) spread over the
// sequence's pages, `head` then being the kv head's column of page 0.
struct CacheRows {
    i64 row_stride;
    i64 page_stride;   // IS_PAGED: elements from one page to the next
    const int* pages;  // IS_PAGED: this sequence's row of the block table
    int page_size;
    int last_page;     // num_pages - 1: page ids are clamped to [0, last_page]
};

__device__ __forceinline__ CacheRows cache_rows(const DecodeParams& p, const TensorRef& cache, int batch) {
    CacheRows c;
    c.row_stride = cache.row_stride;
    c.page_stride = cache.batch_stride;
    c.pages = IS_PAGED ? p.block_table + (i64)batch * p.block_table_stride : nullptr;
    c.page_size = p.page_size;
    c.last_page = p.num_pages - 1;
    return c;
}

// The kv head's base of a cache: pages hold every sequence, so only the contiguous form steps
// over batch entries.
__device__ __forceinline__ i64 cache_head_offset(const TensorRef& cache, int batch, int kv_head) {
    return (IS_PAGED ? 0 : (i64)batch * cache.batch_stride) + (i64)kv_head * cache.head_stride;
}

// Offset in elements of cache row j (0 <= j < Smax) from the kv head's base.
__device__ __forceinline__ i64 cache_row_offset(const CacheRows& c, int j) {
#if IS_PAGED
    return paged_row_offset(c.pages, c.page_size, c.last_page, j, c.page_stride, c.row_stride);
#else
    return (i64)j * c.row_stride;
#endif
}

// Copy cache rows [row0, row0 + rows) of head_dim elements into LDS as float32, zeros for rows
// before row0 + skip_rows or at or past row0 + valid_rows and for columns >= head_dim: the left
// padding and the rows past Sk_b (and their pages, and their entries of the block table) are never
// read.
__device__ __forceinline__ void load_rows(float* smem, int smem_stride, const cache_t* head, const CacheRows& c,
                                          int row0, int rows, int skip_rows, int valid_rows, int head_dim, int tid) {
    for (int e = tid; e < rows * HEAD_DIM; e += NUM_THREADS) {
        const int row = e / HEAD_DIM, col = e % HEAD_DIM;
        const bool valid = row >= skip_rows && row < valid_rows && col < head_dim;
        smem[row * smem_stride + col] = valid ? cache_to_float(head[cache_row_offset(c, row0 + row) + col]) : 0.f;
    }
}

// The Q rows of this tile: row r is query head kv_head * heads_per_kv + r / Sq, token r % Sq.
__device__ __forceinline__ void load_q_rows(float* sQ, const elem_t* q, i64 q_head_stride, i64 q_row_stride,
                                            int m_start, int rows, int seqlen_q, int head_dim, int tid) {
    for (int e = tid; e < BLOCK_M * HEAD_DIM; e += NUM_THREADS) {
        const int row = e / HEAD_DIM, col = e % HEAD_DIM, r = m_start + row;
        const bool valid = r < rows && col < head_dim;
        sQ[row * QK_STRIDE + col] =
            valid ? to_float(q[(r / seqlen_q) * q_head_stride + (r % seqlen_q) * q_row_stride + col]) : 0.f;
    }
}

// ---- entry points -----------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_decode_portable(const DecodeParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names. The softmax's scale
    // is the softcap c under a softcap (attention_common.h): its exp2 factor is then c * log2(e).
    TENSOR_FROM_PARAMS(const elem_t, q, p.q);
    TENSOR_FROM_PARAMS(const cache_t, k, p.k);
    TENSOR_FROM_PARAMS(const cache_t, v, p.v);
    TENSOR_FROM_PARAMS(elem_t, o, p.o);
    TENSOR_FROM_PARAMS(float, lse, p.lse);
    float* __restrict__ o_part = p.o_part;
    float* __restrict__ lse_part = p.lse_part;
    const int seqlen_q = p.seqlen_q, seqlen_max = p.seqlen_max, head_dim = p.head_dim;
    const int heads_per_kv = p.heads_per_kv, num_splits = p.num_splits, m_blocks = p.m_blocks;
    extern __shared__ float smem_f32[];
    float* sQ = smem_f32;
    float* sK = sQ + BLOCK_M * QK_STRIDE;
    float* sV = sK + BLOCK_N * QK_STRIDE;
    float* sP = sV + BLOCK_N * HEAD_DIM;
    float* sRow = sP + BLOCK_M * BLOCK_N;

    const int m_block = blockIdx.x % m_blocks, split = blockIdx.x / m_blocks;
    const int kv_head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int tid = threadIdx.x, wave = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int key = lane % BLOCK_N, group = lane / BLOCK_N;  // this lane's key and row group in S
    const int rows = heads_per_kv * seqlen_q;  // query rows of this (batch, kv head)
    const int m_start = m_block * BLOCK_M;
    const int wave_row0 = wave * ROWS_PER_WAVE;
    // FP8 caches' scales of this kv head (1 otherwise): k_scale joins the scores' factor (under a
    // softcap, the factor inside tanh; the softmax's scale is then c), v_scale the rows' 1 / l.
    const float k_scale = cache_scale(p.k_scale, p.k_scale_stride, kv_head);
    const float v_scale = cache_scale(p.v_scale, p.v_scale_stride, kv_head);
    const float scale_log2 = HAS_SOFTCAP ? p.softcap_log2 : p.scale_log2 * k_scale;
    // Row of the i-th score this lane computes, within the tile, and its query token.
    #define LANE_ROW(i) (wave_row0 + group + (i) * ROW_GROUPS)
    #define TOKEN(row) ((m_start + (row)) % seqlen_q)

    // Sequence b's keys, and the band of its tokens (attention_common.h, aligned with Sk_b).
    const int cached = min(max(p.cache_seqlens ? p.cache_seqlens[batch * p.seqlens_stride] : p.uniform_seqlen, 0),
                           seqlen_max);
    const int seqlen_k = min(cached + p.seqlen_new, seqlen_max);
    const int leftpad = p.cache_leftpad ? min(max(p.cache_leftpad[batch * p.leftpad_stride], 0), cached) : 0;
    // No ALiBi in the decode: the score scale make_score_mods takes for it is never read.
    const ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, p.window_left, p.window_right,
                                           p.scale_over_softcap * k_scale, nullptr, 1.f);
    // The key tiles any token sees (none below the left padding), and this split's run of them.
    KeyRange band_tiles = key_tiles(0, seqlen_q, BLOCK_N, seqlen_k, mods.band);
    band_tiles.tile_begin = max(band_tiles.tile_begin, leftpad / BLOCK_N);
    const int band_count = max(0, band_tiles.tile_end - band_tiles.tile_begin);
    const int per_split = (band_count + num_splits - 1) / num_splits;
    const int tile_begin = band_tiles.tile_begin + split * per_split;
    const int tile_end = min(band_tiles.tile_begin + band_count, tile_begin + per_split);

    q += batch * q_batch_stride + (i64)kv_head * heads_per_kv * q_head_stride;
    k += cache_head_offset(p.k, batch, kv_head);
    v += cache_head_offset(p.v, batch, kv_head);
    const CacheRows k_rows = cache_rows(p, p.k, batch), v_rows = cache_rows(p, p.v, batch);
    load_q_rows(sQ, q, q_head_stride, q_row_stride, m_start, rows, seqlen_q, head_dim, tid);

    float acc_o[ROWS_PER_WAVE][D_PER_LANE];                // O rows of the wave, this lane's dims
    float row_max[ROWS_PER_LANE], row_sum[ROWS_PER_LANE];  // row_sum: this lane's keys only
#pragma unroll
    for (int r = 0; r < ROWS_PER_WAVE; ++r)
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] = 0.f;
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) {
        row_max[i] = NEG_INF;
        row_sum[i] = 0.f;
    }

    for (int tile = tile_begin; tile < tile_end; ++tile) {
        const int n_start = tile * BLOCK_N;
        __syncthreads();  // every wave is done with the previous K, V and P tiles
        const int padding_rows = max(0, leftpad - n_start);  // never read: zeros
        load_rows(sK, QK_STRIDE, k, k_rows, n_start, BLOCK_N, padding_rows, seqlen_k - n_start, head_dim, tid);
        load_rows(sV, HEAD_DIM, v, v_rows, n_start, BLOCK_N, padding_rows, seqlen_k - n_start, head_dim, tid);
        __syncthreads();  // K and V tiles (and, the first time, Q) visible to every wave

        // S = Q K^T: this lane's key against its rows.
        float s[ROWS_PER_LANE];
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) s[i] = 0.f;
        for (int d = 0; d < head_dim; ++d) {
            const float k_d = sK[key * QK_STRIDE + d];
#pragma unroll
            for (int i = 0; i < ROWS_PER_LANE; ++i) s[i] = fmaf(sQ[LANE_ROW(i) * QK_STRIDE + d], k_d, s[i]);
        }

        // Softcap and the band's mask (every tile: the band is per token), then the online softmax.
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) {
            s[i] = n_start + key < leftpad ? NEG_INF : modified_score(s[i], TOKEN(LANE_ROW(i)), n_start + key, mods, true);
            const float m_new = group_max(fmaxf(row_max[i], s[i]));
            const bool row_empty = m_new == NEG_INF;  // no key seen yet: offset 0 keeps exp2 from NaN
            const float offset = row_empty ? 0.f : m_new * scale_log2;
            const float alpha = row_empty ? 1.f : fast_exp2((row_max[i] - m_new) * scale_log2);
            row_max[i] = m_new;
            const float p = fast_exp2(s[i] * scale_log2 - offset);
            row_sum[i] = row_sum[i] * alpha + p;
            sP[LANE_ROW(i) * BLOCK_N + key] = p;
            if (key == 0) sRow[LANE_ROW(i)] = alpha;
        }
        __syncthreads();  // P and alpha visible to every lane (a block barrier: portable)

        // O = alpha O + P V: this lane's head dims of every row of the wave.
#pragma unroll
        for (int r = 0; r < ROWS_PER_WAVE; ++r) {
            const float alpha = sRow[wave_row0 + r];
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] *= alpha;
        }
        for (int n = 0; n < BLOCK_N; ++n) {
            float v_n[D_PER_LANE];
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) v_n[i] = sV[n * HEAD_DIM + lane + i * WAVE_SIZE];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WAVE; ++r) {
                const float p = sP[(wave_row0 + r) * BLOCK_N + n];
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] = fmaf(p, v_n[i], acc_o[r][i]);
            }
        }
    }

    // Epilogue: l = the group's sum; v_scale / l through LDS to the lanes that own the dims. A row
    // with no key in this run has l = 0: O = 0, LSE = -inf. With one split the result is final (LSE
    // in natural log, the sink folded into it and into O), else a partial for the merge (LSE in
    // base 2; the merge adds the sink).
    const int heads_q = p.heads_q;
    __syncthreads();  // every wave is done reading sRow as rescale factors
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) {
        const float l = group_sum(row_sum[i]);
        const int r = m_start + LANE_ROW(i);
        float inv_l = l != 0.f ? v_scale / l : 0.f;
        if (r < rows) {
            const int head = kv_head * heads_per_kv + r / seqlen_q, token = r % seqlen_q;
            const float lse2 = l != 0.f ? row_max[i] * scale_log2 + log2f(l) : NEG_INF;
            if (num_splits == 1) {
                float row_lse = lse2 * LN_2;
                if (p.sinks != nullptr) row_lse = fold_sink(row_lse, p.sinks[head], &inv_l);
                if (key == 0 && lse != nullptr)
                    lse[batch * lse_batch_stride + head * lse_head_stride + token] = row_lse;
            } else if (key == 0) {
                lse_part[(((i64)batch * heads_q + head) * seqlen_q + token) * num_splits + split] = lse2;
            }
        }
        if (key == 0) sRow[LANE_ROW(i)] = inv_l;
    }
    __syncthreads();  // 1 / l of every row visible
#pragma unroll
    for (int row_in_wave = 0; row_in_wave < ROWS_PER_WAVE; ++row_in_wave) {
        const int row = wave_row0 + row_in_wave, r = m_start + row;
        if (r >= rows) break;
        const int head = kv_head * heads_per_kv + r / seqlen_q, token = r % seqlen_q;
        const float inv_l = sRow[row];
        if (num_splits == 1) {
            elem_t* dst = o + batch * o_batch_stride + head * o_head_stride + token * o_row_stride;
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) {
                const int col = lane + i * WAVE_SIZE;
                if (col < head_dim) dst[col] = from_float(acc_o[row_in_wave][i] * inv_l);
            }
        } else {
            float* dst = o_part + ((((i64)batch * heads_q + head) * seqlen_q + token) * num_splits + split) * HEAD_DIM;
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) dst[lane + i * WAVE_SIZE] = acc_o[row_in_wave][i] * inv_l;
        }
    }
    #undef LANE_ROW
    #undef TOKEN
}

// Combine the num_splits partials of each query row, one wave per row:
// LSE2 = log2(sum_s 2^LSE2_s), O = sum_s 2^(LSE2_s - LSE2) O_s; splits with LSE2_s = -inf add
// nothing; the row's sink (if any) is one more partial of LSE2 sinks[h] * log2(e) and O 0. Grid: x over the (B, Hq, Sq) rows of a batch entry in groups of NUM_WAVES, z = batch.
extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_decode_merge_portable(const DecodeParams p) {
    TENSOR_FROM_PARAMS(elem_t, o, p.o);
    TENSOR_FROM_PARAMS(float, lse, p.lse);
    const float* __restrict__ o_part = p.o_part;
    const float* __restrict__ lse_part = p.lse_part;
    const int heads_q = p.heads_q, seqlen_q = p.seqlen_q, head_dim = p.head_dim, num_splits = p.num_splits;
    const int wave = threadIdx.x / WAVE_SIZE, lane = threadIdx.x % WAVE_SIZE;
    const int row = blockIdx.x * NUM_WAVES + wave, batch = blockIdx.z + p.batch_offset;
    if (row >= heads_q * seqlen_q) return;  // the whole wave leaves together
    const int head = row / seqlen_q, token = row % seqlen_q;
    const i64 part_row = ((i64)batch * heads_q * seqlen_q + row) * num_splits;
    const float* lp = lse_part + part_row;
    const float* op = o_part + part_row * HEAD_DIM;
    const float sink2 = p.sinks != nullptr ? p.sinks[head] * LOG2_E : NEG_INF;

    float m = sink2;
    for (int s = lane; s < num_splits; s += WAVE_SIZE) m = fmaxf(m, lp[s]);
    for (int lane_mask = WAVE_SIZE / 2; lane_mask > 0; lane_mask /= 2) m = fmaxf(m, shfl_xor(m, lane_mask));
    float sum = 0.f;
    for (int s = lane; s < num_splits; s += WAVE_SIZE)
        if (lp[s] != NEG_INF) sum += fast_exp2(lp[s] - m);  // a NaN LSE_s makes the sum NaN
    for (int lane_mask = WAVE_SIZE / 2; lane_mask > 0; lane_mask /= 2) sum += shfl_xor(sum, lane_mask);
    if (sink2 != NEG_INF) sum += fast_exp2(sink2 - m);  // the sink: weight, no value (every lane)
    const float lse2 = sum != 0.f ? m + log2f(sum) : NEG_INF;

    o += batch * o_batch_stride + head * o_head_stride + token * o_row_stride;
    for (int col = lane; col < head_dim; col += WAVE_SIZE) {
        float acc = 0.f;
        for (int s = 0; s < num_splits; ++s)
            if (lp[s] != NEG_INF) acc += fast_exp2(lp[s] - lse2) * op[(i64)s * HEAD_DIM + col];
        o[col] = from_float(acc);
    }
    if (lane == 0 && lse != nullptr) lse[batch * lse_batch_stride + head * lse_head_stride + token] = lse2 * LN_2;
}

// Write k_new / v_new (B, Hk, Snew, D) into the caches at rows clamp(cache_seqlens[b], 0, Smax) + t
// (in their pages under IS_PAGED: only the pages those rows land in are written); rows that would
// land at or past Smax are dropped; FP8 caches get the codes of x / scale. One thread per element. Grid: x over the Hk * Snew * head_dim
// elements of a batch entry, z = batch.
extern "C" __global__ void __launch_bounds__(NUM_THREADS)
kvcache_append_portable(const DecodeParams p) {
    TENSOR_FROM_PARAMS(const elem_t, k_new, p.k_new);
    TENSOR_FROM_PARAMS(const elem_t, v_new, p.v_new);
    cache_t* __restrict__ k_cache = (cache_t*)p.k.ptr;
    cache_t* __restrict__ v_cache = (cache_t*)p.v.ptr;
    const int heads_k = p.heads_q / p.heads_per_kv, seqlen_new = p.seqlen_new;
    const int seqlen_max = p.seqlen_max, head_dim = p.head_dim;
    const int batch = blockIdx.z + p.batch_offset;
    const i64 e = (i64)blockIdx.x * NUM_THREADS + threadIdx.x;
    if (e >= (i64)heads_k * seqlen_new * head_dim) return;
    const int row = (int)(e / head_dim), col = (int)(e % head_dim);
    const int head = row / seqlen_new, t = row % seqlen_new;
    const int cached = p.cache_seqlens ? p.cache_seqlens[batch * p.seqlens_stride] : p.uniform_seqlen;
    const int pos = min(max(cached, 0), seqlen_max) + t;
    if (pos >= seqlen_max) return;
    const i64 k_row = cache_head_offset(p.k, batch, head) + cache_row_offset(cache_rows(p, p.k, batch), pos);
    const i64 v_row = cache_head_offset(p.v, batch, head) + cache_row_offset(cache_rows(p, p.v, batch), pos);
    const elem_t k_x = k_new[batch * k_new_batch_stride + head * k_new_head_stride + t * k_new_row_stride + col];
    const elem_t v_x = v_new[batch * v_new_batch_stride + head * v_new_head_stride + t * v_new_row_stride + col];
#if KV_FP8
    k_cache[k_row + col] = float_to_cache(to_float(k_x), cache_scale(p.k_scale, p.k_scale_stride, head));
    v_cache[v_row + col] = float_to_cache(to_float(v_x), cache_scale(p.v_scale, p.v_scale_stride, head));
#else
    k_cache[k_row + col] = k_x;  // the element as it is: no float round trip
    v_cache[v_row + col] = v_x;
#endif
}
