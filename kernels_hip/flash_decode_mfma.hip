// Flash-decoding on AMD matrix cores: MFMA on CDNA (gfx908, gfx90a, gfx94x; wave64) and, built on
// wmma.h instead of mfma.h (MATRIX_WMMA=1), WMMA on RDNA3/RDNA4 (gfx11, gfx12; wave32). fp16 or
// bf16 in, fp32 accumulate.
//
// Same semantics as kernels_hip/flash_decode_portable.hip, the vendor-neutral reference (and as
// kernels_cuda/flash_decode.cu): keys of sequence b are cache rows [0, Sk_b), Sk_b =
// min(clamp(cache_seqlens[b], 0, Smax) + Snew, Smax), after kvcache_append_portable wrote the new
// rows; the band (causal and windows, bottom-right aligned with Sk_b) and the softcap of
// attention_common.h; GQA with the Hq / Hk query heads of a kv head times the Sq tokens as the rows
// of one tile (row r = head-in-group * Sq + token), padded to the matrix block; split-KV over
// num_splits runs of whole key tiles, one block per run, partials (O / l and base-2 LSE) combined
// by flash_decode_merge_portable, or the output itself with one split.
//
// Inside a block the loop is flash_fwd_mfma.hip's: the products run transposed, S^T = K Q^T and
// O^T = V^T P^T, so an accumulator column is one query row of the tile and P never leaves
// registers; wave w owns rows [w * MATRIX_N, (w + 1) * MATRIX_N) of the tile. A decode step has
// few rows (a GQA group of 4-8 heads, one token): they fill 4-8 of MATRIX_N = 32 (MFMA) or 16
// (WMMA) columns, and the padded columns cost matrix-core time, not memory traffic -- which is
// what a decode step is bound by (each K/V tile is read once for the whole group).
//
// Grid: x = split * m_blocks + m_block, y = kv head, z = batch (plus batch_offset). Block:
// NUM_WAVES waves. Layouts as flash_decode_portable.hip's: q, o (B, Hq, Sq, D); k, v
// (B, Hk, Smax, D), D contiguous, batch/head/row strides in elements; lse (B, Hq, Sq) float32,
// natural log, or null; o_part (B, Hq, Sq, num_splits, HEAD_DIM) and lse_part
// (B, Hq, Sq, num_splits) float32, base 2. Run time: one DecodeParams by value
// (kernels_common/params.h); the paged-cache and FP8 fields stay unused (xattn/configs.py sends
// paged and FP8 caches to flash_decode_portable.hip). Sinks (p.sinks non-null): with one split the
// epilogue folds them into the row's LSE and O (attention_common.h, fold_sink), with several the
// portable merge adds them.

// ---- compile-time configuration (set with -D by xattn/kernels.py) ------------------------------
// ELEM_BF16   1: bfloat16, 0: float16 (ELEM_TYPE, for platform.h, is the same choice)
// HEAD_DIM    padded head dim (multiple of MATRIX_M);  BLOCK_N  keys per tile (multiple of MATRIX_M)
// NUM_WAVES   waves per block, BLOCK_M = MATRIX_N * NUM_WAVES rows per tile
// IS_CAUSAL, IS_LOCAL: the band's right and left edges;  HAS_SOFTCAP  (attention_common.h)
// VEC_LOADS   1: q, k, v, o rows start 16-byte aligned and head_dim % 8 == 0 (matrix_tile.h)
// MATRIX_WMMA, WMMA_GFX12: RDNA3/RDNA4 WMMA instead of MFMA (matrix_tile.h)
// WAVE_SIZE   64 (MFMA) or 32 (WMMA)

#define NUM_THREADS (NUM_WAVES * WAVE_SIZE)

#include "matrix_tile.h"
#include "../kernels_common/attention_common.h"

#define BLOCK_M (NUM_WAVES * MATRIX_N)
#define KEY_BLOCKS (BLOCK_N / MATRIX_M)   // MATRIX_M-key blocks of S^T
#define DIM_BLOCKS (HEAD_DIM / MATRIX_M)  // MATRIX_M-dim blocks of O^T
#define DIM_STEPS (HEAD_DIM / MATRIX_K)   // k steps of S^T = K Q^T
#define KEY_STEPS (BLOCK_N / MATRIX_K)    // k steps of O^T = V^T P^T
#define KQ_STRIDE (HEAD_DIM + PAD)        // sK and sQ: [row][dim] (matrix_tile.h: the padding)
#define VT_STRIDE (BLOCK_N + PAD)         // sVt: [dim][key]
#define LN_2 0.6931471805599453f

static_assert(!FRAGS_IN_LDS, "sQ is staging only here: it shares its memory with sK");
static_assert(WAVE_SIZE == MATRIX_WAVE, "the matrix instructions' wave size");
static_assert(HEAD_DIM % MATRIX_M == 0 && BLOCK_N % MATRIX_M == 0, "whole matrix blocks");

// ---- LDS layout ---------------------------------------------------------------------------------
// sK [BLOCK_N][KQ_STRIDE] | sVt [HEAD_DIM][VT_STRIDE], 16-bit elements; before the loop the same
// memory stages the Q tile, sQ [BLOCK_M][KQ_STRIDE]: flash_fwd_mfma.hip's layout, and
// xattn/kernels.py (the kernel's shared_memory) computes its size the same way.

// ---- device helpers ---------------------------------------------------------------------------

// The Q rows of this tile into sQ: row r of the group is query head kv_head * heads_per_kv +
// r / Sq, token r % Sq (q points at the group's first head). Zeros for padded rows and dims, so
// their scores are 0 and never NaN. Rows of different heads are not adjacent in memory: each row
// is copied on its own, in 16-byte pieces with VEC_LOADS.
__device__ __forceinline__ void load_q_rows(u16* sQ, const u16* q, i64 q_head_stride, i64 q_row_stride,
                                            int m_start, int rows, int seqlen_q, int head_dim, int tid) {
    constexpr int STEP = VEC_LOADS ? CHUNK : 1;
#pragma unroll 1
    for (int e = tid * STEP; e < BLOCK_M * HEAD_DIM; e += NUM_THREADS * STEP) {
        const int row = e / HEAD_DIM, col = e % HEAD_DIM, r = m_start + row;
        const bool valid = r < rows && col < head_dim;
        const u16* src = q + (r / seqlen_q) * q_head_stride + (r % seqlen_q) * q_row_stride + col;
#if VEC_LOADS
        const uint4 chunk = valid ? *(const uint4*)src : make_uint4(0, 0, 0, 0);
        *(uint2*)(sQ + row * KQ_STRIDE + col) = make_uint2(chunk.x, chunk.y);
        *(uint2*)(sQ + row * KQ_STRIDE + col + 4) = make_uint2(chunk.z, chunk.w);
#else
        sQ[row * KQ_STRIDE + col] = valid ? *src : (u16)0;
#endif
    }
}

// Raw dot products -> scores: softcap, and -inf outside the band (the band is per token, and the
// tile's rows mix tokens) or past the keys, where the tile crosses an edge. Element j of block nb
// is key acc_row(lane, nb, j) of the tile; the lane's row, and so its token, is its column.
// Keys below `leftpad` (the sequence's left padding) are masked too.
__device__ __forceinline__ void modify_scores(acc_t (&acc_s)[KEY_BLOCKS], int token, int n_start,
                                              const ScoreMods& mods, bool check_mask, int leftpad, int lane) {
#pragma unroll
    for (int nb = 0; nb < KEY_BLOCKS; ++nb)
#pragma unroll
        for (int j = 0; j < ACC_ELEMS; ++j) {
            const int key = n_start + acc_row(lane, nb, j);
            acc_s[nb][j] = check_mask && key < leftpad ? NEG_INF : modified_score(acc_s[nb][j], token, key, mods, check_mask);
        }
}

// Online softmax step for this lane's row (flash_fwd_mfma.hip's): fold the tile into m_i and l_i,
// turn S into P in place, rescale O. Lanes l and l ^ MATRIX_N hold the same row's other keys.
__device__ __forceinline__ void softmax_rescale_o(acc_t (&acc_s)[KEY_BLOCKS], acc_t (&acc_o)[DIM_BLOCKS],
                                                  float& row_max, float& row_sum, float scale_log2) {
    float m_new = row_max;
#pragma unroll
    for (int nb = 0; nb < KEY_BLOCKS; ++nb)
#pragma unroll
        for (int j = 0; j < ACC_ELEMS; ++j) m_new = fmaxf(m_new, acc_s[nb][j]);
    m_new = fmaxf(m_new, shfl_xor(m_new, MATRIX_N));
    // A row that has seen no key yet keeps m = -inf: offset 0 makes exp2(-inf - offset) = 0
    // rather than exp2(-inf + inf) = NaN.
    const bool row_empty = m_new == NEG_INF;
    const float offset = row_empty ? 0.f : m_new * scale_log2;
    const float alpha = row_empty ? 1.f : fast_exp2((row_max - m_new) * scale_log2);
    row_max = m_new;
    float sum = 0.f;
#pragma unroll
    for (int nb = 0; nb < KEY_BLOCKS; ++nb)
#pragma unroll
        for (int j = 0; j < ACC_ELEMS; ++j) {
            const float p = fast_exp2(acc_s[nb][j] * scale_log2 - offset);
            acc_s[nb][j] = p;
            sum += p;
        }
    row_sum = row_sum * alpha + sum;
#pragma unroll
    for (int db = 0; db < DIM_BLOCKS; ++db) acc_o[db] *= alpha;
}

// A partial row (float32, HEAD_DIM dims): factor * acc at dst[dim], 16-byte stores of runs of 4
// dims where the layout has them (the workspace rows are 16-byte aligned: HEAD_DIM % 16 == 0).
__device__ __forceinline__ void store_partial_row(float* dst, const acc_t (&acc)[DIM_BLOCKS], float factor,
                                                  int lane) {
    constexpr int RUN = ACC_RUN % 4 == 0 ? 4 : 1;
#pragma unroll
    for (int blk = 0; blk < DIM_BLOCKS; ++blk)
#pragma unroll
        for (int j = 0; j < ACC_ELEMS; j += RUN) {
            const int col = acc_row(lane, blk, j);
            if (RUN == 4)
                *(float4*)(dst + col) = make_float4(acc[blk][j] * factor, acc[blk][j + 1] * factor,
                                                    acc[blk][j + 2] * factor, acc[blk][j + 3] * factor);
            else
                dst[col] = acc[blk][j] * factor;
        }
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
MATRIX_KERNEL(flash_decode, )(const DecodeParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names. The softmax's scale
    // is the softcap c under a softcap (attention_common.h): its exp2 factor is then c * log2(e).
    TENSOR_FROM_PARAMS(const u16, q, p.q);
    TENSOR_FROM_PARAMS(const u16, k, p.k);
    TENSOR_FROM_PARAMS(const u16, v, p.v);
    const int seqlen_q = p.seqlen_q, seqlen_max = p.seqlen_max, head_dim = p.head_dim;
    const int heads_per_kv = p.heads_per_kv, num_splits = p.num_splits, m_blocks = p.m_blocks;
    const float scale_log2 = HAS_SOFTCAP ? p.softcap_log2 : p.scale_log2;
    extern __shared__ __attribute__((aligned(16))) u16 smem[];
    u16* sQ = smem;  // staging only, before the loop
    u16* sK = smem;
    u16* sVt = sK + BLOCK_N * KQ_STRIDE;

    const int m_block = blockIdx.x % m_blocks, split = blockIdx.x / m_blocks;
    const int kv_head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int tid = threadIdx.x, wave = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int rows = heads_per_kv * seqlen_q;  // query rows of this (batch, kv head)
    const int m_start = m_block * BLOCK_M;
    const int wave_row_start = m_start + wave * MATRIX_N;
    const int row = wave_row_start + acc_col(lane);  // this lane's row of the group
    const int token = row % seqlen_q;                // a padded row takes some token: its Q is 0

    // Sequence b's keys, and the band of its tokens (attention_common.h, aligned with Sk_b).
    const int cached = min(max(p.cache_seqlens ? p.cache_seqlens[batch * p.seqlens_stride] : p.uniform_seqlen, 0),
                           seqlen_max);
    const int seqlen_k = min(cached + p.seqlen_new, seqlen_max);
    const int leftpad = p.cache_leftpad ? min(max(p.cache_leftpad[batch * p.leftpad_stride], 0), cached) : 0;
    const ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, p.window_left, p.window_right,
                                           p.scale_over_softcap, nullptr, 1.f);
    // The key tiles any token sees (none below the left padding), and this split's run of them
    // (flash_decode_portable.hip's cut).
    KeyRange band_tiles = key_tiles(0, seqlen_q, BLOCK_N, seqlen_k, mods.band);
    band_tiles.tile_begin = max(band_tiles.tile_begin, leftpad / BLOCK_N);
    const int band_count = max(0, band_tiles.tile_end - band_tiles.tile_begin);
    const int per_split = (band_count + num_splits - 1) / num_splits;
    const int tile_begin = band_tiles.tile_begin + split * per_split;
    const int tile_end = min(band_tiles.tile_begin + band_count, tile_begin + per_split);

    q += batch * q_batch_stride + (i64)kv_head * heads_per_kv * q_head_stride;
    k += batch * k_batch_stride + kv_head * k_head_stride;
    v += batch * v_batch_stride + kv_head * v_head_stride;

    // Prologue: Q through LDS into registers, where it stays for the whole loop.
    load_q_rows(sQ, q, q_head_stride, q_row_stride, m_start, rows, seqlen_q, head_dim, tid);
    __syncthreads();  // the Q tile is complete
    FixedFrags<DIM_STEPS, KQ_STRIDE> q_frag;
    q_frag.load(sQ, wave * MATRIX_N, lane);

    acc_t acc_o[DIM_BLOCKS];
#pragma unroll
    for (int db = 0; db < DIM_BLOCKS; ++db) acc_o[db] = acc_t{};
    float row_max = NEG_INF, row_sum = 0.f;

    // Every wave takes part in the block's loads and barriers; a wave whose rows are all padding
    // skips the arithmetic.
    for (int tile = tile_begin; tile < tile_end; ++tile) {
        const int n_start = tile * BLOCK_N;
        __syncthreads();  // every wave is done with the previous K and V^T tiles (and with sQ)
        const int padding_rows = max(0, leftpad - n_start);  // never read: zeros
        load_tile<BLOCK_N, KQ_STRIDE, 0>(sK, nullptr, k + (i64)n_start * k_row_stride, k_row_stride, seqlen_k - n_start, head_dim, tid, padding_rows);
        load_tile<BLOCK_N, 0, VT_STRIDE>(nullptr, sVt, v + (i64)n_start * v_row_stride, v_row_stride, seqlen_k - n_start, head_dim, tid, padding_rows);
        __syncthreads();  // K and V^T tiles visible to every wave
        if (wave_row_start >= rows) continue;

        acc_t acc_s[KEY_BLOCKS];
        tile_times_frags<KEY_BLOCKS, DIM_STEPS, KQ_STRIDE>(acc_s, sK, q_frag, lane);  // S^T = K Q^T
        // The tile's rows hold every token 0..Sq-1 (or a run of them): mask where any crosses an edge.
        const bool needs_mask = tile_needs_mask(0, seqlen_q, n_start, BLOCK_N, seqlen_k, mods.band) || n_start < leftpad;
        if (HAS_SOFTCAP || needs_mask) modify_scores(acc_s, token, n_start, mods, needs_mask, leftpad, lane);
        softmax_rescale_o(acc_s, acc_o, row_max, row_sum, scale_log2);  // S becomes P
        tile_times_acc<DIM_BLOCKS, KEY_STEPS, VT_STRIDE>(acc_o, sVt, acc_s, lane);  // O^T += V^T P^T
    }

    // Epilogue: l from the two lanes of the row; a row with no key in this run has l = 0: O = 0,
    // LSE = -inf. One split: the output (O / l, natural-log LSE); else a partial for the merge
    // (O / l, LSE2 = m * scale_log2 + log2(l)).
    const float l = row_sum + shfl_xor(row_sum, MATRIX_N);
    if (row >= rows) return;  // after the last shuffle: padded rows write nothing
    float inv_l = l != 0.f ? 1.f / l : 0.f;
    const float lse2 = l != 0.f ? row_max * scale_log2 + log2f(l) : NEG_INF;
    const int head = kv_head * heads_per_kv + row / seqlen_q;
    if (num_splits == 1) {
        TENSOR_FROM_PARAMS(u16, o, p.o);
        TENSOR_FROM_PARAMS(float, lse, p.lse);
        float row_lse = lse2 * LN_2;
        if (p.sinks != nullptr) row_lse = fold_sink(row_lse, p.sinks[head], &inv_l);  // the merge's otherwise
        if (lane < MATRIX_N && lse != nullptr)
            lse[batch * lse_batch_stride + head * lse_head_stride + token] = row_lse;
        store_acc_row(o + batch * o_batch_stride + head * o_head_stride + token * o_row_stride, acc_o,
                      inv_l, head_dim, lane);
    } else {
        const i64 part = (((i64)batch * p.heads_q + head) * seqlen_q + token) * num_splits + split;
        if (lane < MATRIX_N) p.lse_part[part] = lse2;
        store_partial_row(p.o_part + part * HEAD_DIM, acc_o, inv_l, lane);
    }
}
