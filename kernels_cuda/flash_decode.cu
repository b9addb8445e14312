// Flash-decoding: attention of a few query tokens against a long KV cache, split over the keys.
//
// A decode step has few query rows and many keys, so one thread block per (batch, kv head) would
// leave most of the GPU idle. Instead the keys of each (batch, kv head) are split into num_splits
// contiguous chunks, one thread block per chunk (flash-decoding). Each block keeps the online-
// softmax state (running max m_i, running sum l_i, unnormalized O) of its rows over its chunk and
// writes a partial result: O_s = O / l and LSE_s = m + log2(l). flash_decode_merge then combines the
// splits of each row: LSE = log2(sum_s 2^LSE_s), O = sum_s 2^(LSE_s - LSE) O_s. With one split
// the block writes the final output itself and no merge runs.
//
// GQA: the Hq / Hk query heads that share a kv head, times the Sq query tokens, are the rows of
// one tile (row r = head-in-group * Sq + token), so each K/V tile is read once for the whole group.
// More rows than BLOCK_M: further row tiles (m_blocks), which read the same keys again.
//
// Inside a block the warps split the keys too: each pipeline step covers KEYS_PER_STAGE keys and
// warp w takes the w-th WARP_N of them. A warp owns its keys from the copy to the last mma: it has
// its own STAGES-deep cp.async ring of K and V tiles, its own (m_i, l_i, O) for all BLOCK_M rows,
// and needs only __syncwarp() in the main loop. The warps' states are merged through shared memory
// at the end, like the splits are merged across blocks.
//   fp16/bf16: S = Q K^T and O += P V on mma.sync m16n8k16 fed by ldmatrix (mma_tile.h).
//   float32:   CUDA cores, lane = key for S (WARP_N = 32), lane = head-dim column for P V.
//
// Grid: x = split * m_blocks + m_block, y = kv head, z = batch. Block: NUM_WARPS warps.
//
// Keys of sequence b: cache rows [0, Sk_b), Sk_b = min(clamp(cache_seqlens[b], 0, Smax) + Snew,
// Smax), after kvcache_append wrote k_new/v_new at rows [cache_seqlens[b], +Snew). Lengths out of
// range are clamped, so nothing outside [0, Smax) is ever read or written. Masking is bottom-right
// aligned: query token i sees key j iff i + Sk_b - Sq - left <= j <= i + Sk_b - Sq + right
// (-1: unbounded; causal is right = 0, folded in by the caller). softcap: s = c * tanh(s / c).
//
// Layouts: q, o (B, Hq, Sq, D); k, v (B, Hk, Smax, D); each with batch, head and row strides in
// elements, D contiguous. lse (B, Hq, Sq) float32, natural log. Partials: o_part (B, Hq, Sq,
// num_splits, HEAD_DIM) and lse_part (B, Hq, Sq, num_splits) float32, LSE there in base 2.
// Reads q, k, v (and cache_seqlens); writes o and lse (one split) or o_part and lse_part.
//
// Scores are carried in base-2 units, s2 = scale * log2(e) * q.k (or the softcapped value times
// log2(e)), so every exponential is one ex2.

// ---- compile-time configuration (set with -D by xattn/configs.py) ------------------------------
// ELEM_F32    1: float32 on CUDA cores; 0: 16-bit on tensor cores, ELEM_BF16 picks bf16 or fp16
// HEAD_DIM    padded head dim (a power of two, 32..256); the real one, head_dim, is <= it
// BLOCK_M     query rows per tile (each warp holds all of them); 16-bit: a multiple of 16
// NUM_WARPS   warps per block;  WARP_N  keys per warp per pipeline step (float32: 32)
// STAGES      cp.async pipeline depth of each warp
// VEC_LOADS   1: q, k, v rows start 16-byte aligned and head_dim is a whole number of 16-byte
//             chunks: tiles move in 16-byte cp.async copies; 0: 4-byte cp.async (float32) or
//             element-wise copies (16-bit)
// SOFTCAP     1: s = c * tanh(s / c) before the softmax
// MIN_BLOCKS  thread blocks per SM that the register allocation must allow

#include "platform.h"
#include "../kernels_common/attention_common.h"

#define NUM_THREADS (NUM_WARPS * WARP_SIZE)
#define KEYS_PER_STAGE (NUM_WARPS * WARP_N)
#define ELEM_BYTES ((int)sizeof(elem_t))
// Shared-memory rows are padded by 16 bytes: consecutive rows start in different bank groups
// (conflict-free ldmatrix; float4 reads of 8 rows by 8 lanes hit 32 different banks).
#define TILE_STRIDE (HEAD_DIM + 16 / ELEM_BYTES)
#define UNIT_ELEMS (VEC_LOADS ? 16 / ELEM_BYTES : 1)  // elements per copy
#define OUT_STRIDE (HEAD_DIM + 4)                      // floats per row of the merge scratch
#define LN_2 0.6931471805599453f

#if ELEM_F32
#define DECODE_KERNEL flash_decode_f32
static_assert(WARP_N == WARP_SIZE, "float32: lane = key");
static_assert(BLOCK_M <= WARP_SIZE, "float32: rows are registers of every lane");
#else
#define DECODE_KERNEL flash_decode
#define M_TILES (BLOCK_M / 16)  // m16 row tiles
#define D_TILES (HEAD_DIM / 8)  // n8 column tiles of O
static_assert(BLOCK_M % 16 == 0, "whole m16 tiles");
#include "mma_tile.h"
static_assert(WARP_N % 16 == 0 && HEAD_DIM % 16 == 0, "k16 steps over keys and head dim");
#endif

#include "simt_tile.h"

static_assert((HEAD_DIM & (HEAD_DIM - 1)) == 0 && HEAD_DIM >= 32, "HEAD_DIM: power of two >= 32");
static_assert(BLOCK_M <= NUM_THREADS, "one thread per row computes the row limits");

// ---- shared-memory layout ---------------------------------------------------------------------
// sQ [BLOCK_M][TILE_STRIDE] elements | row_lo, row_hi [BLOCK_M] ints | then either
//   the K/V rings: per warp, STAGES x (K [WARP_N][TILE_STRIDE], V [WARP_N][TILE_STRIDE]) elements,
//   or, after the main loop, the merge scratch: O [BLOCK_M][OUT_STRIDE], m and l
//   [NUM_WARPS][BLOCK_M] floats.
// xattn/configs.py (decode_shared_memory_bytes) computes the same size.
#define Q_BYTES (BLOCK_M * TILE_STRIDE * ELEM_BYTES)
#define LIMIT_BYTES (2 * BLOCK_M * 4)
#define TILE_BYTES (WARP_N * TILE_STRIDE * ELEM_BYTES)
#define STAGE_BYTES (2 * TILE_BYTES)

// ---- device helpers ---------------------------------------------------------------------------

// Sequence b's keys and the band of them its queries see (see the header).
struct KeyBand {
    int seqlen_k;  // Sk_b
    int offset;    // Sk_b - Sq: query i is aligned with key i + offset
    int lo, hi;    // keys [lo, hi) are seen by at least one query token
    int full_lo, full_hi;  // keys [full_lo, full_hi) are seen by every query token
};

__device__ __forceinline__ KeyBand key_band(int cached, int seqlen_new, int seqlen_max, int seqlen_q,
                                            int left, int right) {
    KeyBand b;
    cached = min(max(cached, 0), seqlen_max);
    b.seqlen_k = min(cached + seqlen_new, seqlen_max);
    b.offset = b.seqlen_k - seqlen_q;
    // Token 0 has the lowest lower bound and the lowest upper bound, token Sq - 1 the highest.
    b.lo = left >= 0 ? max(0, b.offset - left) : 0;
    b.hi = right >= 0 ? min(b.seqlen_k, b.offset + seqlen_q + right) : b.seqlen_k;
    b.full_lo = left >= 0 ? max(0, b.offset + seqlen_q - 1 - left) : 0;
    b.full_hi = right >= 0 ? min(b.seqlen_k, b.offset + 1 + right) : b.seqlen_k;
    return b;
}

// Copy ROWS rows of head_dim elements into a padded shared tile, zeros for rows >= valid_rows
// and columns >= head_dim (they must add nothing to Q.K, and V rows with P = 0 must not carry a
// NaN bit pattern in). One warp copies; zero-filled cp.async reads nothing from global memory, so
// rows past the end of the cache are never touched.
template <int ROWS>
__device__ __forceinline__ void warp_load_tile(elem_t* smem, const elem_t* gmem, i64 row_stride,
                                               int valid_rows, int head_dim, int lane) {
    constexpr int UNITS_PER_ROW = HEAD_DIM / UNIT_ELEMS;
    constexpr int LANES_PER_ROW = UNITS_PER_ROW < WARP_SIZE ? UNITS_PER_ROW : WARP_SIZE;
    constexpr int ROWS_PER_PASS = WARP_SIZE / LANES_PER_ROW;
    constexpr int UNITS_PER_LANE = UNITS_PER_ROW / LANES_PER_ROW;
    static_assert(ROWS % ROWS_PER_PASS == 0, "whole passes over the tile");
    const int row0 = lane / LANES_PER_ROW, col0 = (lane % LANES_PER_ROW) * UNIT_ELEMS;
    const elem_t* src = gmem + row0 * row_stride + col0;
    elem_t* dst = smem + row0 * TILE_STRIDE + col0;
    // 16-byte copies: passes unrolled by 8 (all of them for 16-bit tiles up to D = 128), so many
    // copies are in flight. Element-wise copies: one pass at a time, or their addresses and values
    // would not fit the registers.
#if VEC_LOADS
#pragma unroll 8
#else
#pragma unroll 1
#endif
    for (int pass = 0; pass < ROWS / ROWS_PER_PASS; ++pass) {
        const bool row_valid = row0 + pass * ROWS_PER_PASS < valid_rows;
#pragma unroll
        for (int j = 0; j < UNITS_PER_LANE; ++j) {
            const int dc = j * LANES_PER_ROW * UNIT_ELEMS;
            const bool valid = row_valid && col0 + dc < head_dim;
            elem_t* d = dst + pass * ROWS_PER_PASS * TILE_STRIDE + dc;
#if VEC_LOADS
            cp_async_16_zfill(smem_addr(d), src + dc, valid);
#elif ELEM_F32
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(d)),
                         "l"(src + dc), "r"(valid ? 4 : 0));
#else
            *d = valid ? src[dc] : (elem_t)0;
#endif
        }
        src += ROWS_PER_PASS * row_stride;
    }
}

// The Q tile: row r (r < rows) is query head r / seqlen_q of the group, token r % seqlen_q.
// Loaded once per block with plain loads; zeros past the last row and column.
__device__ __forceinline__ void load_q_tile(elem_t* sQ, const elem_t* q, i64 head_stride, i64 row_stride,
                                            int m_start, int rows, int seqlen_q, int head_dim, int tid) {
    constexpr int UNITS_PER_ROW = HEAD_DIM / UNIT_ELEMS;
    for (int u = tid; u < BLOCK_M * UNITS_PER_ROW; u += NUM_THREADS) {
        const int row = u / UNITS_PER_ROW, col = (u % UNITS_PER_ROW) * UNIT_ELEMS;
        const int r = m_start + row;
        const bool valid = r < rows && col < head_dim;
        const elem_t* src = q + (r / seqlen_q) * head_stride + (r % seqlen_q) * row_stride + col;
#if VEC_LOADS
        uint4 x = make_uint4(0, 0, 0, 0);
        if (valid) x = *(const uint4*)src;
        *(uint4*)(sQ + row * TILE_STRIDE + col) = x;
#else
        sQ[row * TILE_STRIDE + col] = valid ? *src : (elem_t)0;
#endif
    }
}

// Scores in base-2 units: s2 = scale_log2 * s, or with SOFTCAP c * log2(e) * tanh(scale * s / c).
// The tanh is attention_common.h's softcap_score (platform.h's fast_tanh).
__device__ __forceinline__ float score_log2(float s, float scale_log2, float softcap_log2,
                                            float scale_over_softcap) {
#if SOFTCAP
    return softcap_log2 * softcap_score(s, scale_over_softcap);
#else
    return s * scale_log2;
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

#if !ELEM_F32
// ---- one warp's step on tensor cores ----------------------------------------------------------
// S = Q K^T for the warp's WARP_N keys, masked, turned into P; O is rescaled and O += P V.
// Thread layout (mma accumulators): rows mt * 16 + lane / 4 (+ 8), key columns nt * 8 + (lane % 4) * 2.
struct WarpState {
    float acc_o[M_TILES][D_TILES][4];
    float row_max[M_TILES][2];
    float row_sum[M_TILES][2];  // this thread's columns only; the quad is summed at the end
};

__device__ __forceinline__ void warp_step(WarpState& st, u32 q_lane, u32 k_lane, u32 v_lane, int n0,
                                          bool needs_mask, const int (&lo)[M_TILES][2],
                                          const int (&hi)[M_TILES][2], float scale_log2,
                                          float softcap_log2, float scale_over_softcap, int lane) {
    float acc_s[M_TILES][WARP_N / 8][4];
    zero(acc_s);
    mma_a_bt<M_TILES, WARP_N / 8, HEAD_DIM / 16, TILE_STRIDE, TILE_STRIDE>(acc_s, q_lane, k_lane);  // S = Q K^T

#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int nt = 0; nt < WARP_N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float s = score_log2(acc_s[mt][nt][e], scale_log2, softcap_log2, scale_over_softcap);
                if (needs_mask) {  // keys outside the row's band or past the split's end
                    const int key = n0 + nt * 8 + (lane % 4) * 2 + (e & 1);
                    if (key < lo[mt][e / 2] || key >= hi[mt][e / 2]) s = NEG_INF;
                }
                acc_s[mt][nt][e] = s;
            }

    // Online softmax; the four threads of a quad share a row, so the row max takes two shuffles.
    float alpha[M_TILES][2];
    bool max_moved = false;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float tile_max = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < WARP_N / 8; ++nt)
                tile_max = fmaxf(tile_max, fmaxf(acc_s[mt][nt][2 * h], acc_s[mt][nt][2 * h + 1]));
            tile_max = fmaxf(tile_max, shfl_xor(tile_max, 1));
            tile_max = fmaxf(tile_max, shfl_xor(tile_max, 2));
            max_moved |= tile_max > st.row_max[mt][h];
            float offset;
            alpha[mt][h] = update_max(st.row_max[mt][h], tile_max, offset);
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < WARP_N / 8; ++nt)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    const float p = fast_exp2(acc_s[mt][nt][e] - offset);
                    acc_s[mt][nt][e] = p;
                    sum += p;
                }
            st.row_sum[mt][h] = st.row_sum[mt][h] * alpha[mt][h] + sum;
        }
    if (warp_any(max_moved)) {  // O *= exp2(m_old - m_new), only when some row's max moved
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int dt = 0; dt < D_TILES; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) st.acc_o[mt][dt][e] *= alpha[mt][e / 2];
    }

    // P stays in registers: the accumulators of S are the A operand of O += P V.
    u32 p_frag[M_TILES][WARP_N / 16][4];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int kk = 0; kk < WARP_N / 16; ++kk) pack_a_fragment(p_frag[mt][kk], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
    mma_areg_b<M_TILES, D_TILES, WARP_N / 16, TILE_STRIDE>(st.acc_o, p_frag, v_lane);  // O += P V
}
#else
// ---- one warp's step on CUDA cores (float32) --------------------------------------------------
// Lane l computes the scores of key n0 + l against every row; for P V it owns head-dim columns
// l, l + 32, ... and takes each key's probability from that key's lane by a shuffle.
#define D_PER_LANE (HEAD_DIM / WARP_SIZE)
struct WarpState {
    float acc_o[BLOCK_M][D_PER_LANE];
    float row_max[BLOCK_M];
    float row_sum[BLOCK_M];  // this lane's keys only; the warp is summed at the end
};

__device__ __forceinline__ void warp_step(WarpState& st, const float* sQ, const float* sK,
                                          const float* sV, int n0, bool needs_mask, const int* row_lo,
                                          const int* row_hi, int key_end, float scale_log2,
                                          float softcap_log2, float scale_over_softcap, int lane) {
    float s[BLOCK_M];
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r) s[r] = 0.f;
    for (int d = 0; d < HEAD_DIM; d += 4) {  // S = Q K^T: K by float4 (rows padded: no conflicts), Q broadcast
        const float4 kd = *(const float4*)(sK + lane * TILE_STRIDE + d);
#pragma unroll
        for (int r = 0; r < BLOCK_M; ++r) {
            const float4 qd = *(const float4*)(sQ + r * TILE_STRIDE + d);
            s[r] = fmaf(qd.x, kd.x, fmaf(qd.y, kd.y, fmaf(qd.z, kd.z, fmaf(qd.w, kd.w, s[r]))));
        }
    }
    const int key = n0 + lane;
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r) {
        float s2 = score_log2(s[r], scale_log2, softcap_log2, scale_over_softcap);
        if (needs_mask && (key < row_lo[r] || key >= min(row_hi[r], key_end))) s2 = NEG_INF;
        float offset;
        const float alpha = update_max(st.row_max[r], warp_max(s2), offset);
        s[r] = fast_exp2(s2 - offset);  // P
        st.row_sum[r] = st.row_sum[r] * alpha + s[r];
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) st.acc_o[r][i] *= alpha;
    }
    for (int n = 0; n < WARP_N; ++n) {  // O += P V
        float vn[D_PER_LANE];
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) vn[i] = sV[n * TILE_STRIDE + lane + i * WARP_SIZE];
#pragma unroll
        for (int r = 0; r < BLOCK_M; ++r) {
            const float p = __shfl_sync(FULL_MASK, s[r], n);
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) st.acc_o[r][i] = fmaf(p, vn[i], st.acc_o[r][i]);
        }
    }
}
#endif

// ---- entry points -----------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
DECODE_KERNEL(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
              elem_t* __restrict__ o, float* __restrict__ lse, float* __restrict__ o_part,
              float* __restrict__ lse_part, const int* __restrict__ cache_seqlens,
              i64 q_batch_stride, i64 q_head_stride, i64 q_row_stride,
              i64 k_batch_stride, i64 k_head_stride, i64 k_row_stride,
              i64 v_batch_stride, i64 v_head_stride, i64 v_row_stride,
              i64 o_batch_stride, i64 o_head_stride, i64 o_row_stride,
              i64 lse_batch_stride, i64 lse_head_stride, i64 seqlens_stride,
              int uniform_seqlen, int seqlen_q, int seqlen_new, int seqlen_max, int head_dim,
              int heads_per_kv, int window_left, int window_right, int num_splits, int m_blocks,
              float scale_log2, float softcap_log2, float scale_over_softcap) {
    extern __shared__ __align__(16) unsigned char smem[];
    elem_t* sQ = (elem_t*)smem;
    int* row_lo = (int*)(smem + Q_BYTES);
    int* row_hi = row_lo + BLOCK_M;
    unsigned char* ring = smem + Q_BYTES + LIMIT_BYTES;  // K/V rings, later the merge scratch

    const int m_block = blockIdx.x % m_blocks, split = blockIdx.x / m_blocks;
    const int kv_head = blockIdx.y, batch = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int rows = heads_per_kv * seqlen_q;  // query rows of this (batch, kv head)
    const int m_start = m_block * BLOCK_M;

    const KeyBand band = key_band(cache_seqlens ? cache_seqlens[batch * seqlens_stride] : uniform_seqlen,
                                  seqlen_new, seqlen_max, seqlen_q, window_left, window_right);
    // This split's keys: equal chunks of the band, whole pipeline steps each. An empty chunk (or
    // band) still runs the epilogue, which writes the empty-row result (O = 0, LSE = -inf).
    const int band_keys = max(0, band.hi - band.lo);
    const int chunk = ((band_keys + num_splits - 1) / num_splits + KEYS_PER_STAGE - 1) / KEYS_PER_STAGE * KEYS_PER_STAGE;
    const int key_begin = band.lo + split * chunk;
    const int key_end = min(band.hi, key_begin + chunk);
    const int steps = key_end > key_begin ? (key_end - key_begin + KEYS_PER_STAGE - 1) / KEYS_PER_STAGE : 0;

    // This warp's ring and its keys: the warp-th WARP_N keys of every pipeline step.
    elem_t* ring_warp = (elem_t*)(ring + warp * STAGES * STAGE_BYTES);
    const int warp_key0 = key_begin + warp * WARP_N;
    const elem_t* k_warp = k + batch * k_batch_stride + kv_head * k_head_stride + (i64)warp_key0 * k_row_stride;
    const elem_t* v_warp = v + batch * v_batch_stride + kv_head * v_head_stride + (i64)warp_key0 * v_row_stride;

    // Copies of step t into ring slot t % STAGES; one commit group per step, empty past the end,
    // so that cp_async_wait<STAGES - 1> always means "step t has landed".
#define ISSUE_STEP(t)                                                                                      \
    do {                                                                                                   \
        if ((t) < steps) {                                                                                 \
            elem_t* slot = ring_warp + ((t) % STAGES) * (STAGE_BYTES / ELEM_BYTES);                        \
            const int valid = key_end - (warp_key0 + (t) * KEYS_PER_STAGE);                                \
            warp_load_tile<WARP_N>(slot, k_warp + (i64)(t) * KEYS_PER_STAGE * k_row_stride, k_row_stride,  \
                                   valid, head_dim, lane);                                                 \
            warp_load_tile<WARP_N>(slot + TILE_BYTES / ELEM_BYTES,                                         \
                                   v_warp + (i64)(t) * KEYS_PER_STAGE * v_row_stride, v_row_stride, valid, \
                                   head_dim, lane);                                                        \
        }                                                                                                  \
        cp_async_commit();                                                                                 \
    } while (0)

    // Prologue: the first STAGES - 1 steps' copies are issued before Q is loaded, so that the Q
    // tile's load latency overlaps them.
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) ISSUE_STEP(t);
    q += batch * q_batch_stride + (i64)kv_head * heads_per_kv * q_head_stride;
    load_q_tile(sQ, q, q_head_stride, q_row_stride, m_start, rows, seqlen_q, head_dim, tid);
    if (tid < BLOCK_M) {  // keys [row_lo, row_hi) are the ones token (m_start + tid) % Sq sees
        const int i = (m_start + tid) % seqlen_q;
        row_lo[tid] = window_left >= 0 ? i + band.offset - window_left : 0;
        row_hi[tid] = window_right >= 0 ? min(band.seqlen_k, i + band.offset + window_right + 1) : band.seqlen_k;
    }

    __syncthreads();  // sQ and the row limits are visible to every warp

    WarpState st;
#if ELEM_F32
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r) {
        st.row_max[r] = NEG_INF;
        st.row_sum[r] = 0.f;
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) st.acc_o[r][i] = 0.f;
    }
#else
    zero(st.acc_o);
    int lo[M_TILES][2], hi[M_TILES][2];  // this thread's two rows per m16 tile
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = mt * 16 + lane / 4 + h * 8;
            lo[mt][h] = row_lo[row];
            hi[mt][h] = min(row_hi[row], key_end);
            st.row_max[mt][h] = NEG_INF;
            st.row_sum[mt][h] = 0.f;
        }
    // ldmatrix row addresses (mma_tile.h): Q is the A operand of S = Q K^T, K's rows are those of
    // B^T, V is the row-major B of O += P V. Ring slots are a fixed number of bytes apart.
    const u32 q_lane = lane_address_x<TILE_STRIDE>(smem_addr(sQ), 0, 0, lane);
    const u32 k_lane = lane_address_y<TILE_STRIDE>(smem_addr(ring_warp), 0, 0, lane);
    const u32 v_lane = lane_address_x<TILE_STRIDE>(smem_addr(ring_warp) + TILE_BYTES, 0, 0, lane);
#endif

    for (int t = 0; t < steps; ++t) {
        ISSUE_STEP(t + STAGES - 1);  // into the slot read in step t - 1 (released by the __syncwarp below)
        cp_async_wait<STAGES - 1>();
        __syncwarp();  // step t's tiles, copied by every lane, are visible to the whole warp
        const int n0 = warp_key0 + t * KEYS_PER_STAGE;
        // Masking is needed only where some row's band edge or the split's end falls in the tile.
        const bool needs_mask = n0 < band.full_lo || n0 + WARP_N > min(band.full_hi, key_end);
        const int slot = t % STAGES;
#if ELEM_F32
        const float* sK = ring_warp + slot * (STAGE_BYTES / ELEM_BYTES);
        warp_step(st, sQ, sK, sK + TILE_BYTES / ELEM_BYTES, n0, needs_mask, row_lo, row_hi, key_end,
                  scale_log2, softcap_log2, scale_over_softcap, lane);
#else
        const u32 slot_offset = slot * STAGE_BYTES;
        warp_step(st, q_lane, k_lane + slot_offset, v_lane + slot_offset, n0, needs_mask, lo, hi,
                  scale_log2, softcap_log2, scale_over_softcap, lane);
#endif
        __syncwarp();  // every lane is done reading this slot before the next step refills it
    }
#undef ISSUE_STEP

    // ---- epilogue: merge the warps' states, then write this split's rows ----
    // Row r: m = max_w m_w, L = sum_w 2^(m_w - m) l_w, O = sum_w 2^(m_w - m) O_w / L, LSE = m + log2 L.
    // The warps add their weighted O into one scratch tile in turn (warp order, so the result does
    // not depend on timing). A warp that saw no key of a row (m_w = -inf) adds nothing to it.
    float* sO = (float*)ring;  // [BLOCK_M][OUT_STRIDE]
    float* sM = sO + BLOCK_M * OUT_STRIDE;  // [NUM_WARPS][BLOCK_M]
    float* sL = sM + NUM_WARPS * BLOCK_M;   // [NUM_WARPS][BLOCK_M]
    cp_async_wait<0>();
    __syncthreads();  // no copy is in flight and no warp reads its ring any more: it becomes scratch
#if ELEM_F32
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r) {
        const float l = warp_sum(st.row_sum[r]);
        if (lane == 0) {
            sM[warp * BLOCK_M + r] = st.row_max[r];
            sL[warp * BLOCK_M + r] = l;
        }
    }
#else
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = st.row_sum[mt][h];
            l += shfl_xor(l, 1);
            l += shfl_xor(l, 2);
            if (lane % 4 == 0) {
                const int row = mt * 16 + lane / 4 + h * 8;
                sM[warp * BLOCK_M + row] = st.row_max[mt][h];
                sL[warp * BLOCK_M + row] = l;
            }
        }
#endif
    __syncthreads();  // every warp's m and l are visible

    // m of each of this thread's rows, and its warp's weight there (0: nothing to add).
#if !ELEM_F32
    float weight[M_TILES][2];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = mt * 16 + lane / 4 + h * 8;
            float m = NEG_INF;
#pragma unroll
            for (int w = 0; w < NUM_WARPS; ++w) m = fmaxf(m, sM[w * BLOCK_M + row]);
            weight[mt][h] = st.row_max[mt][h] == NEG_INF ? 0.f : fast_exp2(st.row_max[mt][h] - m);
        }
#endif
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
        if (warp == w) {  // warp 0 stores, the others add
#if ELEM_F32
#pragma unroll
            for (int r = 0; r < BLOCK_M; ++r) {
                float m = NEG_INF;  // warp-uniform: computed here, per row, to keep registers free
#pragma unroll
                for (int v = 0; v < NUM_WARPS; ++v) m = fmaxf(m, sM[v * BLOCK_M + r]);
                const float wt = st.row_max[r] == NEG_INF ? 0.f : fast_exp2(st.row_max[r] - m);
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) {
                    float* dst = sO + r * OUT_STRIDE + lane + i * WARP_SIZE;
                    const float x = wt != 0.f ? wt * st.acc_o[r][i] : 0.f;
                    *dst = w == 0 ? x : *dst + x;
                }
            }
#else
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float wt = weight[mt][h];
                    float* dst = sO + (mt * 16 + lane / 4 + h * 8) * OUT_STRIDE + (lane % 4) * 2;
#pragma unroll
                    for (int dt = 0; dt < D_TILES; ++dt) {
                        float2 x = wt != 0.f ? make_float2(wt * st.acc_o[mt][dt][2 * h], wt * st.acc_o[mt][dt][2 * h + 1])
                                             : make_float2(0.f, 0.f);
                        if (w != 0) {
                            const float2 y = *(float2*)(dst + dt * 8);
                            x.x += y.x;
                            x.y += y.y;
                        }
                        *(float2*)(dst + dt * 8) = x;
                    }
                }
#endif
        }
        __syncthreads();  // warp w's contribution is complete before warp w + 1 adds to it
    }

    // A row with no key in this split has L = 0: O = 0 and LSE = -inf. A NaN that reached the row
    // makes L NaN, and O and LSE NaN with it.
    const int heads_q = gridDim.y * heads_per_kv;
    for (int u = tid; u < BLOCK_M * (HEAD_DIM / 4); u += NUM_THREADS) {
        const int row = u / (HEAD_DIM / 4), col = (u % (HEAD_DIM / 4)) * 4;
        const int r = m_start + row;
        if (r >= rows) continue;
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
        const float inv_l = l != 0.f ? 1.f / l : 0.f;
        const float lse2 = l != 0.f ? m + __log2f(l) : NEG_INF;
        const int head = kv_head * heads_per_kv + r / seqlen_q, token = r % seqlen_q;
        if (num_splits == 1) {  // the final result
            elem_t* dst = o + batch * o_batch_stride + head * o_head_stride + token * o_row_stride + col;
            const float out[4] = {acc.x * inv_l, acc.y * inv_l, acc.z * inv_l, acc.w * inv_l};
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (col + e < head_dim) dst[e] = from_float(out[e]);
            if (lse != nullptr && col == 0)
                lse[batch * lse_batch_stride + head * lse_head_stride + token] = lse2 * LN_2;
        } else {  // this split's partial, merged by flash_decode_merge
            const i64 part_row = (((i64)batch * heads_q + head) * seqlen_q + token) * num_splits + split;
            *(float4*)(o_part + part_row * HEAD_DIM + col) =
                make_float4(acc.x * inv_l, acc.y * inv_l, acc.z * inv_l, acc.w * inv_l);
            if (col == 0) lse_part[part_row] = lse2;
        }
    }
}

// Combine the num_splits partials of each query row (one warp per row):
// LSE = log2 sum_s 2^LSE_s, O = sum_s 2^(LSE_s - LSE) O_s. Splits with LSE_s = -inf saw no key and
// are skipped (their O_s is zero). Grid: x = ceil(Hq * Sq / MERGE_WARPS), z = batch.
#define MERGE_WARPS 4
extern "C" __global__ void __launch_bounds__(MERGE_WARPS * WARP_SIZE)
flash_decode_merge(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                   elem_t* __restrict__ o, float* __restrict__ lse,
                   i64 o_batch_stride, i64 o_head_stride, i64 o_row_stride,
                   i64 lse_batch_stride, i64 lse_head_stride,
                   int heads_q, int seqlen_q, int head_dim, int num_splits) {
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * MERGE_WARPS + warp, batch = blockIdx.z;
    if (row >= heads_q * seqlen_q) return;  // the whole warp leaves together
    const int head = row / seqlen_q, token = row % seqlen_q;
    const i64 part_row = ((i64)batch * heads_q * seqlen_q + row) * num_splits;
    const float* lp = lse_part + part_row;
    const float* op = o_part + part_row * HEAD_DIM;

    float m = NEG_INF;
    for (int s = lane; s < num_splits; s += WARP_SIZE) m = fmaxf(m, lp[s]);
    m = warp_max(m);
    float sum = 0.f;
    for (int s = lane; s < num_splits; s += WARP_SIZE)
        if (lp[s] != NEG_INF) sum += fast_exp2(lp[s] - m);  // a NaN LSE_s makes the sum NaN
    sum = warp_sum(sum);
    const float lse2 = sum != 0.f ? m + __log2f(sum) : NEG_INF;

    o += batch * o_batch_stride + head * o_head_stride + token * o_row_stride;
    for (int col = lane * 4; col < HEAD_DIM; col += WARP_SIZE * 4) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < num_splits; ++s) {
            const float ls = lp[s];
            if (ls == NEG_INF) continue;
            const float weight = fast_exp2(ls - lse2);
            const float4 x = *(const float4*)(op + (i64)s * HEAD_DIM + col);
            acc.x += weight * x.x;
            acc.y += weight * x.y;
            acc.z += weight * x.z;
            acc.w += weight * x.w;
        }
        const float out[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (col + e < head_dim) o[col + e] = from_float(out[e]);
    }
    if (lse != nullptr && lane == 0) lse[batch * lse_batch_stride + head * lse_head_stride + token] = lse2 * LN_2;
}

// Write k_new / v_new (B, Hk, Snew, D) into the caches at rows clamp(cache_seqlens[b], 0, Smax) + t;
// rows that would land at or past Smax are dropped. One thread per 16-byte chunk (vec != 0: every
// row 16-byte aligned and head_dim a whole number of chunks) or per element. Grid: x over
// Hk * Snew rows' chunks, z = batch.
#define APPEND_THREADS 128
extern "C" __global__ void __launch_bounds__(APPEND_THREADS)
kvcache_append(const elem_t* __restrict__ k_new, const elem_t* __restrict__ v_new, elem_t* __restrict__ k_cache,
               elem_t* __restrict__ v_cache, const int* __restrict__ cache_seqlens,
               i64 kn_batch_stride, i64 kn_head_stride, i64 kn_row_stride,
               i64 vn_batch_stride, i64 vn_head_stride, i64 vn_row_stride,
               i64 kc_batch_stride, i64 kc_head_stride, i64 kc_row_stride,
               i64 vc_batch_stride, i64 vc_head_stride, i64 vc_row_stride, i64 seqlens_stride,
               int uniform_seqlen, int heads_k, int seqlen_new, int seqlen_max, int head_dim, int vec) {
    const int batch = blockIdx.z;
    const int unit_elems = vec ? 16 / ELEM_BYTES : 1;
    const int units_per_row = head_dim / unit_elems;  // exact: vec requires it
    const i64 u = (i64)blockIdx.x * APPEND_THREADS + threadIdx.x;
    if (u >= (i64)heads_k * seqlen_new * units_per_row) return;
    const int row = (int)(u / units_per_row), col = (int)(u % units_per_row) * unit_elems;
    const int head = row / seqlen_new, t = row % seqlen_new;
    const int cached = cache_seqlens ? cache_seqlens[batch * seqlens_stride] : uniform_seqlen;
    const int pos = min(max(cached, 0), seqlen_max) + t;
    if (pos >= seqlen_max) return;
    const elem_t* ks = k_new + batch * kn_batch_stride + head * kn_head_stride + t * kn_row_stride + col;
    const elem_t* vs = v_new + batch * vn_batch_stride + head * vn_head_stride + t * vn_row_stride + col;
    elem_t* kd = k_cache + batch * kc_batch_stride + head * kc_head_stride + (i64)pos * kc_row_stride + col;
    elem_t* vd = v_cache + batch * vc_batch_stride + head * vc_head_stride + (i64)pos * vc_row_stride + col;
    if (vec) {
        *(uint4*)kd = *(const uint4*)ks;
        *(uint4*)vd = *(const uint4*)vs;
    } else {
        *kd = *ks;
        *vd = *vs;
    }
}
