// FlashAttention-2 backward on tensor cores, key-block parallel: fp16 or bf16 in, fp32 accumulate.
//
// With S = scale Q K^T, P = softmax(S) (recomputed from the forward's LSE, never stored),
// dP = dO V^T and delta = rowsum(dO * O) (flash_bwd_prep.cu):
//   dS = P * (dP - delta),   dV = P^T dO,   dK = scale dS^T Q,   dQ = scale dS K.
//
// Grid: x = key block, y = key/value head, z = batch. A thread block keeps its K and V tiles in
// shared memory and walks every query block of every query head of its GQA group, so dK and dV,
// summed over the group, stay in registers from the first step to the last: no reduction pass and
// no atomics for them. dQ gets each step's share: with COMPUTE_DQ the block writes dS to shared
// memory and adds dS K into a float32 accumulator (atomics; flash_bwd_prep.cu converts it);
// without, flash_bwd_dq.cu computes dQ on its own, deterministically.
//
// Warps split the keys: key group g owns keys [g * WARP_N, (g + 1) * WARP_N) of the block and
// computes the transposed products S^T = K Q^T and dP^T = V dO^T for them, so that P^T and dS^T
// come out in the accumulator layout that is already the A operand of dV += P^T dO and
// dK += dS^T Q. Up to head dim 128 a key group is one warp, which holds its keys' whole dK and dV
// rows (2 x 16 keys x 128 columns = 128 floats per thread) and feeds P^T, dS^T from registers.
// Past 128 the rows no longer fit beside the products (256 floats at D = 256), so a key group is
// DKV_WARPS_D warps that split the head dim of dK and dV; each of them computes S^T, dP^T for its
// share of the step's queries, and P^T, dS^T meet in shared memory, whence every warp of the group
// reads them as the A operand (ldmatrix) of its columns' dV += P^T dO, dK += dS^T Q.
//
// Expected speed at D = 256 (H200, S = 8192, bf16, dQ by atomics), from the tile arithmetic of
// the sm_90 row (64 keys x 64 queries per step, 8 warps = 4 key groups x 2 head-dim halves). A step
// is 5 products of 64 x 64 x 256 (S^T, dP^T, dV, dK, dQ) = 2560 m16n8k16 mma, as at D = 128 (128
// keys x 64 queries x 128). Shared-memory traffic per step: S^T and dP^T 384 KB (each warp reads
// its 16 keys' K or V rows and half the Q or dO tile), dV and dK 288 KB (P^T or dS^T, and half of
// dO or Q's columns, per warp), dQ 160 KB (dS and K, two column passes), stores ~80 KB: ~0.9 MB,
// i.e. ~355 bytes per mma, against ~310 at D = 128 (~0.79 MB). At 128 bytes per clock per SM that
// is ~7100 clocks per step against ~3800 for the mma at mma.sync's rate (about 2/3 of one
// m16n8k16 per clock per SM): shared memory bounds both kernels, at ~55% of the mma.sync peak.
// Scaling the measured D = 128 speed (246 TFLOP/s, also one block of 8 warps per SM) by the
// traffic ratio predicts ~210 TFLOP/s (counted as 2.5 x the forward's FLOPs), 0.83-0.92x
// FlashAttention-2's 228-254. The deterministic path recomputes S and dP in flash_bwd_dq.cu
// (7 products instead of 5) and should land near 0.7x of that.
//
// Layouts as in flash_fwd.cu: q, dout (B, Hq, Sq, D), k, v, dk, dv (B, Hk, Sk, D), any batch/head/
// row strides, D contiguous; lse, delta float32 (B, Hq, Sq); dq_accum float32 (B, Hq, Sq, head_dim)
// with rows of head_dim, zeroed by the caller. Packed batches, masks and score modifiers as in
// flash_fwd.cu; with a softcap dS picks up the factor 1 - t^2 (attention_common.h). LSE is natural-log; it becomes base 2 on loading.
// Reads q, k, v, dout, lse, delta; writes dk, dv; adds into dq_accum.
//
// Pipeline: Q, dO, LSE and delta tiles are double-buffered; the copies for step i+1 are issued at
// the top of step i and land while it computes.

// ---- compile-time configuration (xattn/kernels.py) ---------------------------------------------
// ELEM_BF16, HEAD_DIM, VEC_LOADS, MIN_BLOCKS and the mask/modifier flags: as in flash_fwd.cu
// BLOCK_N     keys per thread block (NUM_WARPS / DKV_WARPS_D * WARP_N, WARP_N a multiple of 16)
// BLOCK_M     query rows per step
// NUM_WARPS   warps per thread block
// DKV_WARPS_D warps that split the head dim of one key group's dK/dV (1 up to head dim 128;
//             xattn/kernels.py derives it from HEAD_DIM)
// COMPUTE_DQ  1: also accumulate dQ with atomics; 0: dQ comes from flash_bwd_dq

#include "platform.h"
#include "../kernels_common/attention_common.h"

#ifndef DKV_WARPS_D
#error "DKV_WARPS_D: xattn/kernels.py defines it with the tile"
#endif
#define NUM_THREADS (NUM_WARPS * WARP_SIZE)
#define KEY_GROUPS (NUM_WARPS / DKV_WARPS_D)
#define WARP_N (BLOCK_N / KEY_GROUPS)        // keys per key group
#define K_TILES (WARP_N / 16)                // m16 tiles of keys per warp
#define WARP_Q (BLOCK_M / DKV_WARPS_D)       // queries per warp in S^T, dP^T
#define Q_TILES (WARP_Q / 8)                 // n8 tiles of queries in S^T
#define DKV_COLS (HEAD_DIM / DKV_WARPS_D)    // head-dim columns of dK, dV per warp
#define D_TILES (DKV_COLS / 8)
#define DS_STRIDE (BLOCK_M + 8)              // padded row of the P^T and dS^T tiles (keys x queries)
// P^T and dS^T go through shared memory when the head dim is split (always), dS^T alone for dQ.
#define STAGE_P (DKV_WARPS_D > 1)
#define STAGE_DS (STAGE_P || COMPUTE_DQ)

#include "mma_tile.h"

static_assert(WARP_N % 16 == 0 && WARP_Q % 16 == 0 && DKV_COLS % 16 == 0, "whole mma tiles");
static_assert(WARP_N % DKV_WARPS_D == 0, "a key group's warps share its rows in the epilogue");

// dQ = dS K is split over the warps as a DQ_WARPS_M x DQ_WARPS_D grid of (rows x head-dim) tiles.
__host__ __device__ constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }
#define DQ_WARPS_D gcd(NUM_WARPS, HEAD_DIM / 16)
#define DQ_WARPS_M (NUM_WARPS / DQ_WARPS_D)
#define DQ_ROWS (BLOCK_M / DQ_WARPS_M)
#define DQ_COLS (HEAD_DIM / DQ_WARPS_D)
static_assert(DQ_ROWS % 16 == 0, "each warp's dQ rows are whole m16 tiles");
// A warp's dQ tile is accumulated in column passes of at most DQ_PASS_FLOATS accumulator floats
// per thread: every row up to head dim 128 needs one pass; past it the passes leave dK and dV
// their registers.
#define DQ_PASS_FLOATS 32
__host__ __device__ constexpr int dq_pass_cols(int cols) {
    return (DQ_ROWS / 16) * (cols / 8) * 4 <= DQ_PASS_FLOATS || cols % 32 != 0 ? cols : dq_pass_cols(cols / 2);
}
#define DQ_PASS_COLS dq_pass_cols(DQ_COLS)

// ---- shared-memory layout ---------------------------------------------------------------------
// sK [BLOCK_N][SMEM_STRIDE] | sV [BLOCK_N][SMEM_STRIDE] | sQ [2][BLOCK_M][SMEM_STRIDE] |
// sdO [2][BLOCK_M][SMEM_STRIDE] | sdS [BLOCK_N][DS_STRIDE] (STAGE_DS) | sP [BLOCK_N][DS_STRIDE]
// (STAGE_P), 16-bit elements; then sLse [2][BLOCK_M] | sDelta [2][BLOCK_M] floats.
// xattn/kernels.py computes the same size.
// After the last step each warp stages its dK (dV) rows and columns in sK (sV).

// ---- device helpers ---------------------------------------------------------------------------

// Copy one step's query-side tiles: Q and dO rows, the LSE (base 2) and delta. Query rows past the
// end get LSE = +inf, as do rows that saw no key in the forward (LSE = -inf there): either way
// exp2(s - lse) is then 0, so such rows add nothing, with no mask and no NaN.
__device__ __forceinline__ void load_query_step(u16* sQ, u16* sdO, float* sLse, float* sDelta,
                                                const u16* q, i64 q_row_stride, const u16* dout,
                                                i64 dout_row_stride, const float* lse, const float* delta,
                                                int valid_rows, int head_dim, int tid) {
    load_tile<BLOCK_M>(sQ, q, q_row_stride, valid_rows, head_dim, tid);
    load_tile<BLOCK_M>(sdO, dout, dout_row_stride, valid_rows, head_dim, tid);
    for (int r = tid; r < BLOCK_M; r += NUM_THREADS) {
        sLse[r] = backward_lse2(lse, r, valid_rows);
        sDelta[r] = r < valid_rows ? delta[r] : 0.f;
    }
}

// Raw dot products -> scores (softcap, ALiBi, band mask where check_mask), as the forward saw them;
// rows of S^T are keys, columns queries.
__device__ __forceinline__ void modify_scores_t(float (&acc_s)[K_TILES][Q_TILES][4], int key_start,
                                                int m_start, const ScoreMods& mods, bool check_mask,
                                                int lane) {
#pragma unroll
    for (int kt = 0; kt < K_TILES; ++kt)
#pragma unroll
        for (int qt = 0; qt < Q_TILES; ++qt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int key = key_start + kt * 16 + lane / 4 + (e / 2) * 8;
                int query = m_start + qt * 8 + (lane % 4) * 2 + e % 2;
                acc_s[kt][qt][e] = modified_score(acc_s[kt][qt][e], query, key, mods, check_mask);
            }
}

// P^T = exp2(S^T * scale_log2 - lse_log2[query]) and dS^T = P^T * (dP^T - delta[query]), in place
// (times 1 - t^2 under a softcap, t being the value S^T holds).
__device__ __forceinline__ void softmax_backward_t(float (&acc_s)[K_TILES][Q_TILES][4],
                                                   float (&acc_dp)[K_TILES][Q_TILES][4],
                                                   const float* sLse, const float* sDelta,
                                                   float scale_log2, int lane) {
#pragma unroll
    for (int qt = 0; qt < Q_TILES; ++qt) {
        int col = qt * 8 + (lane % 4) * 2;
        float2 lse2 = *(const float2*)(sLse + col);
        float2 delta2 = *(const float2*)(sDelta + col);
#pragma unroll
        for (int kt = 0; kt < K_TILES; ++kt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float t = acc_s[kt][qt][e];
                float p = fast_exp2(t * scale_log2 - (e % 2 ? lse2.y : lse2.x));
                acc_s[kt][qt][e] = p;
                float ds = p * (acc_dp[kt][qt][e] - (e % 2 ? delta2.y : delta2.x));
                acc_dp[kt][qt][e] = HAS_SOFTCAP ? ds * softcap_grad(t) : ds;
            }
    }
}

// Accumulator tiles -> A-operand fragments over the query dimension (pack_a_fragment).
__device__ __forceinline__ void pack_t(u32 (&frag)[K_TILES][BLOCK_M / 16][4],
                                      const float (&acc)[K_TILES][Q_TILES][4]) {
#pragma unroll
    for (int kt = 0; kt < K_TILES; ++kt)
#pragma unroll
        for (int kk = 0; kk < BLOCK_M / 16; ++kk) pack_a_fragment(frag[kt][kk], acc[kt][2 * kk], acc[kt][2 * kk + 1]);
}

// dq_accum[rows, cols] += dS K for this warp's tile of the step's queries (float32 atomics).
// The adds are predicated on the row and column being inside the sequence and the head dim: at
// D256 a branch around each pair (BSSY/BSYNC, its own address arithmetic) was part of the fifth
// of the main loop's instructions that is integer and branch work (ncu, ci/results/2026-11-30-session5/).
__device__ __forceinline__ void accumulate_dq(float* dq_accum, u32 ds_lane, u32 k_lane, int m_start,
                                              int row0, int col0, int seqlen_q, int head_dim,
                                              int lane) {
    const int row_base = m_start + row0 + lane / 4, col_base = col0 + (lane % 4) * 2;
#pragma unroll
    for (int pass_col = 0; pass_col < DQ_COLS; pass_col += DQ_PASS_COLS) {
        float acc_dq[DQ_ROWS / 16][DQ_PASS_COLS / 8][4];
        zero(acc_dq);
        mma_at_b<DQ_ROWS / 16, DQ_PASS_COLS / 8, BLOCK_N / 16, DS_STRIDE, SMEM_STRIDE>(
            acc_dq, ds_lane, k_lane + tile_offset<SMEM_STRIDE>(0, pass_col));
        // Each thread holds column pairs (2t, 2t+1). With VEC_LOADS the head dim is a multiple of
        // 8, so a pair is 8-byte aligned and inside the row: one atomic instruction adds both.
#pragma unroll
        for (int mt = 0; mt < DQ_ROWS / 16; ++mt)
#pragma unroll
            for (int nt = 0; nt < DQ_PASS_COLS / 8; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int rows = mt * 16 + h * 8, cols = pass_col + nt * 8;
                    const bool inside = row_base + rows < seqlen_q && col_base + cols < head_dim;
                    float* p = dq_accum + (i64)(row_base + rows) * head_dim + col_base + cols;
#if VEC_LOADS
                    atomic_add_pair_if(inside, p, acc_dq[mt][nt][2 * h], acc_dq[mt][nt][2 * h + 1]);
#else
                    if (!inside) continue;
                    atomicAdd(p, acc_dq[mt][nt][2 * h]);
                    if (col_base + cols + 1 < head_dim) atomicAdd(p + 1, acc_dq[mt][nt][2 * h + 1]);
#endif
                }
    }
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_bwd_dkdv(AttnParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const u16, q, p.q);
    TENSOR_FROM_PARAMS(const u16, k, p.k);
    TENSOR_FROM_PARAMS(const u16, v, p.v);
    TENSOR_FROM_PARAMS(const u16, dout, p.dout);
    TENSOR_FROM_PARAMS(const float, lse, p.lse);
    TENSOR_FROM_PARAMS(const float, delta, p.delta);
    TENSOR_FROM_PARAMS(float, dq_accum, p.dq_accum);
    TENSOR_FROM_PARAMS(u16, dk, p.dk);
    TENSOR_FROM_PARAMS(u16, dv, p.dv);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    // scale, scale_log2: the scores' scale as in flash_fwd.cu; grad_scale: the attention scale,
    // d(scale * x)/dx, applied to dK here and to dQ by flash_bwd_convert_dq.
    extern __shared__ __align__(16) u16 smem[];
    u16* sK = smem;
    u16* sV = sK + BLOCK_N * SMEM_STRIDE;
    u16* sQ = sV + BLOCK_N * SMEM_STRIDE;            // [2][BLOCK_M][SMEM_STRIDE]
    u16* sdO = sQ + 2 * BLOCK_M * SMEM_STRIDE;       // [2][BLOCK_M][SMEM_STRIDE]
    u16* sdS = sdO + 2 * BLOCK_M * SMEM_STRIDE;      // [BLOCK_N][DS_STRIDE]
    u16* sP = sdS + (STAGE_DS ? BLOCK_N * DS_STRIDE : 0);                  // [BLOCK_N][DS_STRIDE]
    float* sLse = (float*)(sP + (STAGE_P ? BLOCK_N * DS_STRIDE : 0));      // [2][BLOCK_M]
    float* sDelta = sLse + 2 * BLOCK_M;                                     // [2][BLOCK_M]

    const int n_block = blockIdx.x, kv_head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    // Warp = key group x head-dim slice: its keys, its queries in S^T, its columns of dK and dV.
    const int key_group = warp / DKV_WARPS_D, d_slice = warp % DKV_WARPS_D;
    const int warp_q0 = d_slice * WARP_Q, dkv_col0 = d_slice * DKV_COLS;
    const int n_start = n_block * BLOCK_N;
    const int warp_key_start = n_start + key_group * WARP_N;

    const Sequence seq = sequence(batch, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k);
    if (IS_VARLEN && n_start >= seq.seqlen_k) return;  // the grid covers the longest sequence
    seqlen_q = seq.seqlen_q;
    seqlen_k = seq.seqlen_k;
    ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, window_left, window_right, softcap_scale,
                                     alibi_slopes + batch * alibi_batch_stride + kv_head * heads_per_kv, scale);

    k += batch * k_batch_stride + kv_head * k_head_stride + (i64)(seq.k_start + n_start) * k_row_stride;
    v += batch * v_batch_stride + kv_head * v_head_stride + (i64)(seq.k_start + n_start) * v_row_stride;
    q += (i64)seq.q_start * q_row_stride;
    dout += (i64)seq.q_start * dout_row_stride;
    lse += seq.q_start;
    delta += seq.q_start;

    // The query blocks that see any key of this block: the band of its first key starts them, the
    // band of its last key ends them.
    const int last_key = min(n_start + BLOCK_N, seqlen_k) - 1;
    const int first_query = IS_CAUSAL ? max(0, first_visible_query(n_start, mods.band)) : 0;
    const int last_query = IS_LOCAL ? min(seqlen_q - 1, last_visible_query(last_key, mods.band)) : seqlen_q - 1;
    const int m_begin = first_query / BLOCK_M, m_end = last_query < first_query ? m_begin : last_query / BLOCK_M + 1;
    const int steps_per_head = max(0, m_end - m_begin);
    const int steps = steps_per_head * heads_per_kv;

    // Step s covers query block m_begin + s % steps_per_head of query head (group start + s / steps_per_head).
    auto step_head = [&](int s) { return kv_head * heads_per_kv + s / steps_per_head; };
    auto step_m_start = [&](int s) { return (m_begin + s % steps_per_head) * BLOCK_M; };
    auto issue_step = [&](int s, int buf) {
        int head = step_head(s), m_start = step_m_start(s);
        i64 q_off = batch * q_batch_stride + head * q_head_stride + m_start * q_row_stride;
        i64 do_off = batch * dout_batch_stride + head * dout_head_stride + m_start * dout_row_stride;
        i64 row_off = m_start;
        load_query_step(sQ + buf * BLOCK_M * SMEM_STRIDE, sdO + buf * BLOCK_M * SMEM_STRIDE,
                        sLse + buf * BLOCK_M, sDelta + buf * BLOCK_M, q + q_off, q_row_stride,
                        dout + do_off, dout_row_stride,
                        lse + batch * lse_batch_stride + head * lse_head_stride + row_off,
                        delta + batch * delta_batch_stride + head * delta_head_stride + row_off,
                        seqlen_q - m_start, head_dim, tid);
    };

    // Prologue: this block's K and V tiles and the first query step.
    load_tile<BLOCK_N>(sK, k, k_row_stride, seqlen_k - n_start, head_dim, tid);
    load_tile<BLOCK_N>(sV, v, v_row_stride, seqlen_k - n_start, head_dim, tid);
    if (steps > 0) issue_step(0, 0);
    cp_async_commit();

    // ldmatrix lane addresses (mma_tile.h). K and V are A operands of S^T = K Q^T and
    // dP^T = V dO^T; Q and dO rows are B^T there, and row-major B of dK += dS^T Q, dV += P^T dO.
    const u32 k_lane = lane_address_x<SMEM_STRIDE>(smem_addr(sK), key_group * WARP_N, 0, lane);
    const u32 v_lane = lane_address_x<SMEM_STRIDE>(smem_addr(sV), key_group * WARP_N, 0, lane);
    const u32 q_lane_y = lane_address_y<SMEM_STRIDE>(smem_addr(sQ), warp_q0, 0, lane);
    const u32 do_lane_y = lane_address_y<SMEM_STRIDE>(smem_addr(sdO), warp_q0, 0, lane);
    const u32 q_lane_x = lane_address_x<SMEM_STRIDE>(smem_addr(sQ), 0, dkv_col0, lane);
    const u32 do_lane_x = lane_address_x<SMEM_STRIDE>(smem_addr(sdO), 0, dkv_col0, lane);
    // P^T and dS^T of the key group, staged: A operands (rows = keys) of dV += P^T dO, dK += dS^T Q.
    const u32 p_lane = lane_address_x<DS_STRIDE>(smem_addr(sP), key_group * WARP_N, 0, lane);
    const u32 ds_lane_x = lane_address_x<DS_STRIDE>(smem_addr(sdS), key_group * WARP_N, 0, lane);
    const u32 buffer_bytes = tile_offset<SMEM_STRIDE>(BLOCK_M, 0);
    // dQ = dS K: this warp's (rows x head-dim) tile; dS^T rows are keys, so dS is read transposed.
    const int dq_row0 = (warp / DQ_WARPS_D) * DQ_ROWS, dq_col0 = (warp % DQ_WARPS_D) * DQ_COLS;
    const u32 ds_lane = lane_address_y<DS_STRIDE>(smem_addr(sdS), 0, dq_row0, lane);
    const u32 k_lane_dq = lane_address_x<SMEM_STRIDE>(smem_addr(sK), 0, dq_col0, lane);

    float acc_dk[K_TILES][D_TILES][4], acc_dv[K_TILES][D_TILES][4];
    zero(acc_dk);
    zero(acc_dv);

    for (int s = 0; s < steps; ++s) {
        const int buf = s % 2, head = step_head(s), m_start = step_m_start(s);
        cp_async_wait<0>();
        // This step's tiles are visible to every warp; every warp is done with the other buffer
        // and with sdS (and sP) of the previous step.
        __syncthreads();
        if (s + 1 < steps) issue_step(s + 1, 1 - buf);
        cp_async_commit();
        const float* sLse_s = sLse + buf * BLOCK_M + warp_q0;
        const float* sDelta_s = sDelta + buf * BLOCK_M + warp_q0;
        if (HAS_ALIBI) mods.alibi_coef = -alibi_slopes[batch * alibi_batch_stride + head] / scale;

        // A warp whose keys no query of this step sees (past the causal diagonal, or past the end
        // of the keys) has P = dS = 0: it skips the products and leaves zeros for dQ.
        const bool warp_sees_step = warp_key_start < seqlen_k &&
            (!IS_CAUSAL || warp_key_start <= m_start + BLOCK_M - 1 + mods.band.hi) &&
            (!IS_LOCAL || warp_key_start + WARP_N - 1 >= m_start + mods.band.lo);
        float acc_dp[K_TILES][Q_TILES][4];  // dP^T, then dS^T
        float acc_s[K_TILES][Q_TILES][4];   // S^T, then P^T
        zero(acc_dp);
        if (STAGE_P) zero(acc_s);  // staged as it is: zeros where the warp skips the step
        if (warp_sees_step) {
            // S^T = K Q^T and dP^T = V dO^T for this warp's keys and queries.
            if (!STAGE_P) zero(acc_s);
            mma_a_bt<K_TILES, Q_TILES, HEAD_DIM / 16, SMEM_STRIDE, SMEM_STRIDE>(acc_s, k_lane, q_lane_y + buf * buffer_bytes);
            // Rows of S^T are keys: the tile of keys [warp_key_start, +WARP_N) against queries
            // [m_start, +BLOCK_M) crosses an edge when some pair is outside the band.
            bool needs_mask = warp_key_start + WARP_N > seqlen_k ||
                              (IS_CAUSAL && warp_key_start + WARP_N - 1 > m_start + mods.band.hi) ||
                              (IS_LOCAL && warp_key_start < m_start + BLOCK_M - 1 + mods.band.lo);
            if (HAS_SOFTCAP || HAS_ALIBI || needs_mask)
                modify_scores_t(acc_s, warp_key_start, m_start + warp_q0, mods, needs_mask, lane);
            mma_a_bt<K_TILES, Q_TILES, HEAD_DIM / 16, SMEM_STRIDE, SMEM_STRIDE>(acc_dp, v_lane, do_lane_y + buf * buffer_bytes);
            softmax_backward_t(acc_s, acc_dp, sLse_s, sDelta_s, scale_log2, lane);  // acc_s: P^T, acc_dp: dS^T

#if !STAGE_P
            // dV += P^T dO, dK += dS^T Q (scale applied once, at the end).
            u32 frag[K_TILES][BLOCK_M / 16][4];
            pack_t(frag, acc_s);
            mma_areg_b<K_TILES, D_TILES, BLOCK_M / 16, SMEM_STRIDE>(acc_dv, frag, do_lane_x + buf * buffer_bytes);
            pack_t(frag, acc_dp);
            mma_areg_b<K_TILES, D_TILES, BLOCK_M / 16, SMEM_STRIDE>(acc_dk, frag, q_lane_x + buf * buffer_bytes);
#endif
        }

#if STAGE_DS
        // dS^T (and P^T) of this warp's keys and queries into shared memory: dQ += dS K needs every
        // key's dS, and with a split head dim each warp of the key group needs all of its queries'.
#pragma unroll
        for (int kt = 0; kt < K_TILES; ++kt)
#pragma unroll
            for (int qt = 0; qt < Q_TILES; ++qt) {
                const int row = key_group * WARP_N + kt * 16, col = warp_q0 + qt * 8;
                store_c_fragment<DS_STRIDE>(sdS, row, col, acc_dp[kt][qt], 1.f, lane);
                if (STAGE_P) store_c_fragment<DS_STRIDE>(sP, row, col, acc_s[kt][qt], 1.f, lane);
            }
        __syncthreads();  // sdS (and sP) complete
#endif
#if STAGE_P
        // dV += P^T dO, dK += dS^T Q for this warp's columns (scale applied once, at the end).
        if (warp_sees_step) {
            mma_a_b<K_TILES, D_TILES, BLOCK_M / 16, DS_STRIDE, SMEM_STRIDE>(acc_dv, p_lane, do_lane_x + buf * buffer_bytes);
            mma_a_b<K_TILES, D_TILES, BLOCK_M / 16, DS_STRIDE, SMEM_STRIDE>(acc_dk, ds_lane_x, q_lane_x + buf * buffer_bytes);
        }
#endif

#if COMPUTE_DQ
        // dQ += dS K from the staged dS^T.
        accumulate_dq(dq_accum + batch * dq_accum_batch_stride + head * dq_accum_head_stride + (i64)seq.q_start * head_dim,
                      ds_lane, k_lane_dq,
                      m_start, dq_row0, dq_col0, seqlen_q, head_dim, lane);
#endif
    }

    // Epilogue: each warp stages its dK (scaled) and dV columns of its key group's rows in sK and
    // sV, then copies out its share of those rows. Other warps may still read sK in their last dQ
    // product: wait for them.
    cp_async_wait<0>();
    __syncthreads();
    u16* sdK = sK + key_group * WARP_N * SMEM_STRIDE;
    u16* sdV = sV + key_group * WARP_N * SMEM_STRIDE;
#pragma unroll
    for (int kt = 0; kt < K_TILES; ++kt)
#pragma unroll
        for (int dt = 0; dt < D_TILES; ++dt) {
            store_c_fragment<SMEM_STRIDE>(sdK, kt * 16, dkv_col0 + dt * 8, acc_dk[kt][dt], grad_scale, lane);
            store_c_fragment<SMEM_STRIDE>(sdV, kt * 16, dkv_col0 + dt * 8, acc_dv[kt][dt], 1.f, lane);
        }
    // The rows are complete once every warp of the key group has staged its columns.
    if (DKV_WARPS_D > 1) __syncthreads();
    else wave_barrier();
    constexpr int OUT_ROWS = WARP_N / DKV_WARPS_D;  // rows this warp copies out
    const int out_row0 = d_slice * OUT_ROWS, out_key_start = warp_key_start + out_row0;
    dk += batch * dk_batch_stride + kv_head * dk_head_stride + (i64)(seq.k_start + out_key_start) * dk_row_stride;
    dv += batch * dv_batch_stride + kv_head * dv_head_stride + (i64)(seq.k_start + out_key_start) * dv_row_stride;
    store_rows<OUT_ROWS>(dk, dk_row_stride, sdK + out_row0 * SMEM_STRIDE, seqlen_k - out_key_start, head_dim, lane);
    store_rows<OUT_ROWS>(dv, dv_row_stride, sdV + out_row0 * SMEM_STRIDE, seqlen_k - out_key_start, head_dim, lane);
}
