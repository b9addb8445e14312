// FlashAttention-2 backward, dQ alone, query-block parallel and deterministic: fp16 or bf16 in,
// fp32 accumulate. Used with flash_bwd_dkdv compiled with COMPUTE_DQ = 0 when the caller asks for
// bitwise-reproducible gradients: every dQ element is summed in one thread, in one fixed order,
// instead of by atomics from many thread blocks.
//
//   P = exp2(S * scale_log2 - lse_log2) with S = Q K^T,   dP = dO V^T,
//   dS = P * (dP - delta),   dQ = scale * dS K
//
// Grid: x = query block, y = query head, z = batch. Warps own query rows as in flash_fwd.cu, so P,
// dS and dQ stay in registers (dS is the A operand of dS K as it comes out of the mma). K and V
// tiles are double-buffered: the next pair is copied while this one is used.
//
// Layouts as in flash_bwd_dkdv.cu. Reads q, k, v, dout, lse, delta; writes dq.
//
// compile time: ELEM_BF16, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, VEC_LOADS, MIN_BLOCKS and the
// mask/modifier flags (attention_common.h); parameters as in flash_bwd_dkdv.cu.

#include "platform.h"
#include "../kernels_common/attention_common.h"

#define NUM_THREADS (NUM_WARPS * WARP_SIZE)
#define WARP_M (BLOCK_M / NUM_WARPS)
#define M_TILES (WARP_M / 16)
#define N_TILES (BLOCK_N / 8)
#define D_TILES (HEAD_DIM / 8)

#include "mma_tile.h"

static_assert(WARP_M % 16 == 0 && BLOCK_N % 16 == 0 && HEAD_DIM % 16 == 0, "whole mma tiles");

// ---- shared-memory layout ---------------------------------------------------------------------
// sQ [BLOCK_M][SMEM_STRIDE] | sdO [BLOCK_M][SMEM_STRIDE] | sK [2][BLOCK_N][SMEM_STRIDE] |
// sV [2][BLOCK_N][SMEM_STRIDE], 16-bit elements (xattn/kernels.py computes the same size).
// Each warp stages its dQ rows in its own rows of sQ at the end.

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_bwd_dq(AttnParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const u16, q, p.q);
    TENSOR_FROM_PARAMS(const u16, k, p.k);
    TENSOR_FROM_PARAMS(const u16, v, p.v);
    TENSOR_FROM_PARAMS(const u16, dout, p.dout);
    TENSOR_FROM_PARAMS(const float, lse, p.lse);
    TENSOR_FROM_PARAMS(const float, delta, p.delta);
    TENSOR_FROM_PARAMS(u16, dq, p.dq);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    extern __shared__ __align__(16) u16 smem[];
    u16* sQ = smem;
    u16* sdO = sQ + BLOCK_M * SMEM_STRIDE;
    u16* sK = sdO + BLOCK_M * SMEM_STRIDE;  // [2][BLOCK_N][SMEM_STRIDE]
    u16* sV = sK + 2 * BLOCK_N * SMEM_STRIDE;  // [2][BLOCK_N][SMEM_STRIDE]

    const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal blocks first
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / heads_per_kv;
    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int m_start = m_block * BLOCK_M;
    const int warp_row_start = m_start + warp * WARP_M;

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
    lse += batch * lse_batch_stride + head * lse_head_stride + seq.q_start;
    delta += batch * delta_batch_stride + head * delta_head_stride + seq.q_start;

    const KeyRange tiles = key_tiles(m_start, min(BLOCK_M, seqlen_q - m_start), BLOCK_N, seqlen_k, mods.band);
    auto issue_kv = [&](int tile) {
        int n_start = tile * BLOCK_N, buf = tile % 2;
        load_tile<BLOCK_N>(sK + buf * BLOCK_N * SMEM_STRIDE, k + n_start * k_row_stride, k_row_stride,
                           seqlen_k - n_start, head_dim, tid);
        load_tile<BLOCK_N>(sV + buf * BLOCK_N * SMEM_STRIDE, v + n_start * v_row_stride, v_row_stride,
                           seqlen_k - n_start, head_dim, tid);
    };
    load_tile<BLOCK_M>(sQ, q, q_row_stride, seqlen_q - m_start, head_dim, tid);
    load_tile<BLOCK_M>(sdO, dout, dout_row_stride, seqlen_q - m_start, head_dim, tid);
    if (tiles.tile_end > tiles.tile_begin) issue_kv(tiles.tile_end - 1);
    cp_async_commit();

    // Per-row LSE (base 2; +inf for rows past the end or rows that saw no key, so P = 0 there)
    // and delta, for the two rows each thread holds per m16 tile.
    float lse_log2[M_TILES][2], row_delta[M_TILES][2];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int row = warp_row_start + mt * 16 + lane / 4 + h * 8;
            lse_log2[mt][h] = backward_lse2(lse, row, seqlen_q);
            row_delta[mt][h] = row < seqlen_q ? delta[row] : 0.f;
        }

    // ldmatrix lane addresses (mma_tile.h): Q and dO are A operands of S = Q K^T and dP = dO V^T,
    // the rows of K and V are B^T there, and K is the row-major B of dQ += dS K.
    const u32 q_lane = lane_address_x<SMEM_STRIDE>(smem_addr(sQ), warp * WARP_M, 0, lane);
    const u32 do_lane = lane_address_x<SMEM_STRIDE>(smem_addr(sdO), warp * WARP_M, 0, lane);
    const u32 k_lane_y = lane_address_y<SMEM_STRIDE>(smem_addr(sK), 0, 0, lane);
    const u32 v_lane_y = lane_address_y<SMEM_STRIDE>(smem_addr(sV), 0, 0, lane);
    const u32 k_lane_x = lane_address_x<SMEM_STRIDE>(smem_addr(sK), 0, 0, lane);
    const u32 buffer_bytes = tile_offset<SMEM_STRIDE>(BLOCK_N, 0);

    float acc_dq[M_TILES][D_TILES][4];
    zero(acc_dq);

    for (int tile = tiles.tile_end - 1; tile >= tiles.tile_begin; --tile) {
        const int n_start = tile * BLOCK_N;
        const u32 buf_off = (tile % 2) * buffer_bytes;
        cp_async_wait<0>();
        // This K/V pair is visible to every warp; every warp is done with the other buffers.
        __syncthreads();
        if (tile > tiles.tile_begin) issue_kv(tile - 1);
        cp_async_commit();

        float acc_s[M_TILES][N_TILES][4], acc_dp[M_TILES][N_TILES][4];
        zero(acc_s);
        zero(acc_dp);
        mma_a_bt<M_TILES, N_TILES, HEAD_DIM / 16, SMEM_STRIDE, SMEM_STRIDE>(acc_s, q_lane, k_lane_y + buf_off);
        mma_a_bt<M_TILES, N_TILES, HEAD_DIM / 16, SMEM_STRIDE, SMEM_STRIDE>(acc_dp, do_lane, v_lane_y + buf_off);
        const bool needs_mask = tile_needs_mask(warp_row_start, WARP_M, n_start, BLOCK_N, seqlen_k, mods.band);

        // dS = P * (dP - delta), P recomputed from the LSE and the scores as the forward modified
        // them (masked pairs get P = 0); under a softcap dS also takes the factor 1 - t^2.
        u32 ds_frag[M_TILES][BLOCK_N / 16][4];
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float s = acc_s[mt][nt][e];
                    if (HAS_SOFTCAP || HAS_ALIBI || needs_mask) {
                        int row = warp_row_start + mt * 16 + lane / 4 + (e / 2) * 8;
                        int key = n_start + nt * 8 + (lane % 4) * 2 + e % 2;
                        s = modified_score(s, row, key, mods, needs_mask);
                    }
                    float p = fast_exp2(s * scale_log2 - lse_log2[mt][e / 2]);
                    float ds = p * (acc_dp[mt][nt][e] - row_delta[mt][e / 2]);
                    acc_s[mt][nt][e] = HAS_SOFTCAP ? ds * softcap_grad(s) : ds;
                }
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; ++kk)
                pack_a_fragment(ds_frag[mt][kk], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
        }
        mma_areg_b<M_TILES, D_TILES, BLOCK_N / 16, SMEM_STRIDE>(acc_dq, ds_frag, k_lane_x + buf_off);  // dQ += dS K
    }

    // Epilogue: dQ = scale * acc, staged in this warp's own rows of sQ (no other warp reads them).
    cp_async_wait<0>();
    __syncthreads();
    u16* sdQ = sQ + warp * WARP_M * SMEM_STRIDE;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int dt = 0; dt < D_TILES; ++dt) store_c_fragment<SMEM_STRIDE>(sdQ, mt * 16, dt * 8, acc_dq[mt][dt], grad_scale, lane);
    wave_barrier();
    dq += batch * dq_batch_stride + head * dq_head_stride + (i64)(seq.q_start + warp_row_start) * dq_row_stride;
    store_rows<WARP_M>(dq, dq_row_stride, sdQ, seqlen_q - warp_row_start, head_dim, lane);
}
