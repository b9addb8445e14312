// FlashAttention-2 backward on the CUDA cores, in exact float32 arithmetic, for any element type.
//
// It serves what the tensor-core backward (flash_bwd_dkdv.cu, flash_bwd_dq.cu) does not: float32
// inputs (tensor cores would round them to tf32, 10 mantissa bits), and fp16/bf16 inputs with head
// dims above 128, where the tensor-core kernels cannot hold dK and dV in registers. Inputs are
// converted to float32 once, on their way into shared memory; every product and sum is float32.
//
// Same math and conventions as flash_bwd_dkdv.cu (read that header first). With S = scale Q K^T,
// P = softmax(S) recomputed from the forward's natural-log LSE (turned into base 2 on loading, so
// that P = exp2(S_raw * scale_log2 - lse_log2) is one FFMA and one MUFU op), dP = dO V^T and
// delta = rowsum(dO * O) from flash_bwd_preprocess (flash_bwd_prep.cu):
//   dS = P * (dP - delta),   dV = P^T dO,   dK = scale dS^T Q,   dQ = scale dS K.
// Query rows past the end, and rows that saw no key in the forward (LSE = -inf), get LSE = +inf:
// then P = exp2(s - inf) = 0 for every key, and dS = 0 * (finite) = 0, so they add nothing and no
// NaN can appear. Hidden (query, key) pairs get P = 0 directly.
//
// Two kernels, the mirror images of each other; each is deterministic by construction (no atomics).
//
// flash_bwd_simt_dq: query-block parallel, shaped like flash_fwd_f32.cu. Grid: x = query block
//   (reversed: causal blocks with the most keys start first), y = query head, z = batch. Warp w
//   owns ROWS_PER_WARP query rows. Per tile of BLOCK_N = 32 keys, lane l computes s and dp of key l
//   against each of the warp's rows, then dS goes through a warp-private slice of shared memory
//   so that for dQ += dS K lane l can own head-dim columns l, l + 32, ...
//   Reads q, k, v, dout, lse, delta; writes dq.
//
// flash_bwd_simt_dkdv: key-block parallel. Grid: x = key block, y = key/value head, z = batch. Warp
//   w owns ROWS_PER_WARP key rows. The block walks every query tile of every query head of its GQA
//   group, so dK and dV, summed over the group, stay in registers from the first step to the last.
//   Per tile of 32 queries, lane l computes s and dp of query l against each of the warp's keys;
//   P and dS go through the warp's slice of shared memory, and for dV += P^T dO, dK += dS^T Q lane
//   l owns head-dim columns l, l + 32, ...  Reads q, k, v, dout, lse, delta; writes dk, dv.
//
// Layouts: q, dout, dq (B, Hq, Sq, D); k, v, dk, dv (B, Hk, Sk, D); any batch/head/row strides, D
// contiguous, elements of elem_t (platform.h). lse, delta float32 (B, Hq, Sq) with batch/head
// strides and contiguous rows. head_dim <= HEAD_DIM at run time: columns past it are zero in shared
// memory and never stored.

// ---- compile-time configuration (xattn/kernels.py) ---------------------------------------------
// ELEM_F32, ELEM_BF16  element type (platform.h)
// HEAD_DIM             padded head dim, a multiple of 32 (each lane owns HEAD_DIM / 32 columns)
// NUM_WARPS            warps per thread block
// ROWS_PER_WARP        rows each warp owns: query rows in flash_bwd_simt_dq, key rows in _dkdv
// MIN_BLOCKS, and the mask/modifier flags of attention_common.h (parameters as in flash_bwd_dkdv.cu)

#include "platform.h"
#include "../kernels_common/attention_common.h"

#define NUM_THREADS (NUM_WARPS * WARP_SIZE)
#define BLOCK_ROWS (NUM_WARPS * ROWS_PER_WARP)  // rows a block owns (queries for _dq, keys for _dkdv)
#define TILE WARP_SIZE                          // rows streamed per step, one per lane
#define D_PER_LANE (HEAD_DIM / WARP_SIZE)
// Odd row stride for the streamed tiles: in s and dp the 32 lanes read column d of 32 different
// rows, which then fall in 32 different banks. The owned rows are read at one address per warp (a
// broadcast) and need none; column reads (lane = column) are consecutive either way.
#define TILE_STRIDE (HEAD_DIM + 1)

static_assert(HEAD_DIM % WARP_SIZE == 0, "each lane owns whole head-dim columns");

#include "../kernels_common/simt_tile.h"

// ---- shared-memory layout (floats; xattn/kernels.py computes the same sizes) -------------------
// flash_bwd_simt_dq:   sQ [BLOCK_ROWS][HEAD_DIM] | sdO [BLOCK_ROWS][HEAD_DIM] |
//                      sK [TILE][TILE_STRIDE] | sV [TILE][TILE_STRIDE] | sdS [NUM_WARPS][ROWS_PER_WARP][TILE]
// flash_bwd_simt_dkdv: sK [BLOCK_ROWS][HEAD_DIM] | sV [BLOCK_ROWS][HEAD_DIM] |
//                      sQ [TILE][TILE_STRIDE] | sdO [TILE][TILE_STRIDE] | sPdS [NUM_WARPS][ROWS_PER_WARP][TILE] (float2)

// ---- device helpers ---------------------------------------------------------------------------

// P and dS of one (query, key) pair from its raw score x = q.k (unscaled) and dp = dO.v.
__device__ __forceinline__ float2 softmax_backward(float x, float dp, int query, int key,
                                                   const ScoreMods& mods, float lse2, float delta,
                                                   float scale_log2) {
    // lse2 = +inf (empty row, row past the end) gives exp2(-inf) = 0. Hidden pairs are set to 0
    // outright rather than through s = -inf, which would turn into NaN if scale were 0.
    float s = modified_score(x, query, key, mods, false);
    float p = key_visible(query, key, mods.band, mods.seqlen_k) ? fast_exp2(fmaf(s, scale_log2, -lse2)) : 0.f;
    float ds = p * (dp - delta);
    return make_float2(p, HAS_SOFTCAP ? ds * softcap_grad(s) : ds);
}

// Store one row's HEAD_DIM / 32 columns (lane = column), scaled, as elem_t.
__device__ __forceinline__ void store_row(elem_t* gmem, const float (&acc)[D_PER_LANE], float scale,
                                          int head_dim, int lane) {
#pragma unroll
    for (int i = 0; i < D_PER_LANE; ++i) {
        int col = lane + i * WARP_SIZE;
        if (col < head_dim) gmem[col] = from_float(acc[i] * scale);
    }
}

// ---- entry points ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_bwd_simt_dq(AttnParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const elem_t, q, p.q);
    TENSOR_FROM_PARAMS(const elem_t, k, p.k);
    TENSOR_FROM_PARAMS(const elem_t, v, p.v);
    TENSOR_FROM_PARAMS(const elem_t, dout, p.dout);
    TENSOR_FROM_PARAMS(const float, lse, p.lse);
    TENSOR_FROM_PARAMS(const float, delta, p.delta);
    TENSOR_FROM_PARAMS(elem_t, dq, p.dq);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    extern __shared__ __align__(16) float smem_f32[];
    float* sQ = smem_f32;
    float* sdO = sQ + BLOCK_ROWS * HEAD_DIM;
    float* sK = sdO + BLOCK_ROWS * HEAD_DIM;
    float* sV = sK + TILE * TILE_STRIDE;
    float* sdS = sV + TILE * TILE_STRIDE;

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / heads_per_kv;
    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int m_start = m_block * BLOCK_ROWS;
    const int warp_row_start = m_start + warp * ROWS_PER_WARP;
    const float* sQ_warp = sQ + warp * ROWS_PER_WARP * HEAD_DIM;
    const float* sdO_warp = sdO + warp * ROWS_PER_WARP * HEAD_DIM;
    float* sdS_warp = sdS + warp * ROWS_PER_WARP * TILE;

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
    load_rows(sQ, HEAD_DIM, q, q_row_stride, BLOCK_ROWS, seqlen_q - m_start, head_dim, tid);
    load_rows(sdO, HEAD_DIM, dout, dout_row_stride, BLOCK_ROWS, seqlen_q - m_start, head_dim, tid);

    // Per-row constants, the same in every lane: base-2 LSE and delta (0 past the end).
    float row_lse2[ROWS_PER_WARP], row_delta[ROWS_PER_WARP];
    float acc_dq[ROWS_PER_WARP][D_PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = warp_row_start + r;
        row_lse2[r] = backward_lse2(lse, row, seqlen_q);
        row_delta[r] = row < seqlen_q ? delta[row] : 0.f;
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) acc_dq[r][i] = 0.f;
    }

    for (int tile = tiles.tile_end - 1; tile >= tiles.tile_begin; --tile) {
        const int n_start = tile * TILE;
        __syncthreads();  // every warp is done with the previous K and V tiles (and its dS slice)
        load_rows(sK, TILE_STRIDE, k + n_start * k_row_stride, k_row_stride, TILE, seqlen_k - n_start, head_dim, tid);
        load_rows(sV, TILE_STRIDE, v + n_start * v_row_stride, v_row_stride, TILE, seqlen_k - n_start, head_dim, tid);
        __syncthreads();  // K and V tiles (and, the first time, Q and dO) visible to every warp

        // S = Q K^T and dP = dO V^T: this lane's key against each of the warp's rows.
        float s[ROWS_PER_WARP], dp[ROWS_PER_WARP];
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) s[r] = dp[r] = 0.f;
        for (int d = 0; d < head_dim; ++d) {
            float k_d = sK[lane * TILE_STRIDE + d], v_d = sV[lane * TILE_STRIDE + d];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) {
                s[r] = fmaf(sQ_warp[r * HEAD_DIM + d], k_d, s[r]);
                dp[r] = fmaf(sdO_warp[r * HEAD_DIM + d], v_d, dp[r]);
            }
        }

        // Mask, P = exp2(S - LSE), dS = P (dP - delta); dS to the warp's slice.
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
            sdS_warp[r * TILE + lane] = softmax_backward(s[r], dp[r], warp_row_start + r, n_start + lane, mods,
                                                         row_lse2[r], row_delta[r], scale_log2).y;
        }
        wave_barrier();  // every lane's dS visible to the whole warp

        // dQ += dS K: this lane's head-dim columns.
        for (int n = 0; n < TILE; ++n) {
            float k_n[D_PER_LANE];
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) k_n[i] = sK[n * TILE_STRIDE + lane + i * WARP_SIZE];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) {
                float ds = sdS_warp[r * TILE + n];
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) acc_dq[r][i] = fmaf(ds, k_n[i], acc_dq[r][i]);
            }
        }
    }

    // Epilogue: dQ = scale * acc. Rows that see no key write zeros.
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = warp_row_start + r;
        if (row < seqlen_q) store_row(dq + row * dq_row_stride, acc_dq[r], grad_scale, head_dim, lane);
    }
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_bwd_simt_dkdv(AttnParams p) {
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
    extern __shared__ __align__(16) float smem_f32[];
    float* sK = smem_f32;
    float* sV = sK + BLOCK_ROWS * HEAD_DIM;
    float* sQ = sV + BLOCK_ROWS * HEAD_DIM;
    float* sdO = sQ + TILE * TILE_STRIDE;
    float2* sPdS = (float2*)(sdO + TILE * TILE_STRIDE);  // 8-byte aligned: the offsets above are even

    const int n_block = blockIdx.x, kv_head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int n_start = n_block * BLOCK_ROWS;
    const int warp_key_start = n_start + warp * ROWS_PER_WARP;
    const float* sK_warp = sK + warp * ROWS_PER_WARP * HEAD_DIM;
    const float* sV_warp = sV + warp * ROWS_PER_WARP * HEAD_DIM;
    float2* sPdS_warp = sPdS + warp * ROWS_PER_WARP * TILE;

    const Sequence seq = sequence(batch, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k);
    if (IS_VARLEN && n_start >= seq.seqlen_k) return;  // the grid covers the longest sequence
    seqlen_q = seq.seqlen_q;
    seqlen_k = seq.seqlen_k;
    ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, window_left, window_right, softcap_scale,
                                     alibi_slopes + batch * alibi_batch_stride + kv_head * heads_per_kv, scale);

    k += batch * k_batch_stride + kv_head * k_head_stride + (i64)(seq.k_start + n_start) * k_row_stride;
    v += batch * v_batch_stride + kv_head * v_head_stride + (i64)(seq.k_start + n_start) * v_row_stride;
    load_rows(sK, HEAD_DIM, k, k_row_stride, BLOCK_ROWS, seqlen_k - n_start, head_dim, tid);
    load_rows(sV, HEAD_DIM, v, v_row_stride, BLOCK_ROWS, seqlen_k - n_start, head_dim, tid);

    // The query tiles that see any key of this block: from the band of its first key to that of its
    // last (attention_common.h). No tile at all: dK = dV = 0 is still written.
    const int last_key = min(n_start + BLOCK_ROWS, seqlen_k) - 1;
    const int first_query = IS_CAUSAL ? max(0, first_visible_query(n_start, mods.band)) : 0;
    const int last_query = IS_LOCAL ? min(seqlen_q - 1, last_visible_query(last_key, mods.band)) : seqlen_q - 1;
    const int m_begin = first_query / TILE, m_end = last_query < first_query ? m_begin : last_query / TILE + 1;

    float acc_dk[ROWS_PER_WARP][D_PER_LANE], acc_dv[ROWS_PER_WARP][D_PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r)
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
            const int query = m_start + lane;  // this lane's query in s and dp
            __syncthreads();  // every warp is done with the previous Q and dO tiles (and its P, dS slice)
            load_rows(sQ, TILE_STRIDE, q_head + m_start * q_row_stride, q_row_stride, TILE, seqlen_q - m_start, head_dim, tid);
            load_rows(sdO, TILE_STRIDE, do_head + m_start * dout_row_stride, dout_row_stride, TILE, seqlen_q - m_start, head_dim, tid);
            const float query_lse2 = backward_lse2(lse_head, query, seqlen_q);
            const float query_delta = query < seqlen_q ? delta_head[query] : 0.f;
            __syncthreads();  // Q and dO tiles (and, the first time, K and V) visible to every warp

            // S^T = K Q^T and dP^T = V dO^T: each of the warp's keys against this lane's query.
            float s[ROWS_PER_WARP], dp[ROWS_PER_WARP];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) s[r] = dp[r] = 0.f;
            for (int d = 0; d < head_dim; ++d) {
                float q_d = sQ[lane * TILE_STRIDE + d], do_d = sdO[lane * TILE_STRIDE + d];
#pragma unroll
                for (int r = 0; r < ROWS_PER_WARP; ++r) {
                    s[r] = fmaf(sK_warp[r * HEAD_DIM + d], q_d, s[r]);
                    dp[r] = fmaf(sV_warp[r * HEAD_DIM + d], do_d, dp[r]);
                }
            }

            // Mask, P^T and dS^T to the warp's slice, side by side: one broadcast load gives both.
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) {
                sPdS_warp[r * TILE + lane] = softmax_backward(s[r], dp[r], query, warp_key_start + r, mods,
                                                              query_lse2, query_delta, scale_log2);
            }
            wave_barrier();  // every lane's P and dS visible to the whole warp

            // dV += P^T dO, dK += dS^T Q: this lane's head-dim columns (scale applied at the end).
            for (int n = 0; n < TILE; ++n) {
                float do_n[D_PER_LANE], q_n[D_PER_LANE];
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) {
                    do_n[i] = sdO[n * TILE_STRIDE + lane + i * WARP_SIZE];
                    q_n[i] = sQ[n * TILE_STRIDE + lane + i * WARP_SIZE];
                }
#pragma unroll
                for (int r = 0; r < ROWS_PER_WARP; ++r) {
                    float2 pds = sPdS_warp[r * TILE + n];
#pragma unroll
                    for (int i = 0; i < D_PER_LANE; ++i) {
                        acc_dv[r][i] = fmaf(pds.x, do_n[i], acc_dv[r][i]);
                        acc_dk[r][i] = fmaf(pds.y, q_n[i], acc_dk[r][i]);
                    }
                }
            }
        }
    }

    // Epilogue: dK = scale * acc_dk, dV = acc_dv, for the keys that exist.
    dk += batch * dk_batch_stride + kv_head * dk_head_stride + (i64)seq.k_start * dk_row_stride;
    dv += batch * dv_batch_stride + kv_head * dv_head_stride + (i64)seq.k_start * dv_row_stride;
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int key = warp_key_start + r;
        if (key < seqlen_k) {
            store_row(dk + key * dk_row_stride, acc_dk[r], grad_scale, head_dim, lane);
            store_row(dv + key * dv_row_stride, acc_dv[r], 1.f, head_dim, lane);
        }
    }
}
