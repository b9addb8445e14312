// FlashAttention-2 backward on CDNA matrix cores, query-block parallel: dQ. fp16 or bf16 in, fp32
// accumulate, wave64. The math is in backward.h; dK and dV come from flash_bwd_mfma_dkdv.hip. Each
// dQ row is summed by one lane pair in a fixed order: no atomics, the same bits on every run.
//
// Shaped like flash_fwd_mfma.hip. Grid: x = query block (reversed, so the heaviest causal blocks
// start first), y = query head, z = batch. Wave w owns queries [w * 32, w * 32 + 32) of the block
// and keeps their Q and dO fragments in registers; K and V tiles stream through LDS.
//
// Products (mfma.h; the lane's accumulator column is always one of the wave's queries):
//   S^T  = K Q^T       A: K tile [key][dim] in LDS       B: Q^T fragments in registers
//   dP^T = V dO^T      A: V tile [key][dim] in LDS       B: dO^T fragments in registers
//   dQ^T += K^T dS^T   A: K^T tile [dim][key] in LDS     B: dS^T, the accumulator of dP^T
// The lse and delta of the lane's query are one register each.
//
// Layouts as in flash_bwd_mfma_dkdv.hip; dq is (B, Hq, Sq, D) like q. Reads q, k, v, dout, lse,
// delta; writes dq. Masks, score modifiers and packed batches as in flash_fwd_mfma.hip.

// ---- compile-time configuration (set with -D by xattn/kernels.py) ------------------------------
// ELEM_BF16   1: bfloat16, 0: float16 (ELEM_TYPE, for platform.h, is the same choice)
// HEAD_DIM    padded head dim (multiple of 32);  BLOCK_N  keys per tile (multiple of 32)
// NUM_WAVES   waves per block, BLOCK_M = 32 * NUM_WAVES queries per block
// VEC_LOADS   as in matrix_tile.h;  WAVE_SIZE  64 (MFMA), 32 (WMMA)
// FRAGS_IN_LDS 1: the Q and dO tiles stay in LDS and their fragments are read at each use
// IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN: masks and modifiers (attention_common.h)
// Run time: one AttnParams by value (kernels_common/params.h), as in flash_bwd_portable.hip.

#define NUM_THREADS (NUM_WAVES * WAVE_SIZE)

#include "matrix_tile.h"
#include "../kernels_common/attention_common.h"
#include "../kernels_common/backward.h"

#define BLOCK_M (NUM_WAVES * MATRIX_N)
#define KEY_BLOCKS (BLOCK_N / MATRIX_M)   // MATRIX_M-key blocks of S^T and dP^T
#define DIM_BLOCKS (HEAD_DIM / MATRIX_M)  // MATRIX_M-dim blocks of dQ^T
#define DIM_STEPS (HEAD_DIM / MATRIX_K)   // k steps of S^T and dP^T
#define KEY_STEPS (BLOCK_N / MATRIX_K)    // k steps of dQ^T
#define ROW_STRIDE (HEAD_DIM + PAD)     // sK, sV, and the Q, dO staging: [row][dim]
#define T_STRIDE (BLOCK_N + PAD)        // sKt: [dim][key]

static_assert(WAVE_SIZE == MATRIX_WAVE, "the matrix instructions' wave size");
static_assert(HEAD_DIM % MATRIX_M == 0 && BLOCK_N % MATRIX_M == 0, "whole matrix blocks");

// ---- LDS layout ---------------------------------------------------------------------------------
// sK [BLOCK_N][ROW_STRIDE] | sV [BLOCK_N][ROW_STRIDE] | sKt [HEAD_DIM][T_STRIDE], 16-bit. Before the
// loop the front of it stages Q, then dO, [BLOCK_M][ROW_STRIDE], on their way into registers; with
// FRAGS_IN_LDS sQ and sdO follow sKt and stay for the whole loop.
// xattn/kernels.py (the kernel's shared_memory) computes the same size.

// ---- device helpers ---------------------------------------------------------------------------

// S^T becomes P^T and dP^T becomes dS^T, in place (backward.h), for this lane's query (lse2,
// delta: its row's). Element j of block nb is key n_start + acc_row(lane, nb, j). masked: the tile
// crosses the end of the keys or an edge of the band of one of the wave's queries.
__device__ __forceinline__ void softmax_backward_tile(acc_t (&acc_s)[KEY_BLOCKS], acc_t (&acc_dp)[KEY_BLOCKS],
                                                      float lse2, float delta, int query, int n_start,
                                                      const ScoreMods& mods, bool masked, float scale_log2,
                                                      int lane) {
#pragma unroll
    for (int nb = 0; nb < KEY_BLOCKS; ++nb)
#pragma unroll
        for (int j = 0; j < ACC_ELEMS; ++j) {
            const float2 pds = softmax_backward(acc_s[nb][j], acc_dp[nb][j], query, n_start + acc_row(lane, nb, j),
                                                mods, masked, lse2, delta, scale_log2);
            acc_s[nb][j] = pds.x;
            acc_dp[nb][j] = pds.y;
        }
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
MATRIX_KERNEL(flash_bwd, _dq)(const AttnParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const u16, q, p.q);
    TENSOR_FROM_PARAMS(const u16, k, p.k);
    TENSOR_FROM_PARAMS(const u16, v, p.v);
    TENSOR_FROM_PARAMS(const u16, dout, p.dout);
    TENSOR_FROM_PARAMS(const float, lse, p.lse);
    TENSOR_FROM_PARAMS(const float, delta, p.delta);
    TENSOR_FROM_PARAMS(u16, dq, p.dq);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    extern __shared__ __attribute__((aligned(16))) u16 smem[];
    u16* sStage = smem;  // Q, then dO, before the loop
    u16* sK = smem;
    u16* sV = sK + BLOCK_N * ROW_STRIDE;
    u16* sKt = sV + BLOCK_N * ROW_STRIDE;
    u16* sQ = FRAGS_IN_LDS ? sKt + HEAD_DIM * T_STRIDE : sStage;
    u16* sdO = FRAGS_IN_LDS ? sQ + BLOCK_M * ROW_STRIDE : sStage;

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / heads_per_kv;
    const int tid = threadIdx.x, wave = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int m_start = m_block * BLOCK_M;
    const int wave_row_start = m_start + wave * MATRIX_N;
    const int query = wave_row_start + acc_col(lane);  // this lane's query: its column of every product

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

    // Prologue: Q, then dO, through LDS into registers (or left in LDS), where they stay for the
    // whole loop.
    FixedFrags<DIM_STEPS, ROW_STRIDE> q_frag, do_frag;
    load_tile<BLOCK_M, ROW_STRIDE, 0>(sQ, nullptr, q, q_row_stride, seqlen_q - m_start, head_dim, tid);
    __syncthreads();  // the Q tile is complete
    q_frag.load(sQ, wave * MATRIX_N, lane);
    __syncthreads();  // every wave has its Q fragments: the staging memory takes dO (FRAGS_IN_LDS:
                      // sdO is a tile of its own, and this barrier is redundant)
    load_tile<BLOCK_M, ROW_STRIDE, 0>(sdO, nullptr, dout, dout_row_stride, seqlen_q - m_start, head_dim, tid);
    __syncthreads();  // the dO tile is complete
    do_frag.load(sdO, wave * MATRIX_N, lane);
    const float lse2 = backward_lse2(lse, query, seqlen_q);
    const float row_delta = query < seqlen_q ? delta[query] : 0.f;

    acc_t acc_dq[DIM_BLOCKS];
#pragma unroll
    for (int db = 0; db < DIM_BLOCKS; ++db) acc_dq[db] = acc_t{};

    // The key tiles the block's rows see, and the ones this wave's rows see (with a band: fewer).
    const int block_rows = min(BLOCK_M, seqlen_q - m_start);
    const KeyRange tiles = key_tiles(m_start, block_rows, BLOCK_N, seqlen_k, mods.band);
    const int wave_rows = max(1, min(MATRIX_N, seqlen_q - wave_row_start));
    const KeyRange wave_tiles = key_tiles(wave_row_start, wave_rows, BLOCK_N, seqlen_k, mods.band);

    for (int tile = tiles.tile_end - 1; tile >= tiles.tile_begin; --tile) {
        const int n_start = tile * BLOCK_N;
        __syncthreads();  // every wave is done with the previous K, V, K^T tiles (and the staging)
        load_tile<BLOCK_N, ROW_STRIDE, T_STRIDE>(sK, sKt, k + n_start * k_row_stride, k_row_stride, seqlen_k - n_start, head_dim, tid);
        load_tile<BLOCK_N, ROW_STRIDE, 0>(sV, nullptr, v + n_start * v_row_stride, v_row_stride, seqlen_k - n_start, head_dim, tid);
        __syncthreads();  // the tiles are visible to every wave
        // Rows past the end of this wave's block see nothing; a wave whose queries see none of the
        // tile's keys skips the arithmetic (it still takes part in the loads and barriers).
        if (wave_row_start >= seqlen_q || tile >= wave_tiles.tile_end || tile < wave_tiles.tile_begin) continue;

        acc_t acc_s[KEY_BLOCKS], acc_dp[KEY_BLOCKS];
        tile_times_frags<KEY_BLOCKS, DIM_STEPS, ROW_STRIDE>(acc_s, sK, q_frag, lane);    // S^T = K Q^T
        tile_times_frags<KEY_BLOCKS, DIM_STEPS, ROW_STRIDE>(acc_dp, sV, do_frag, lane);  // dP^T = V dO^T
        const bool masked = tile_needs_mask(wave_row_start, MATRIX_N, n_start, BLOCK_N, seqlen_k, mods.band);
        softmax_backward_tile(acc_s, acc_dp, lse2, row_delta, query, n_start, mods, masked, scale_log2, lane);
        tile_times_acc<DIM_BLOCKS, KEY_STEPS, T_STRIDE>(acc_dq, sKt, acc_dp, lane);  // dQ^T += K^T dS^T
    }

    // Epilogue: dQ = grad_scale * acc_dq through the staging tile (acc_to_lds, store_tile: coalesced
    // rows); rows that see no key write zeros. Lanes l and l ^ MATRIX_N hold the same query's other dims.
    __syncthreads();  // every wave is done with the last K, V, K^T tiles: the staging memory takes dQ
    acc_to_lds<DIM_BLOCKS, ROW_STRIDE>(sStage, wave * MATRIX_N + acc_col(lane), acc_dq, grad_scale, lane);
    __syncthreads();  // the dQ tile is complete
    dq += batch * dq_batch_stride + head * dq_head_stride + (i64)(seq.q_start + m_start) * dq_row_stride;
    store_tile<BLOCK_M, ROW_STRIDE>(dq, dq_row_stride, sStage, seqlen_q - m_start, head_dim, tid);
}
