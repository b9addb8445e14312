// FlashAttention-2 backward on CDNA matrix cores, key-block parallel: dK and dV. fp16 or bf16 in,
// fp32 accumulate, wave64. The math is in backward.h; dQ comes from flash_bwd_mfma_dq.hip, a
// query-parallel kernel of its own, so nothing here adds into shared memory or global memory with
// atomics and the gradients are the same bits on every run.
//
// Grid: x = key block (with DIM_SPLIT > 1: key block * DIM_SPLIT + slice of the head dim), y =
// key/value head, z = batch. Wave w owns keys [w * MATRIX_N, (w + 1) * MATRIX_N) of the block and
// keeps their K and V fragments in registers (or, FRAGS_IN_LDS, their tiles in LDS). The block
// walks every query block of every query head of its GQA group, so dK and dV, summed over the
// group, stay in registers from the first step to the last.
//
// Products (mfma.h; the lane's accumulator column is always one of the wave's keys):
//   S  = Q K^T      A: Q tile [query][dim] in LDS       B: K^T fragments in registers
//   dP = dO V^T     A: dO tile [query][dim] in LDS      B: V^T fragments in registers
//   dV^T += dO^T P  A: dO^T tile [dim][query] in LDS    B: P, the accumulator of S (acc_as_b)
//   dK^T += Q^T dS  A: Q^T tile [dim][query] in LDS     B: dS, the accumulator of dP
// S and dP come out with queries along the accumulator rows, which are the k positions of the next
// two products: P and dS never leave registers. The lse and delta of a row are read from LDS.
//
// Layouts: q, dout (B, Hq, Sq, D); k, v, dk, dv (B, Hk, Sk, D); any batch/head/row strides, D
// contiguous. lse, delta float32 (B, Hq, Sq) with batch/head strides and contiguous rows; lse is
// the forward's (natural log). Reads q, k, v, dout, lse, delta; writes dk, dv. Masks, score
// modifiers and packed batches as in flash_fwd_mfma.hip: the query blocks outside the band of the
// block's keys are skipped, never loaded; with ALiBi the slope is the query head's.

// ---- compile-time configuration (set with -D by xattn/kernels.py) ------------------------------
// ELEM_BF16   1: bfloat16, 0: float16 (ELEM_TYPE, for platform.h, is the same choice)
// HEAD_DIM    padded head dim (multiple of 32);  BLOCK_M  query rows per step (multiple of 32)
// NUM_WAVES   waves per block, BLOCK_N = 32 * NUM_WAVES keys per block
// VEC_LOADS   as in matrix_tile.h;  WAVE_SIZE  64 (MFMA), 32 (WMMA)
// FRAGS_IN_LDS 1: the K and V tiles stay in LDS and their fragments are read at each use
// DIM_SPLIT   the block's dK and dV are HEAD_DIM / DIM_SPLIT dims wide: DIM_SPLIT blocks per key
//             block (x = key block * DIM_SPLIT + slice), each recomputing S and dP for its slice of
//             dK and dV (1: the whole head dim)
// IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN: masks and modifiers (attention_common.h)
// Run time: one AttnParams by value (kernels_common/params.h), as in flash_bwd_portable.hip.

#define NUM_THREADS (NUM_WAVES * WAVE_SIZE)

#include "matrix_tile.h"
#include "../kernels_common/attention_common.h"
#include "../kernels_common/backward.h"

#define BLOCK_N (NUM_WAVES * MATRIX_N)
#define Q_BLOCKS (BLOCK_M / MATRIX_M)     // MATRIX_M-query blocks of S and dP
#define DIM_BLOCKS (HEAD_DIM / MATRIX_M)  // MATRIX_M-dim blocks of dK^T and dV^T
#define DIM_STEPS (HEAD_DIM / MATRIX_K)   // k steps of S and dP
#define QUERY_STEPS (BLOCK_M / MATRIX_K)  // k steps of dV^T and dK^T
#ifndef DIM_SPLIT
#define DIM_SPLIT 1
#endif
#define SLICE_DIMS (HEAD_DIM / DIM_SPLIT)   // dims of dK and dV one block sums
#define SLICE_BLOCKS (SLICE_DIMS / MATRIX_M)  // MATRIX_M-dim blocks of them
#define ROW_STRIDE (HEAD_DIM + PAD)     // sQ, sdO, and the K, V staging: [row][dim]
#define T_STRIDE (BLOCK_M + PAD)        // sQt, sdOt: [dim][query]

static_assert(WAVE_SIZE == MATRIX_WAVE, "the matrix instructions' wave size");
static_assert(HEAD_DIM % MATRIX_M == 0 && BLOCK_M % MATRIX_M == 0, "whole matrix blocks");
static_assert(SLICE_DIMS % MATRIX_M == 0 && SLICE_DIMS * DIM_SPLIT == HEAD_DIM, "whole matrix blocks per slice");

// ---- LDS layout ---------------------------------------------------------------------------------
// sQ [BLOCK_M][ROW_STRIDE] | sdO [BLOCK_M][ROW_STRIDE] | sQt [HEAD_DIM][T_STRIDE] |
// sdOt [HEAD_DIM][T_STRIDE] (16-bit) | sLse2 [BLOCK_M] | sDelta [BLOCK_M] (float). Before the loop
// the front of it stages K, then V, [BLOCK_N][ROW_STRIDE], on their way into registers; with
// FRAGS_IN_LDS sK and sV [BLOCK_N][ROW_STRIDE] follow sdOt and stay for the whole loop.
// xattn/kernels.py (the kernel's shared_memory) computes the same size.
#define QUERY_TILES_U16 (2 * BLOCK_M * ROW_STRIDE + 2 * HEAD_DIM * T_STRIDE)
#define TILES_U16 (QUERY_TILES_U16 + (FRAGS_IN_LDS ? 2 * BLOCK_N * ROW_STRIDE : 0))
#define STAGE_U16 (BLOCK_N * ROW_STRIDE)
#define LDS_U16 (TILES_U16 > STAGE_U16 ? TILES_U16 : STAGE_U16)  // a multiple of 8: floats 16-byte aligned

// ---- device helpers ---------------------------------------------------------------------------

// One step's query-side tiles: Q and dO as stored and transposed, base-2 LSE and delta.
__device__ __forceinline__ void load_query_step(u16* sQ, u16* sdO, u16* sQt, u16* sdOt, float* sLse2,
                                                float* sDelta, const u16* q, i64 q_row_stride,
                                                const u16* dout, i64 dout_row_stride, const float* lse,
                                                const float* delta, int valid_rows, int head_dim, int tid) {
    load_tile<BLOCK_M, ROW_STRIDE, T_STRIDE>(sQ, sQt, q, q_row_stride, valid_rows, head_dim, tid);
    load_tile<BLOCK_M, ROW_STRIDE, T_STRIDE>(sdO, sdOt, dout, dout_row_stride, valid_rows, head_dim, tid);
    for (int r = tid; r < BLOCK_M; r += NUM_THREADS) {
        sLse2[r] = backward_lse2(lse, r, valid_rows);
        sDelta[r] = r < valid_rows ? delta[r] : 0.f;
    }
}

// S becomes P and dP becomes dS, in place (backward.h). Element j of block qb is query
// m_start + acc_row(lane, qb, j); the lane's key is its column. masked: some pair of the step and
// the wave's keys lies outside the band.
__device__ __forceinline__ void softmax_backward_step(acc_t (&acc_s)[Q_BLOCKS], acc_t (&acc_dp)[Q_BLOCKS],
                                                      const float* sLse2, const float* sDelta, int m_start,
                                                      int key, const ScoreMods& mods, bool masked,
                                                      float scale_log2, int lane) {
    constexpr int RUN = ACC_RUN % 4 == 0 ? 4 : 1;
#pragma unroll
    for (int qb = 0; qb < Q_BLOCKS; ++qb)
#pragma unroll
        for (int j0 = 0; j0 < ACC_ELEMS; j0 += RUN) {
            // Where acc_row runs 4 consecutive rows per j0 (MFMA): one 16-byte LDS read each for
            // lse and delta; else (gfx11 WMMA) one read per row.
            float l4[4], d4[4];
            if (RUN == 4) {
                const float4 lse2 = *(const float4*)(sLse2 + acc_row(lane, qb, j0));
                const float4 delta = *(const float4*)(sDelta + acc_row(lane, qb, j0));
                l4[0] = lse2.x, l4[1] = lse2.y, l4[2] = lse2.z, l4[3] = lse2.w;
                d4[0] = delta.x, d4[1] = delta.y, d4[2] = delta.z, d4[3] = delta.w;
            } else {
                l4[0] = sLse2[acc_row(lane, qb, j0)];
                d4[0] = sDelta[acc_row(lane, qb, j0)];
            }
#pragma unroll
            for (int i = 0; i < RUN; ++i) {
                const int j = j0 + i;
                const float2 pds = softmax_backward(acc_s[qb][j], acc_dp[qb][j], m_start + acc_row(lane, qb, j), key,
                                                    mods, masked, l4[i], d4[i], scale_log2);
                acc_s[qb][j] = pds.x;
                acc_dp[qb][j] = pds.y;
            }
        }
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
MATRIX_KERNEL(flash_bwd, _dkdv)(const AttnParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const u16, q, p.q);
    TENSOR_FROM_PARAMS(const u16, k, p.k);
    TENSOR_FROM_PARAMS(const u16, v, p.v);
    TENSOR_FROM_PARAMS(const u16, dout, p.dout);
    TENSOR_FROM_PARAMS(const float, lse, p.lse);
    TENSOR_FROM_PARAMS(const float, delta, p.delta);
    TENSOR_FROM_PARAMS(u16, dk, p.dk);
    TENSOR_FROM_PARAMS(u16, dv, p.dv);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    extern __shared__ __attribute__((aligned(16))) u16 smem[];
    u16* sStage = smem;  // K, then V, before the loop
    u16* sQ = smem;
    u16* sdO = sQ + BLOCK_M * ROW_STRIDE;
    u16* sQt = sdO + BLOCK_M * ROW_STRIDE;
    u16* sdOt = sQt + HEAD_DIM * T_STRIDE;
    u16* sK = FRAGS_IN_LDS ? smem + QUERY_TILES_U16 : sStage;
    u16* sV = FRAGS_IN_LDS ? sK + BLOCK_N * ROW_STRIDE : sStage;
    float* sLse2 = (float*)(smem + LDS_U16);
    float* sDelta = sLse2 + BLOCK_M;

    const int n_block = blockIdx.x / DIM_SPLIT, kv_head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int dim0 = (blockIdx.x % DIM_SPLIT) * SLICE_DIMS;  // the first dim of this block's dK and dV
    const int tid = threadIdx.x, wave = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int n_start = n_block * BLOCK_N;
    const int wave_key_start = n_start + wave * MATRIX_N;
    const int key = wave_key_start + acc_col(lane);  // this lane's key: its column of every product

    const Sequence seq = sequence(batch, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k);
    if (IS_VARLEN && n_start >= seq.seqlen_k) return;  // the grid covers the longest sequence
    seqlen_q = seq.seqlen_q;
    seqlen_k = seq.seqlen_k;
    ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, window_left, window_right, softcap_scale,
                                     alibi_slopes + batch * alibi_batch_stride + kv_head * heads_per_kv, scale);

    // Every address that does not change in the loop is formed now: fewer scalar registers live
    // across it (the element-wise variant otherwise runs out of SGPRs). The indices are
    // non-negative and widen as unsigned: the upper half of each is then a constant 0, where a sign
    // word would take a scalar register of its own (ROCm 5.2's compiler kept n_start's across the
    // loop for dK and dV, and spilled it at D=32).
    const i64 b = (u32)batch, h = (u32)kv_head, q_row = (u32)seq.q_start, k_row = (u32)(seq.k_start + n_start);
    k += b * k_batch_stride + h * k_head_stride + k_row * k_row_stride;
    v += b * v_batch_stride + h * v_head_stride + k_row * v_row_stride;
    q += b * q_batch_stride + q_row * q_row_stride;
    dout += b * dout_batch_stride + q_row * dout_row_stride;
    lse += b * lse_batch_stride + q_row;
    delta += b * delta_batch_stride + q_row;
    dk += b * dk_batch_stride + h * dk_head_stride + k_row * dk_row_stride;
    dv += b * dv_batch_stride + h * dv_head_stride + k_row * dv_row_stride;

    // Prologue: K, then V, through LDS into registers (or left in LDS), where they stay for the
    // whole loop.
    FixedFrags<DIM_STEPS, ROW_STRIDE> k_frag, v_frag;
    load_tile<BLOCK_N, ROW_STRIDE, 0>(sK, nullptr, k, k_row_stride, seqlen_k - n_start, head_dim, tid);
    __syncthreads();  // the K tile is complete
    k_frag.load(sK, wave * MATRIX_N, lane);
    __syncthreads();  // every wave has its K fragments: the staging memory takes V (FRAGS_IN_LDS:
                      // sV is a tile of its own, and this barrier is redundant)
    load_tile<BLOCK_N, ROW_STRIDE, 0>(sV, nullptr, v, v_row_stride, seqlen_k - n_start, head_dim, tid);
    __syncthreads();  // the V tile is complete
    v_frag.load(sV, wave * MATRIX_N, lane);

    // The query blocks that see any key of this block: the band of its first key starts them, the
    // band of its last key ends them (attention_common.h). No block at all: dK = dV = 0.
    const int last_key = min(n_start + BLOCK_N, seqlen_k) - 1;
    const int first_query = IS_CAUSAL ? max(0, first_visible_query(n_start, mods.band)) : 0;
    const int last_query = IS_LOCAL ? min(seqlen_q - 1, last_visible_query(last_key, mods.band)) : seqlen_q - 1;
    const int m_begin = first_query / BLOCK_M;
    const int m_end = last_query < first_query ? m_begin : last_query / BLOCK_M + 1;

    acc_t acc_dk[SLICE_BLOCKS], acc_dv[SLICE_BLOCKS];
#pragma unroll
    for (int db = 0; db < SLICE_BLOCKS; ++db) acc_dk[db] = acc_dv[db] = acc_t{};

    // Every query head of the GQA group adds into the same dK and dV.
    for (int head = kv_head * heads_per_kv; head < (kv_head + 1) * heads_per_kv; ++head) {
        const i64 hq = (u32)head;  // unsigned, as above
        const u16* q_head = q + hq * q_head_stride;
        const u16* do_head = dout + hq * dout_head_stride;
        const float* lse_head = lse + hq * lse_head_stride;
        const float* delta_head = delta + hq * delta_head_stride;
        if (HAS_ALIBI) mods.alibi_coef = -alibi_slopes[batch * alibi_batch_stride + head] / scale;

        for (int m_block = m_begin; m_block < m_end; ++m_block) {
            const int m_start = m_block * BLOCK_M;
            __syncthreads();  // every wave is done with the previous step's tiles (and the V staging)
            const i64 m_row = (u32)m_start;
            load_query_step(sQ, sdO, sQt, sdOt, sLse2, sDelta, q_head + m_row * q_row_stride, q_row_stride,
                            do_head + m_row * dout_row_stride, dout_row_stride, lse_head + m_start,
                            delta_head + m_start, seqlen_q - m_start, head_dim, tid);
            __syncthreads();  // the step's tiles are visible to every wave
            // A wave whose keys no query of this step sees (outside the band, or past the end of
            // the keys) skips the arithmetic; it still takes part in the loads and barriers above.
            const int wave_key_end = wave_key_start + MATRIX_N - 1;
            const bool wave_sees_step = wave_key_start < seqlen_k &&
                (!IS_CAUSAL || wave_key_start <= m_start + BLOCK_M - 1 + mods.band.hi) &&
                (!IS_LOCAL || wave_key_end >= m_start + mods.band.lo);
            if (!wave_sees_step) continue;

            acc_t acc_s[Q_BLOCKS], acc_dp[Q_BLOCKS];
            tile_times_frags<Q_BLOCKS, DIM_STEPS, ROW_STRIDE>(acc_s, sQ, k_frag, lane);    // S = Q K^T
            tile_times_frags<Q_BLOCKS, DIM_STEPS, ROW_STRIDE>(acc_dp, sdO, v_frag, lane);  // dP = dO V^T
            // The step's queries against the wave's keys cross an edge of the band: mask. (Keys past
            // the end need none: their dK and dV rows are never stored.)
            const bool masked = (IS_CAUSAL && wave_key_end > m_start + mods.band.hi) ||
                                (IS_LOCAL && wave_key_start < m_start + BLOCK_M - 1 + mods.band.lo);
            softmax_backward_step(acc_s, acc_dp, sLse2, sDelta, m_start, key, mods, masked, scale_log2, lane);
            // Only this block's slice of dims: rows [dim0, dim0 + SLICE_DIMS) of the transposed tiles.
            tile_times_acc<SLICE_BLOCKS, QUERY_STEPS, T_STRIDE>(acc_dv, sdOt + dim0 * T_STRIDE, acc_s, lane);  // dV^T += dO^T P
            tile_times_acc<SLICE_BLOCKS, QUERY_STEPS, T_STRIDE>(acc_dk, sQt + dim0 * T_STRIDE, acc_dp, lane);  // dK^T += Q^T dS
        }
    }

    // Epilogue: dK = grad_scale * acc_dk, dV = acc_dv, for the keys that exist and the block's slice of
    // dims, each through the staging tile (acc_to_lds, store_tile: coalesced rows). Lanes l and
    // l ^ MATRIX_N hold the same key's other dims.
    const int valid_keys = seqlen_k - n_start, slice_dims = head_dim - dim0;  // slice_dims <= 0: none
    __syncthreads();  // every wave is done with the last step's tiles: the staging memory takes dK
    acc_to_lds<SLICE_BLOCKS, ROW_STRIDE>(sStage, wave * MATRIX_N + acc_col(lane), acc_dk, grad_scale, lane);
    __syncthreads();  // the dK tile is complete
    store_tile<BLOCK_N, ROW_STRIDE, SLICE_DIMS>(dk + dim0, dk_row_stride, sStage, valid_keys, slice_dims, tid);
    __syncthreads();  // every thread has read its share of dK: the staging memory takes dV
    acc_to_lds<SLICE_BLOCKS, ROW_STRIDE>(sStage, wave * MATRIX_N + acc_col(lane), acc_dv, 1.f, lane);
    __syncthreads();  // the dV tile is complete
    store_tile<BLOCK_N, ROW_STRIDE, SLICE_DIMS>(dv + dim0, dv_row_stride, sStage, valid_keys, slice_dims, tid);
}
