// FlashAttention-2 forward on tensor cores: fp16 or bf16 in, fp32 accumulate.
//
// O = softmax(scale * Q K^T + modifiers) V, computed one query block at a time. The block's Q tile is loaded
// once; K and V tiles stream through shared memory; S = Q K^T and O += P V run on mma.sync
// m16n8k16 fed by ldmatrix; the running row max m_i and row sum l_i stay in registers (online
// softmax), so the Sq x Sk score matrix never reaches global memory. O is divided by l_i once,
// at the end.
//
// Grid: x = query block (reversed, so the heaviest causal blocks start first), y = query head,
// z = batch. Block: NUM_WARPS warps; warp w owns query rows [w * WARP_M, (w + 1) * WARP_M) and
// keeps them to itself from the first mma to the last store, so warps never reduce through
// shared memory. They share only the K and V tiles.
//
// Layouts: q, o are (B, Hq, Sq, D) and k, v are (B, Hk, Sk, D), each with its own batch, head
// and row strides in elements, elements along D contiguous. lse is float32 (B, Hq, Sq). GQA: query
// head h reads key/value head h / heads_per_kv. Reads q, k, v; writes o and lse. Packed batches
// (IS_VARLEN): batch strides are 0 and sequence b starts at row cu_seqlens[b] (attention_common.h);
// the grid covers the longest sequence and blocks past a shorter one's end return at once. Paged
// keys and values (IS_PAGED, with IS_VARLEN): k and v are (num_pages, page_size, Hk, D), their
// batch strides the page strides, and each K/V row is found through the sequence's row of the block
// table (attention_common.h: kv_row_offset); nothing else changes.
//
// Masks and score modifiers (attention_common.h): the band of visible keys (causal, sliding
// window), softcap, ALiBi. Key tiles outside the band of a block are never loaded; tiles inside
// it are masked only where they cross an edge.
//
// The softmax runs in base 2: scores are scaled by scale_log2 = scale * log2(e) inside the same
// FFMA that subtracts the max, so each exponential is one ex2 instruction. The LSE written out is
// natural-log: lse = scale * m_i + ln(l_i).
//
// Sinks (HAS_SINKS, GPT-OSS): query head h has a logit sink_h that joins each row's softmax
// denominator as one more key of score sink_h and value 0. It touches no tile: the epilogue folds
// it into the row's LSE (fold_sink), and O's normalization with it.
//
// Pipeline (FlashAttention-2's): one K buffer and one V buffer. The V tile of step j loads while
// S = Q K_j^T and the softmax run; the K tile of step j+1 loads while O += P V_j runs.

// ---- compile-time configuration (set with -D by xattn/kernels.py) ------------------------------
// ELEM_BF16   1: bfloat16, 0: float16
// HEAD_DIM    padded head dim of this variant (multiple of 16); the real one, head_dim, is <= it
// BLOCK_M     query rows per thread block;  BLOCK_N  keys per tile
// NUM_WARPS   warps per thread block (BLOCK_M / NUM_WARPS must be a multiple of 16)
// IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN, IS_PAGED: masks, modifiers and where
//             sequences live (attention_common.h)
// VEC_LOADS   1: every row starts 16-byte aligned and head_dim % 8 == 0, so tiles move with 16-byte
//             cp.async; 0: element-wise loads and stores (odd head dims, odd strides)
// MIN_BLOCKS  thread blocks per SM that the register allocation must allow
// HAS_SINKS   1: p.sinks holds float32 (Hq,) sink logits (left undefined, 0, by the other variants)

#include "platform.h"
#include "../kernels_common/attention_common.h"

#define NUM_THREADS (NUM_WARPS * WARP_SIZE)
#define WARP_M (BLOCK_M / NUM_WARPS)  // query rows per warp
#define M_TILES (WARP_M / 16)         // m16 row tiles per warp
#define N_TILES (BLOCK_N / 8)         // n8 column tiles of S per warp
#define D_TILES (HEAD_DIM / 8)        // n8 column tiles of O per warp

#include "mma_tile.h"


static_assert(WARP_M % 16 == 0, "each warp owns whole m16 tiles");
static_assert(BLOCK_N % 16 == 0 && HEAD_DIM % 16 == 0, "k16 steps over keys and head dim");

// ---- shared-memory layout ---------------------------------------------------------------------
// sQ [BLOCK_M][SMEM_STRIDE] | sK [BLOCK_N][SMEM_STRIDE] | sV [BLOCK_N][SMEM_STRIDE], 16-bit
// elements (xattn/kernels.py computes the same size).
// sQ is reused by each warp to stage its own O rows for coalesced stores in the epilogue.

// ---- device helpers ---------------------------------------------------------------------------

// Raw dot products -> scores: softcap, ALiBi, and -inf outside the band where the tile crosses an
// edge of it or the end of the keys (attention_common.h: modified_score).
__device__ __forceinline__ void modify_scores(float (&acc_s)[M_TILES][N_TILES][4], int row_start,
                                              int n_start, const ScoreMods& mods, bool check_mask,
                                              int lane) {
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int row = row_start + mt * 16 + lane / 4 + (e / 2) * 8;
                int key = n_start + nt * 8 + (lane % 4) * 2 + e % 2;
                acc_s[mt][nt][e] = modified_score(acc_s[mt][nt][e], row, key, mods, check_mask);
            }
}

// Online softmax step: fold this tile's scores into the running max and sum, turn S into P in
// place, and rescale O by exp2(m_old - m_new) -- skipped when no row of the warp has a new max.
// Each thread holds two rows per m16 tile (h = 0: row g, h = 1: row g + 8); the four threads of a
// quad share a row, so the row max needs two shuffles. The row sum stays per thread until the end.
__device__ __forceinline__ void softmax_rescale_o(float (&acc_s)[M_TILES][N_TILES][4],
                                                  float (&acc_o)[M_TILES][D_TILES][4],
                                                  float (&row_max)[M_TILES][2],
                                                  float (&row_sum)[M_TILES][2], float scale_log2) {
    float alpha[M_TILES][2];
    bool max_moved = false;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float m_new = row_max[mt][h];
#pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt)
                m_new = fmaxf(m_new, fmaxf(acc_s[mt][nt][2 * h], acc_s[mt][nt][2 * h + 1]));
            m_new = fmaxf(m_new, shfl_xor(m_new, 1));
            m_new = fmaxf(m_new, shfl_xor(m_new, 2));
            // A row that has seen no key yet keeps m = -inf: use 0 as the offset so that
            // exp2(-inf - offset) is 0 rather than exp2(-inf + inf) = NaN.
            bool row_empty = m_new == NEG_INF;
            float offset = row_empty ? 0.f : m_new * scale_log2;
            alpha[mt][h] = row_empty ? 1.f : fast_exp2((row_max[mt][h] - m_new) * scale_log2);
            max_moved |= m_new > row_max[mt][h];
            row_max[mt][h] = m_new;

            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    float p = fast_exp2(acc_s[mt][nt][e] * scale_log2 - offset);
                    acc_s[mt][nt][e] = p;
                    sum += p;
                }
            row_sum[mt][h] = row_sum[mt][h] * alpha[mt][h] + sum;
        }

    if (warp_any(max_moved)) {
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int dt = 0; dt < D_TILES; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] *= alpha[mt][e / 2];
    }
}

// K or V rows [n_start, n_start + BLOCK_N) of this sequence into a tile, zeros past seqlen_k:
// consecutive rows, or each row through its page (IS_PAGED; page_stride is the tensor's batch
// stride there).
__device__ __forceinline__ void load_kv_tile(u16* smem, const u16* kv, const AttnParams& p, int batch,
                                             i64 page_stride, i64 row_stride, int n_start,
                                             int seqlen_k, int head_dim, int tid) {
#if IS_PAGED
    load_paged_tile<BLOCK_N>(smem, kv, p, batch, n_start, page_stride, row_stride, seqlen_k - n_start, head_dim, tid);
#else
    load_tile<BLOCK_N>(smem, kv + n_start * row_stride, row_stride, seqlen_k - n_start, head_dim, tid);
#endif
}

// P (fp32, accumulator layout of S) -> 16-bit A-operand fragments of P V (pack_a_fragment): P never
// leaves registers, and packing halves the registers P holds while the next K tile's copies are
// issued.
__device__ __forceinline__ void convert_p(u32 (&p_frag)[M_TILES][BLOCK_N / 16][4],
                                         const float (&acc_s)[M_TILES][N_TILES][4]) {
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) pack_a_fragment(p_frag[mt][kk], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
}

// Epilogue: O /= l, write O through shared memory (the warp's own rows of sQ) with 16-byte stores,
// and write lse = scale * m + ln(l). A row that saw no key has l = 0: it gets O = 0, lse = -inf. A
// NaN that reached the row makes l NaN, and O and lse then come out NaN (README: the NaN rule).
__device__ __forceinline__ void write_output(float (&acc_o)[M_TILES][D_TILES][4],
                                             const float (&row_max)[M_TILES][2],
                                             const float (&row_sum)[M_TILES][2], u16* sQ, u16* o,
                                             i64 o_row_stride, float* lse, int row_start,
                                             int seqlen_q, int head_dim, float scale, float sink,
                                             int warp, int lane) {
    u16* sO = sQ + warp * WARP_M * SMEM_STRIDE;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = row_sum[mt][h];
            l += shfl_xor(l, 1);
            l += shfl_xor(l, 2);
            float inv_l = l != 0.f ? 1.f / l : 0.f;
            float row_lse = l != 0.f ? row_max[mt][h] * scale + logf(l) : NEG_INF;
            if (HAS_SINKS) row_lse = fold_sink(row_lse, sink, &inv_l);
            int row = mt * 16 + lane / 4 + h * 8;
#pragma unroll
            for (int dt = 0; dt < D_TILES; ++dt) {
                u32 packed = pack_float2(acc_o[mt][dt][2 * h] * inv_l, acc_o[mt][dt][2 * h + 1] * inv_l);
                *(u32*)(sO + row * SMEM_STRIDE + dt * 8 + (lane % 4) * 2) = packed;
            }
            if (lane % 4 == 0 && row_start + row < seqlen_q)
                lse[row_start + row] = row_lse;
        }
    wave_barrier();  // the warp's rows of sO are complete before its lanes read them back

    store_rows<WARP_M>(o + (i64)row_start * o_row_stride, o_row_stride, sO, seqlen_q - row_start,
                       head_dim, lane);
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_fwd(AttnParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const u16, q, p.q);
    TENSOR_FROM_PARAMS(const u16, k, p.k);
    TENSOR_FROM_PARAMS(const u16, v, p.v);
    TENSOR_FROM_PARAMS(u16, o, p.o);
    TENSOR_FROM_PARAMS(float, lse, p.lse);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    // scale: the softmax's scale of the values in S (the softcap c under a softcap, else the
    // attention scale); scale_log2 = scale * log2(e).
    extern __shared__ __align__(16) u16 smem[];
    u16* sQ = smem;
    u16* sK = sQ + BLOCK_M * SMEM_STRIDE;
    u16* sV = sK + BLOCK_N * SMEM_STRIDE;

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / heads_per_kv;
    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int m_start = m_block * BLOCK_M;
    const int warp_row_start = m_start + warp * WARP_M;

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

    // This lane's ldmatrix row addresses (mma_tile.h): Q is the A operand of S = Q K^T, K's rows
    // are those of B^T, and V is the row-major B of O += P V.
    const u32 q_lane = lane_address_x<SMEM_STRIDE>(smem_addr(sQ), warp * WARP_M, 0, lane);
    const u32 k_lane = lane_address_y<SMEM_STRIDE>(smem_addr(sK), 0, 0, lane);
    const u32 v_lane = lane_address_x<SMEM_STRIDE>(smem_addr(sV), 0, 0, lane);

    const KeyRange tiles = key_tiles(m_start, min(BLOCK_M, seqlen_q - m_start), BLOCK_N, seqlen_k, mods.band);

    // Prologue: the Q block and the last K tile load together. Tiles are walked right to left, so
    // the tiles that need masking (the end of the keys, the causal diagonal) come first.
    load_tile<BLOCK_M>(sQ, q, q_row_stride, seqlen_q - m_start, head_dim, tid);
    if (tiles.tile_end > tiles.tile_begin) {
        int n_start = (tiles.tile_end - 1) * BLOCK_N;
        load_kv_tile(sK, k, p, batch, k_batch_stride, k_row_stride, n_start, seqlen_k, head_dim, tid);
    }
    cp_async_commit();

    float acc_o[M_TILES][D_TILES][4];
    float row_max[M_TILES][2], row_sum[M_TILES][2];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
        for (int dt = 0; dt < D_TILES; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_max[mt][h] = NEG_INF;
            row_sum[mt][h] = 0.f;
        }
    }

    for (int tile = tiles.tile_end - 1; tile >= tiles.tile_begin; --tile) {
        const int n_start = tile * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K tile visible to every warp, and every warp is done reading the last V tile
        load_kv_tile(sV, v, p, batch, v_batch_stride, v_row_stride, n_start, seqlen_k, head_dim, tid);
        cp_async_commit();

        // Near an edge of the band a warp whose rows all miss this tile would compute P = 0 and
        // add nothing: it only takes part in the copies and barriers.
        const bool warp_sees_tile = (!IS_CAUSAL || n_start <= warp_row_start + WARP_M - 1 + mods.band.hi) &&
                                    (!IS_LOCAL || n_start + BLOCK_N - 1 >= warp_row_start + mods.band.lo);
        u32 p_frag[M_TILES][BLOCK_N / 16][4];
        if (warp_sees_tile) {
            float acc_s[M_TILES][N_TILES][4];
            zero(acc_s);
            mma_a_bt<M_TILES, N_TILES, HEAD_DIM / 16, SMEM_STRIDE, SMEM_STRIDE>(acc_s, q_lane, k_lane);  // S = Q K^T
            const bool needs_mask = tile_needs_mask(warp_row_start, WARP_M, n_start, BLOCK_N, seqlen_k, mods.band);
            if (HAS_SOFTCAP || HAS_ALIBI || needs_mask) modify_scores(acc_s, warp_row_start, n_start, mods, needs_mask, lane);
            softmax_rescale_o(acc_s, acc_o, row_max, row_sum, scale_log2);  // S becomes P
            convert_p(p_frag, acc_s);  // after this, P takes half the registers
        }

        cp_async_wait<0>();
        __syncthreads();  // V tile visible to every warp, and every warp is done reading this K tile
        if (tile > tiles.tile_begin) {
            int next_start = n_start - BLOCK_N;
            load_kv_tile(sK, k, p, batch, k_batch_stride, k_row_stride, next_start, seqlen_k, head_dim, tid);
            cp_async_commit();
        }
        if (warp_sees_tile) mma_areg_b<M_TILES, D_TILES, BLOCK_N / 16, SMEM_STRIDE>(acc_o, p_frag, v_lane);  // O += P V
    }
    // With no key tile at all the Q copies (issued by every thread, into every warp's rows) are
    // still in flight; the epilogue overwrites sQ, so all of them must have landed.
    cp_async_wait<0>();
    __syncthreads();

    // O and LSE addresses are formed only now: live through the main loop they would cost registers.
    o += batch * o_batch_stride + head * o_head_stride + (i64)seq.q_start * o_row_stride;
    lse += batch * lse_batch_stride + head * lse_head_stride + seq.q_start;
    const float sink = HAS_SINKS ? p.sinks[head] : 0.f;
    write_output(acc_o, row_max, row_sum, sQ, o, o_row_stride, lse, warp_row_start, seqlen_q,
                 head_dim, scale, sink, warp, lane);
}
