// FlashAttention-2 forward for float32 inputs, in exact float32 arithmetic on the CUDA cores.
//
// Tensor cores would need tf32, which keeps 10 of float32's 23 mantissa bits; a float32 caller
// expects float32 accuracy, so this variant trades speed for it. Same algorithm and conventions as
// flash_fwd.cu (read that header first): Q block loaded once, K/V tiles streamed through shared
// memory, running max m_i and sum l_i per row, base-2 softmax with scale * log2(e) folded into one
// FFMA, one division at the end, natural-log LSE, right-to-left walk over the key tiles.
//
// Grid: x = query block (reversed), y = query head, z = batch. Block: NUM_WARPS warps, warp w owns
// ROWS_PER_WARP query rows. For S = Q K^T lane l computes the scores of key l of the tile
// (BLOCK_N = 32 keys), so the row max and row sum are warp reductions; for O += P V lane l owns
// head-dim columns l, l + 32, ... of the warp's rows. P goes through a warp-private slice of
// shared memory so that every lane can read every key's probability.
//
// compile time: ELEM_F32 = 1, HEAD_DIM (multiple of 32), ROWS_PER_WARP, NUM_WARPS, MIN_BLOCKS, the
// mask/modifier flags of attention_common.h (IS_PAGED included: paged keys and values as in
// flash_fwd.cu), and HAS_SINKS (flash_fwd.cu: the sink folded into the
// LSE in the epilogue). Parameters as in flash_fwd.cu.

#include "platform.h"
#include "../kernels_common/attention_common.h"

#define NUM_THREADS (NUM_WARPS * WARP_SIZE)
#define BLOCK_M (NUM_WARPS * ROWS_PER_WARP)
#define BLOCK_N WARP_SIZE
#define D_PER_LANE (HEAD_DIM / WARP_SIZE)
// Odd row stride for K: the 32 lanes read column d of 32 different keys, which then fall in 32
// different banks. Q (one address per warp, a broadcast) and V (consecutive columns) need none.
#define K_STRIDE (HEAD_DIM + 1)

static_assert(HEAD_DIM % WARP_SIZE == 0, "each lane owns whole head-dim columns");

#include "simt_tile.h"


// ---- shared-memory layout ---------------------------------------------------------------------
// sQ [BLOCK_M][HEAD_DIM] | sK [BLOCK_N][K_STRIDE] | sV [BLOCK_N][HEAD_DIM] | sP [NUM_WARPS][ROWS_PER_WARP][BLOCK_N]

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_fwd_f32(AttnParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const float, q, p.q);
    TENSOR_FROM_PARAMS(const float, k, p.k);
    TENSOR_FROM_PARAMS(const float, v, p.v);
    TENSOR_FROM_PARAMS(float, o, p.o);
    TENSOR_FROM_PARAMS(float, lse, p.lse);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    extern __shared__ __align__(16) float smem_f32[];
    float* sQ = smem_f32;
    float* sK = sQ + BLOCK_M * HEAD_DIM;
    float* sV = sK + BLOCK_N * K_STRIDE;
    float* sP = sV + BLOCK_N * HEAD_DIM;

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / heads_per_kv;
    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int m_start = m_block * BLOCK_M;
    const int warp_row_start = m_start + warp * ROWS_PER_WARP;
    const float* sQ_warp = sQ + warp * ROWS_PER_WARP * HEAD_DIM;
    float* sP_warp = sP + warp * ROWS_PER_WARP * BLOCK_N;

    const Sequence seq = forward_sequence(p, batch);  // IS_PAGED: the key count is the pages'
    if (IS_VARLEN && m_start >= seq.seqlen_q) return;  // the grid covers the longest sequence
    seqlen_q = seq.seqlen_q;
    seqlen_k = seq.seqlen_k;
    const ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, window_left, window_right, softcap_scale,
                                           alibi_slopes + batch * alibi_batch_stride + head, scale);

    q += batch * q_batch_stride + head * q_head_stride + (i64)(seq.q_start + m_start) * q_row_stride;
    // Paged: the batch stride is the page stride, and the pages say where each row is.
    k += (IS_PAGED ? 0 : batch * k_batch_stride) + kv_head * k_head_stride + (i64)seq.k_start * k_row_stride;
    v += (IS_PAGED ? 0 : batch * v_batch_stride) + kv_head * v_head_stride + (i64)seq.k_start * v_row_stride;
    o += batch * o_batch_stride + head * o_head_stride + (i64)seq.q_start * o_row_stride;
    lse += batch * lse_batch_stride + head * lse_head_stride + seq.q_start;

    const KeyRange tiles = key_tiles(m_start, min(BLOCK_M, seqlen_q - m_start), BLOCK_N, seqlen_k, mods.band);
    load_rows(sQ, HEAD_DIM, q, q_row_stride, BLOCK_M, seqlen_q - m_start, head_dim, tid);

    float acc_o[ROWS_PER_WARP][D_PER_LANE];
    float row_max[ROWS_PER_WARP], row_sum[ROWS_PER_WARP];  // row_sum: this lane's keys only
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        row_max[r] = NEG_INF;
        row_sum[r] = 0.f;
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] = 0.f;
    }

    for (int tile = tiles.tile_end - 1; tile >= tiles.tile_begin; --tile) {
        const int n_start = tile * BLOCK_N;
        __syncthreads();  // every warp is done with the previous K and V tiles
        load_kv_rows(sK, K_STRIDE, k, p, batch, k_batch_stride, k_row_stride, n_start, BLOCK_N, seqlen_k - n_start, head_dim, tid);
        load_kv_rows(sV, HEAD_DIM, v, p, batch, v_batch_stride, v_row_stride, n_start, BLOCK_N, seqlen_k - n_start, head_dim, tid);
        __syncthreads();  // K and V tiles (and, the first time, Q) visible to every warp

        // S = Q K^T: this lane's key against each of the warp's rows.
        float s[ROWS_PER_WARP];
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) s[r] = 0.f;
        for (int d = 0; d < head_dim; ++d) {
            float k_d = sK[lane * K_STRIDE + d];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) s[r] = fmaf(sQ_warp[r * HEAD_DIM + d], k_d, s[r]);
        }

        // Modifiers and mask, then the online softmax update (see softmax_rescale_o in flash_fwd.cu).
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
            s[r] = modified_score(s[r], warp_row_start + r, n_start + lane, mods, true);
            float m_new = warp_max(fmaxf(row_max[r], s[r]));
            bool row_empty = m_new == NEG_INF;  // no key seen yet: offset 0 keeps exp2 from NaN
            float offset = row_empty ? 0.f : m_new * scale_log2;
            float alpha = row_empty ? 1.f : fast_exp2((row_max[r] - m_new) * scale_log2);
            row_max[r] = m_new;
            float p = fast_exp2(s[r] * scale_log2 - offset);
            row_sum[r] = row_sum[r] * alpha + p;
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] *= alpha;
            sP_warp[r * BLOCK_N + lane] = p;
        }
        warp_sync();  // every lane's P visible to the whole warp

        // O += P V: this lane's head-dim columns.
        for (int n = 0; n < BLOCK_N; ++n) {
            float v_n[D_PER_LANE];
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) v_n[i] = sV[n * HEAD_DIM + lane + i * WARP_SIZE];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) {
                float p = sP_warp[r * BLOCK_N + n];
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] = fmaf(p, v_n[i], acc_o[r][i]);
            }
        }
        warp_sync();  // sP is read by all lanes before the next tile overwrites it
    }

    // Epilogue: O /= l, lse = scale * m + ln(l); a row that saw no key gets O = 0, lse = -inf
    // (with a sink: lse = sink).
    const float sink = HAS_SINKS ? p.sinks[head] : 0.f;
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = warp_row_start + r;
        float l = warp_sum(row_sum[r]);
        float inv_l = l != 0.f ? 1.f / l : 0.f;
        float row_lse = l != 0.f ? row_max[r] * scale + logf(l) : NEG_INF;
        if (HAS_SINKS) row_lse = fold_sink(row_lse, sink, &inv_l);
        if (row < seqlen_q) {
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) {
                int col = lane + i * WARP_SIZE;
                if (col < head_dim) o[row * o_row_stride + col] = acc_o[r][i] * inv_l;
            }
            if (lane == 0) lse[row] = row_lse;
        }
    }
}
