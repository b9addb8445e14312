// FlashAttention-2 backward without matrix instructions: every product is a plain FMA over shared
// memory (LDS) tiles held in float32, for any element type. One body for both vendors, entered
// from kernels_cuda/flash_bwd_simt.cu and kernels_hip/flash_bwd_portable.hip, each of which
// includes its vendor's platform.h first (element type, wave size, exp2, wave barrier).
// It serves float32 inputs (tensor cores would round them to tf32, 10 mantissa bits; on AMD every
// GPU), and 16-bit inputs where no matrix-core backward does: head dims past 128 (their registers
// cannot hold dK and dV there), and on AMD GPUs without MFMA/WMMA. Inputs become float32 once, on
// their way into shared memory. The math is in backward.h (softmax_backward).
//
// Two kernels, the mirror images of each other; each is deterministic by construction (no atomics).
//
// _dq: query-block parallel. Grid: x = query block (reversed: causal blocks with the most keys
//   start first), y = query head, z = batch. The block owns BLOCK_ROWS queries, wave w the
//   ROWS_PER_WAVE of them from w * ROWS_PER_WAVE; key tiles of TILE keys stream through shared
//   memory. For S and dP a wave splits into ROW_GROUPS groups of TILE lanes: lane (g, n) computes
//   key n of the tile against rows g, g + ROW_GROUPS, ... of its wave. dS goes through the wave's
//   rows of shared memory, and for dQ += dS K lane l owns head dims l, l + WAVE_SIZE, ... of all of
//   the wave's rows. Reads q, k, v, dout, lse, delta; writes dq.
//
// _dkdv: key-block parallel, the same with keys and queries exchanged. Grid: x = key block, y =
//   key/value head, z = batch. The block owns BLOCK_ROWS keys and walks every query tile of every
//   query head of its GQA group, so dK and dV, summed over the group, stay in registers from the
//   first step to the last. P and dS go through shared memory side by side; for dV += P^T dO and
//   dK += dS^T Q lane l owns head dims l, l + WAVE_SIZE, ... Reads q, k, v, dout, lse, delta;
//   writes dk, dv.
//
// Every wave reads only its own rows of the dS (P, dS) tile: a wave barrier separates writing
// them from reading them, and only the streamed tiles need block barriers. No shuffles: on NVIDIA
// (tests/hip_on_cuda.h) a wave of 64 is two warps and runs as well.
//
// Layouts: q, dout, dq (B, Hq, Sq, D); k, v, dk, dv (B, Hk, Sk, D); any batch/head/row strides, D
// contiguous. lse, delta float32 (B, Hq, Sq) with batch/head strides and contiguous rows; lse is
// the forward's (natural log). head_dim <= HEAD_DIM at run time: padded columns are zero in shared
// memory and never stored. Masks, score modifiers and packed batches as in the forward
// (attention_common.h); the streamed tiles outside the band of the block's rows are never loaded.
// Run time: one AttnParams by value (kernels_common/params.h). Of its scalars, scale and
// scale_log2 are the scores' scale (the softcap c under a softcap, else the attention scale) and
// grad_scale the attention scale, d(scale * x)/dx, applied to dQ and dK.

// ---- compile-time configuration (set with -D by xattn/kernels.py) ------------------------------
// HEAD_DIM    padded head dim (multiple of WAVE_SIZE)
// BLOCK_ROWS  rows a block owns: queries in _dq, keys in _dkdv
// TILE        rows streamed per step (keys in _dq, queries in _dkdv); divides WAVE_SIZE
// NUM_WAVES   waves per block (WAVE_SIZE: platform.h on CUDA, -D on AMD); the element type
//             (platform.h); IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN (attention_common.h)

#include "attention_common.h"
#include "backward.h"

#define NUM_THREADS (NUM_WAVES * WAVE_SIZE)
#define ROWS_PER_WAVE (BLOCK_ROWS / NUM_WAVES)
#define ROW_GROUPS (WAVE_SIZE / TILE)
#define ROWS_PER_LANE (ROWS_PER_WAVE / ROW_GROUPS)
#define D_PER_LANE (HEAD_DIM / WAVE_SIZE)
// Odd row stride for the streamed tiles: in S and dP the TILE lanes of a group read one dim of
// TILE different streamed rows, which then fall in different banks. The owned rows: one row per
// group at a time, a broadcast with one group; with more, the groups read different rows, likewise
// spread by an odd stride. Column reads (lane = dim) are consecutive either way.
#define TILE_STRIDE (HEAD_DIM + 1)
#define OWNED_STRIDE (ROW_GROUPS == 1 ? HEAD_DIM : HEAD_DIM + 1)

static_assert(WAVE_SIZE % TILE == 0, "a wave holds whole groups of TILE lanes");
static_assert(BLOCK_ROWS % NUM_WAVES == 0 && ROWS_PER_WAVE % ROW_GROUPS == 0, "rows split evenly");
static_assert(HEAD_DIM % WAVE_SIZE == 0, "each lane owns whole head dims");

#include "simt_tile.h"

// ---- shared-memory layout (float32) ------------------------------------------------------------
// _dq:   sQ [BLOCK_ROWS][OWNED_STRIDE] | sdO [BLOCK_ROWS][OWNED_STRIDE] | sK [TILE][TILE_STRIDE] |
//        sV [TILE][TILE_STRIDE] | sdS [BLOCK_ROWS][TILE]
// _dkdv: sK [BLOCK_ROWS][OWNED_STRIDE] | sV [BLOCK_ROWS][OWNED_STRIDE] | sQ [TILE][TILE_STRIDE] |
//        sdO [TILE][TILE_STRIDE] | sPdS [BLOCK_ROWS][TILE] (float2: P, dS)
// xattn/kernels.py (_simt_backward_smem) computes the same sizes; tests/test_kernels.py compares.
#define SMEM_BYTES(SLICES) ((2 * BLOCK_ROWS * OWNED_STRIDE + 2 * TILE * TILE_STRIDE + BLOCK_ROWS * TILE * (SLICES)) * 4)

// ---- device helpers ---------------------------------------------------------------------------

// Raw S and dP of this lane's streamed row against its owned rows: x[i] = a_owned[i] . a_tile,
// dp[i] = b_owned[i] . b_tile (a: Q or K, b: dO or V), owned row group + i * ROW_GROUPS of the
// wave's (a_owned, b_owned: the wave's first row).
__device__ __forceinline__ void dot_rows(float (&x)[ROWS_PER_LANE], float (&dp)[ROWS_PER_LANE],
                                         const float* a_owned, const float* b_owned, const float* a_tile,
                                         const float* b_tile, int group, int tile_row, int head_dim) {
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) x[i] = dp[i] = 0.f;
    for (int d = 0; d < head_dim; ++d) {
        const float a_d = a_tile[tile_row * TILE_STRIDE + d], b_d = b_tile[tile_row * TILE_STRIDE + d];
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) {
            const int row = group + i * ROW_GROUPS;
            x[i] = fmaf(a_owned[row * OWNED_STRIDE + d], a_d, x[i]);
            dp[i] = fmaf(b_owned[row * OWNED_STRIDE + d], b_d, dp[i]);
        }
    }
}

// Store one row's D_PER_LANE columns (lane = column), scaled, as elem_t.
__device__ __forceinline__ void store_row(elem_t* gmem, const float (&acc)[D_PER_LANE], float scale,
                                          int head_dim, int lane) {
#pragma unroll
    for (int i = 0; i < D_PER_LANE; ++i) {
        const int col = lane + i * WAVE_SIZE;
        if (col < head_dim) gmem[col] = from_float(acc[i] * scale);
    }
}

// ---- the bodies, called by the vendors' entry points ------------------------------------------

__device__ __forceinline__ void flash_bwd_simt_dq_body(const AttnParams& p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const elem_t, q, p.q);
    TENSOR_FROM_PARAMS(const elem_t, k, p.k);
    TENSOR_FROM_PARAMS(const elem_t, v, p.v);
    TENSOR_FROM_PARAMS(const elem_t, dout, p.dout);
    TENSOR_FROM_PARAMS(const float, lse, p.lse);
    TENSOR_FROM_PARAMS(const float, delta, p.delta);
    TENSOR_FROM_PARAMS(elem_t, dq, p.dq);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    extern __shared__ float smem_f32[];
    float* sQ = smem_f32;
    float* sdO = sQ + BLOCK_ROWS * OWNED_STRIDE;
    float* sK = sdO + BLOCK_ROWS * OWNED_STRIDE;
    float* sV = sK + TILE * TILE_STRIDE;
    float* sdS = sV + TILE * TILE_STRIDE;

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / heads_per_kv;
    const int tid = threadIdx.x, wave = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int key = lane % TILE, group = lane / TILE;  // this lane's key of the tile, and row group
    const int m_start = m_block * BLOCK_ROWS;
    const int wave_row0 = m_start + wave * ROWS_PER_WAVE;  // the wave's first query row
    const float* sQ_wave = sQ + wave * ROWS_PER_WAVE * OWNED_STRIDE;
    const float* sdO_wave = sdO + wave * ROWS_PER_WAVE * OWNED_STRIDE;
    float* sdS_wave = sdS + wave * ROWS_PER_WAVE * TILE;

    const Sequence seq = sequence(batch, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k);
    if (IS_VARLEN && m_start >= seq.seqlen_q) return;  // the grid covers the longest sequence
    seqlen_q = seq.seqlen_q;
    seqlen_k = seq.seqlen_k;
    const ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, window_left, window_right, softcap_scale,
                                           alibi_slopes + batch * alibi_batch_stride + head, scale);

    q += batch * q_batch_stride + head * q_head_stride + (i64)(seq.q_start + m_start) * q_row_stride;
    dout += batch * dout_batch_stride + head * dout_head_stride + (i64)(seq.q_start + m_start) * dout_row_stride;
    k += batch * k_batch_stride + kv_head * k_head_stride + (i64)seq.k_start * k_row_stride;
    v += batch * v_batch_stride + kv_head * v_head_stride + (i64)seq.k_start * v_row_stride;
    dq += batch * dq_batch_stride + head * dq_head_stride + (i64)seq.q_start * dq_row_stride;
    lse += batch * lse_batch_stride + head * lse_head_stride + seq.q_start;
    delta += batch * delta_batch_stride + head * delta_head_stride + seq.q_start;

    const KeyRange tiles = key_tiles(m_start, min(BLOCK_ROWS, seqlen_q - m_start), TILE, seqlen_k, mods.band);
    load_rows(sQ, OWNED_STRIDE, q, q_row_stride, BLOCK_ROWS, seqlen_q - m_start, head_dim, tid);
    load_rows(sdO, OWNED_STRIDE, dout, dout_row_stride, BLOCK_ROWS, seqlen_q - m_start, head_dim, tid);

    // The base-2 LSE and delta of this lane's rows (+inf and 0 past the end).
    float row_lse2[ROWS_PER_LANE], row_delta[ROWS_PER_LANE];
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) {
        const int row = wave_row0 + group + i * ROW_GROUPS;
        row_lse2[i] = backward_lse2(lse, row, seqlen_q);
        row_delta[i] = row < seqlen_q ? delta[row] : 0.f;
    }
    float acc_dq[ROWS_PER_WAVE][D_PER_LANE];  // the wave's rows, this lane's dims
#pragma unroll
    for (int r = 0; r < ROWS_PER_WAVE; ++r)
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) acc_dq[r][i] = 0.f;

    for (int tile = tiles.tile_end - 1; tile >= tiles.tile_begin; --tile) {
        const int n_start = tile * TILE;
        __syncthreads();  // every wave is done with the previous K and V tiles (and its dS)
        load_rows(sK, TILE_STRIDE, k + n_start * k_row_stride, k_row_stride, TILE, seqlen_k - n_start, head_dim, tid);
        load_rows(sV, TILE_STRIDE, v + n_start * v_row_stride, v_row_stride, TILE, seqlen_k - n_start, head_dim, tid);
        __syncthreads();  // K and V tiles (and, the first time, Q and dO) visible to every wave

        // S = Q K^T and dP = dO V^T for this lane's key; modifiers and mask; dS = P (dP - delta)
        // to the wave's rows of sdS.
        float x[ROWS_PER_LANE], dp[ROWS_PER_LANE];
        dot_rows(x, dp, sQ_wave, sdO_wave, sK, sV, group, key, head_dim);
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) {
            const int row = group + i * ROW_GROUPS;  // within the wave
            sdS_wave[row * TILE + key] = softmax_backward(x[i], dp[i], wave_row0 + row, n_start + key, mods, true,
                                                          row_lse2[i], row_delta[i], scale_log2).y;
        }
        wave_barrier();  // the wave's dS visible to all its lanes

        // dQ += dS K: this lane's head dims of every row of the wave.
        for (int n = 0; n < TILE; ++n) {
            float k_n[D_PER_LANE];
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) k_n[i] = sK[n * TILE_STRIDE + lane + i * WAVE_SIZE];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WAVE; ++r) {
                const float ds = sdS_wave[r * TILE + n];
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) acc_dq[r][i] = fmaf(ds, k_n[i], acc_dq[r][i]);
            }
        }
    }

    // Epilogue: dQ = grad_scale * acc. Rows that see no key write zeros.
#pragma unroll
    for (int r = 0; r < ROWS_PER_WAVE; ++r) {
        const int row = wave_row0 + r;
        if (row < seqlen_q) store_row(dq + row * dq_row_stride, acc_dq[r], grad_scale, head_dim, lane);
    }
}

__device__ __forceinline__ void flash_bwd_simt_dkdv_body(const AttnParams& p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const elem_t, q, p.q);
    TENSOR_FROM_PARAMS(const elem_t, k, p.k);
    TENSOR_FROM_PARAMS(const elem_t, v, p.v);
    TENSOR_FROM_PARAMS(const elem_t, dout, p.dout);
    TENSOR_FROM_PARAMS(const float, lse, p.lse);
    TENSOR_FROM_PARAMS(const float, delta, p.delta);
    TENSOR_FROM_PARAMS(elem_t, dk, p.dk);
    TENSOR_FROM_PARAMS(elem_t, dv, p.dv);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    extern __shared__ float smem_f32[];
    float* sK = smem_f32;
    float* sV = sK + BLOCK_ROWS * OWNED_STRIDE;
    float* sQ = sV + BLOCK_ROWS * OWNED_STRIDE;
    float* sdO = sQ + TILE * TILE_STRIDE;
    float2* sPdS = (float2*)(sdO + TILE * TILE_STRIDE);  // 8-byte aligned: the offsets above are even

    const int n_block = blockIdx.x, kv_head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int tid = threadIdx.x, wave = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int query = lane % TILE, group = lane / TILE;  // this lane's query of the tile, and row group
    const int n_start = n_block * BLOCK_ROWS;
    const int wave_key0 = n_start + wave * ROWS_PER_WAVE;  // the wave's first key
    const float* sK_wave = sK + wave * ROWS_PER_WAVE * OWNED_STRIDE;
    const float* sV_wave = sV + wave * ROWS_PER_WAVE * OWNED_STRIDE;
    float2* sPdS_wave = sPdS + wave * ROWS_PER_WAVE * TILE;

    const Sequence seq = sequence(batch, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k);
    if (IS_VARLEN && n_start >= seq.seqlen_k) return;  // the grid covers the longest sequence
    seqlen_q = seq.seqlen_q;
    seqlen_k = seq.seqlen_k;
    ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, window_left, window_right, softcap_scale,
                                     alibi_slopes + batch * alibi_batch_stride + kv_head * heads_per_kv, scale);

    k += batch * k_batch_stride + kv_head * k_head_stride + (i64)(seq.k_start + n_start) * k_row_stride;
    v += batch * v_batch_stride + kv_head * v_head_stride + (i64)(seq.k_start + n_start) * v_row_stride;
    load_rows(sK, OWNED_STRIDE, k, k_row_stride, BLOCK_ROWS, seqlen_k - n_start, head_dim, tid);
    load_rows(sV, OWNED_STRIDE, v, v_row_stride, BLOCK_ROWS, seqlen_k - n_start, head_dim, tid);

    // The query tiles that see any key of this block: from the band of its first key to that of its
    // last (attention_common.h). No tile at all: dK = dV = 0 is still written.
    const int last_key = min(n_start + BLOCK_ROWS, seqlen_k) - 1;
    const int first_query = IS_CAUSAL ? max(0, first_visible_query(n_start, mods.band)) : 0;
    const int last_query = IS_LOCAL ? min(seqlen_q - 1, last_visible_query(last_key, mods.band)) : seqlen_q - 1;
    const int m_begin = first_query / TILE, m_end = last_query < first_query ? m_begin : last_query / TILE + 1;

    float acc_dk[ROWS_PER_WAVE][D_PER_LANE], acc_dv[ROWS_PER_WAVE][D_PER_LANE];  // the wave's keys, this lane's dims
#pragma unroll
    for (int r = 0; r < ROWS_PER_WAVE; ++r)
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) acc_dk[r][i] = acc_dv[r][i] = 0.f;

    // Every query head of the GQA group adds into the same dK and dV.
    for (int head = kv_head * heads_per_kv; head < (kv_head + 1) * heads_per_kv; ++head) {
        const elem_t* q_head = q + batch * q_batch_stride + head * q_head_stride + (i64)seq.q_start * q_row_stride;
        const elem_t* do_head = dout + batch * dout_batch_stride + head * dout_head_stride + (i64)seq.q_start * dout_row_stride;
        const float* lse_head = lse + batch * lse_batch_stride + head * lse_head_stride + seq.q_start;
        const float* delta_head = delta + batch * delta_batch_stride + head * delta_head_stride + seq.q_start;
        if (HAS_ALIBI) mods.alibi_coef = -alibi_slopes[batch * alibi_batch_stride + head] / scale;

        for (int m_tile = m_begin; m_tile < m_end; ++m_tile) {
            const int m_start = m_tile * TILE;
            __syncthreads();  // every wave is done with the previous Q and dO tiles (and its P, dS)
            load_rows(sQ, TILE_STRIDE, q_head + m_start * q_row_stride, q_row_stride, TILE, seqlen_q - m_start, head_dim, tid);
            load_rows(sdO, TILE_STRIDE, do_head + m_start * dout_row_stride, dout_row_stride, TILE, seqlen_q - m_start, head_dim, tid);
            const float query_lse2 = backward_lse2(lse_head, m_start + query, seqlen_q);
            const float query_delta = m_start + query < seqlen_q ? delta_head[m_start + query] : 0.f;
            __syncthreads();  // Q and dO tiles (and, the first time, K and V) visible to every wave

            // S^T = K Q^T and dP^T = V dO^T for this lane's query; modifiers and mask; P and dS
            // side by side to the wave's rows of sPdS (one broadcast load gives both). Keys past
            // the end are hidden too: their P is never used, but 0 keeps the tile clean.
            float x[ROWS_PER_LANE], dp[ROWS_PER_LANE];
            dot_rows(x, dp, sK_wave, sV_wave, sQ, sdO, group, query, head_dim);
#pragma unroll
            for (int i = 0; i < ROWS_PER_LANE; ++i) {
                const int row = group + i * ROW_GROUPS;  // within the wave
                sPdS_wave[row * TILE + query] = softmax_backward(x[i], dp[i], m_start + query, wave_key0 + row, mods,
                                                                 true, query_lse2, query_delta, scale_log2);
            }
            wave_barrier();  // the wave's P and dS visible to all its lanes

            // dV += P^T dO, dK += dS^T Q: this lane's head dims of every key of the wave.
            for (int n = 0; n < TILE; ++n) {
                float do_n[D_PER_LANE], q_n[D_PER_LANE];
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) {
                    do_n[i] = sdO[n * TILE_STRIDE + lane + i * WAVE_SIZE];
                    q_n[i] = sQ[n * TILE_STRIDE + lane + i * WAVE_SIZE];
                }
#pragma unroll
                for (int r = 0; r < ROWS_PER_WAVE; ++r) {
                    const float2 pds = sPdS_wave[r * TILE + n];
#pragma unroll
                    for (int i = 0; i < D_PER_LANE; ++i) {
                        acc_dv[r][i] = fmaf(pds.x, do_n[i], acc_dv[r][i]);
                        acc_dk[r][i] = fmaf(pds.y, q_n[i], acc_dk[r][i]);
                    }
                }
            }
        }
    }

    // Epilogue: dK = grad_scale * acc_dk, dV = acc_dv, for the keys that exist.
    dk += batch * dk_batch_stride + kv_head * dk_head_stride + (i64)seq.k_start * dk_row_stride;
    dv += batch * dv_batch_stride + kv_head * dv_head_stride + (i64)seq.k_start * dv_row_stride;
#pragma unroll
    for (int r = 0; r < ROWS_PER_WAVE; ++r) {
        const int key = wave_key0 + r;
        if (key < seqlen_k) {
            store_row(dk + key * dk_row_stride, acc_dk[r], grad_scale, head_dim, lane);
            store_row(dv + key * dv_row_stride, acc_dv[r], 1.f, head_dim, lane);
        }
    }
}
