// FlashAttention-2 forward on CDNA matrix cores (gfx908, gfx90a, gfx94x): fp16 or bf16 in, fp32
// accumulate, wave64.
//
// Same algorithm and conventions as kernels_cuda/flash_fwd.cu: the block's Q tile is loaded once,
// K and V tiles stream through LDS, the running row max m_i and row sum l_i stay in registers
// (online softmax), O is divided by l_i once at the end. Softmax in base 2 with
// scale_log2 = scale * log2(e) folded into the subtraction of the max; the LSE written out is
// natural-log: lse = scale * m_i + ln(l_i).
//
// The products run transposed, S^T = K Q^T and O^T = V^T P^T, on v_mfma_f32_32x32x8 (mfma.h):
// an MFMA accumulator column is one query, so each lane owns one query (and shares it with lane
// l ^ 32). Row max and row sum need one shuffle, the rescale of O none, and the accumulator of
// S^T is, element for element, the B operand of O^T = V^T P^T: P never leaves registers.
//
// Grid: x = query block (reversed, so the heaviest causal blocks start first), y = query head,
// z = batch (plus batch_offset). Block: NUM_WAVES waves; wave w owns queries [w * 32, w * 32 + 32)
// of the block. Run time: one AttnParams by value (kernels_common/params.h), as the CUDA kernels.
// Layouts: q, o (B, Hq, Sq, D) and k, v (B, Hk, Sk, D) with their own batch, head and row strides
// in elements, D contiguous; lse float32 (B, Hq, Sq). GQA: query head h reads kv head
// h / heads_per_kv. Reads q, k, v; writes o and lse. Packed batches (IS_VARLEN): batch strides
// are 0 and sequence b starts at row cu_seqlens[b] (attention_common.h); the grid covers the
// longest sequence and blocks past a shorter one's end return at once.
//
// Masks and score modifiers (attention_common.h), as in kernels_cuda/flash_fwd.cu: the band of
// visible keys (causal, sliding window), softcap, ALiBi. Key tiles outside the band of a block are
// never loaded, a wave skips the arithmetic of tiles outside its own band, and tiles inside it are
// masked only where they cross an edge. Sinks (HAS_SINKS): folded into each row's LSE and O by the
// epilogue, as in kernels_cuda/flash_fwd.cu (attention_common.h, fold_sink).

// ---- compile-time configuration (set with -D by xattn/kernels.py) ------------------------------
// ELEM_BF16   1: bfloat16, 0: float16 (ELEM_TYPE, for platform.h, is the same choice)
// HEAD_DIM    padded head dim (multiple of 32); the real one, head_dim, is <= it
// BLOCK_N     keys per tile (multiple of 32);  NUM_WAVES  waves per block, BLOCK_M = 32 * NUM_WAVES
// IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN: masks and modifiers (attention_common.h)
// HAS_SINKS   the sinks, read from p.sinks (attention_common.h)
// VEC_LOADS   1: rows start 16-byte aligned and head_dim % 8 == 0: 16-byte global loads and
//             8-byte stores; 0: element-wise, masked
// FRAGS_IN_LDS 1: the Q tile stays in LDS and its fragments are read at each use (matrix_tile.h)
// WAVE_SIZE   64 (MFMA), 32 (WMMA)

#define NUM_THREADS (NUM_WAVES * WAVE_SIZE)

#include "matrix_tile.h"
#include "../kernels_common/attention_common.h"

#define BLOCK_M (NUM_WAVES * MATRIX_N)
#define KEY_BLOCKS (BLOCK_N / MATRIX_M)   // MATRIX_M-key blocks of S^T
#define DIM_BLOCKS (HEAD_DIM / MATRIX_M)  // MATRIX_M-dim blocks of O^T
#define DIM_STEPS (HEAD_DIM / MATRIX_K)   // k steps of S^T = K Q^T
#define KEY_STEPS (BLOCK_N / MATRIX_K)    // k steps of O^T = V^T P^T
// Rows padded by PAD elements (mfma_tile.h: conflict-free fragment reads).
#define KQ_STRIDE (HEAD_DIM + PAD)  // sK and sQ: [row][dim]
#define VT_STRIDE (BLOCK_N + PAD)   // sVt: [dim][key]

static_assert(WAVE_SIZE == MATRIX_WAVE, "the matrix instructions' wave size");
static_assert(HEAD_DIM % MATRIX_M == 0 && BLOCK_N % MATRIX_M == 0, "whole matrix blocks");

// ---- LDS layout ---------------------------------------------------------------------------------
// sK [BLOCK_N][KQ_STRIDE] | sVt [HEAD_DIM][VT_STRIDE], 16-bit elements. Before the main loop the
// same memory stages the Q tile, sQ [BLOCK_M][KQ_STRIDE], on its way into registers; with
// FRAGS_IN_LDS sQ follows sVt and stays for the whole loop.
// xattn/kernels.py (the kernel's shared_memory) computes the same size.

// ---- device helpers ---------------------------------------------------------------------------

// S^T = K Q^T for the tile in sK and this wave's 32 queries (q_frag: their Q^T fragments).
__device__ __forceinline__ void compute_scores(acc_t (&acc_s)[KEY_BLOCKS],
                                               const FixedFrags<DIM_STEPS, KQ_STRIDE>& q_frag,
                                               const u16* sK, int lane) {
    tile_times_frags<KEY_BLOCKS, DIM_STEPS, KQ_STRIDE>(acc_s, sK, q_frag, lane);
}

// Raw dot products -> scores: softcap, ALiBi, and -inf outside the band where the tile crosses an
// edge of it or the end of the keys (attention_common.h: modified_score). Element j of block nb is
// key acc_row(lane, nb, j) of the tile; the lane's query is its column.
__device__ __forceinline__ void modify_scores(acc_t (&acc_s)[KEY_BLOCKS], int wave_row_start,
                                              int n_start, const ScoreMods& mods, bool check_mask,
                                              int lane) {
    const int row = wave_row_start + acc_col(lane);
#pragma unroll
    for (int nb = 0; nb < KEY_BLOCKS; ++nb)
#pragma unroll
        for (int j = 0; j < ACC_ELEMS; ++j)
            acc_s[nb][j] = modified_score(acc_s[nb][j], row, n_start + acc_row(lane, nb, j), mods, check_mask);
}

// Online softmax step for this lane's query: fold the tile's scores into m_i and l_i, turn S into
// P in place, rescale O by exp2(m_old - m_new). Lanes l and l ^ MATRIX_N hold the same query's other
// keys: one shuffle completes the max; the sum stays per lane until the epilogue.
__device__ __forceinline__ void softmax_rescale_o(acc_t (&acc_s)[KEY_BLOCKS], acc_t (&acc_o)[DIM_BLOCKS],
                                                  float& row_max, float& row_sum, float scale_log2) {
    float m_new = row_max;
#pragma unroll
    for (int nb = 0; nb < KEY_BLOCKS; ++nb)
#pragma unroll
        for (int j = 0; j < ACC_ELEMS; ++j) m_new = fmaxf(m_new, acc_s[nb][j]);
    m_new = fmaxf(m_new, shfl_xor(m_new, MATRIX_N));
    // A query that has seen no key yet keeps m = -inf: offset 0 makes exp2(-inf - offset) = 0
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

// O^T += V^T P^T. P^T's B fragments are this lane's own accumulator elements (mfma.h), packed.
__device__ __forceinline__ void accumulate_pv(acc_t (&acc_o)[DIM_BLOCKS], const acc_t (&acc_s)[KEY_BLOCKS],
                                              const u16* sVt, int lane) {
    tile_times_acc<DIM_BLOCKS, KEY_STEPS, VT_STRIDE>(acc_o, sVt, acc_s, lane);
}

// Epilogue: O /= l and lse = scale * m + ln(l), with the sink folded into both (HAS_SINKS,
// fold_sink); a query that saw no key has l = 0 and gets O = 0, lse = -inf (the sink's logit with
// a sink). Each lane stores its query's dims (acc_row: runs of 4 consecutive).
__device__ __forceinline__ void write_output(const acc_t (&acc_o)[DIM_BLOCKS], float row_max, float row_sum,
                                             u16* o, i64 o_row_stride, float* lse, int wave_row_start,
                                             int seqlen_q, int head_dim, float scale, float sink, int lane) {
    const float l = row_sum + shfl_xor(row_sum, MATRIX_N);
    float inv_l = l != 0.f ? 1.f / l : 0.f;
    const int row = wave_row_start + acc_col(lane);
    if (row >= seqlen_q) return;
    float row_lse = l != 0.f ? row_max * scale + logf(l) : NEG_INF;
    if (HAS_SINKS) row_lse = fold_sink(row_lse, sink, &inv_l);
    if (lane < MATRIX_N) lse[row] = row_lse;
    store_acc_row(o + row * o_row_stride, acc_o, inv_l, head_dim, lane);
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
MATRIX_KERNEL(flash_fwd, )(const AttnParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const u16, q, p.q);
    TENSOR_FROM_PARAMS(const u16, k, p.k);
    TENSOR_FROM_PARAMS(const u16, v, p.v);
    TENSOR_FROM_PARAMS(u16, o, p.o);
    TENSOR_FROM_PARAMS(float, lse, p.lse);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    // scale: the softmax's scale of the values in S (the softcap c under a softcap, else the
    // attention scale); scale_log2 = scale * log2(e).
    extern __shared__ __attribute__((aligned(16))) u16 smem[];
    u16* sK = smem;
    u16* sVt = sK + BLOCK_N * KQ_STRIDE;
    u16* sQ = FRAGS_IN_LDS ? sVt + HEAD_DIM * VT_STRIDE : smem;  // else staging only, before the loop

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / heads_per_kv;
    const int tid = threadIdx.x, wave = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int m_start = m_block * BLOCK_M;
    const int wave_row_start = m_start + wave * MATRIX_N;

    const Sequence seq = sequence(batch, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k);
    if (IS_VARLEN && m_start >= seq.seqlen_q) return;  // the grid covers the longest sequence
    seqlen_q = seq.seqlen_q;
    seqlen_k = seq.seqlen_k;
    const ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, window_left, window_right, softcap_scale,
                                           alibi_slopes + batch * alibi_batch_stride + head, scale);

    q += batch * q_batch_stride + head * q_head_stride + (i64)(seq.q_start + m_start) * q_row_stride;
    k += batch * k_batch_stride + kv_head * k_head_stride + (i64)seq.k_start * k_row_stride;
    v += batch * v_batch_stride + kv_head * v_head_stride + (i64)seq.k_start * v_row_stride;

    // Prologue: Q through LDS into registers (or left in LDS), where it stays for the whole loop.
    load_tile<BLOCK_M, KQ_STRIDE, 0>(sQ, nullptr, q, q_row_stride, seqlen_q - m_start, head_dim, tid);
    __syncthreads();  // the Q tile is complete
    FixedFrags<DIM_STEPS, KQ_STRIDE> q_frag;
    q_frag.load(sQ, wave * MATRIX_N, lane);

    acc_t acc_o[DIM_BLOCKS];
#pragma unroll
    for (int db = 0; db < DIM_BLOCKS; ++db) acc_o[db] = acc_t{};
    float row_max = NEG_INF, row_sum = 0.f;

    // Tiles right to left: the ones that need masking (end of the keys, right edge of the band)
    // first. Every wave takes part in the block's loads and barriers; a wave whose queries see none
    // of a tile's keys (outside its band, or past the last query) skips its arithmetic.
    const KeyRange tiles = key_tiles(m_start, min(BLOCK_M, seqlen_q - m_start), BLOCK_N, seqlen_k, mods.band);
    const int wave_rows = max(1, min(MATRIX_N, seqlen_q - wave_row_start));
    const KeyRange wave_tiles = key_tiles(wave_row_start, wave_rows, BLOCK_N, seqlen_k, mods.band);
    for (int tile = tiles.tile_end - 1; tile >= tiles.tile_begin; --tile) {
        const int n_start = tile * BLOCK_N;
        __syncthreads();  // every wave is done with the previous K and V tiles (and with sQ)
        load_tile<BLOCK_N, KQ_STRIDE, 0>(sK, nullptr, k + n_start * k_row_stride, k_row_stride, seqlen_k - n_start, head_dim, tid);
        load_tile<BLOCK_N, 0, VT_STRIDE>(nullptr, sVt, v + n_start * v_row_stride, v_row_stride, seqlen_k - n_start, head_dim, tid);
        __syncthreads();  // K and V^T tiles visible to every wave
        if (wave_row_start >= seqlen_q || tile >= wave_tiles.tile_end || tile < wave_tiles.tile_begin) continue;

        acc_t acc_s[KEY_BLOCKS];
        compute_scores(acc_s, q_frag, sK, lane);  // S^T = K Q^T
        const bool needs_mask = tile_needs_mask(wave_row_start, MATRIX_N, n_start, BLOCK_N, seqlen_k, mods.band);
        if (HAS_SOFTCAP || HAS_ALIBI || needs_mask) modify_scores(acc_s, wave_row_start, n_start, mods, needs_mask, lane);
        softmax_rescale_o(acc_s, acc_o, row_max, row_sum, scale_log2);  // S becomes P
        accumulate_pv(acc_o, acc_s, sVt, lane);  // O^T += V^T P^T
    }

    // O and LSE addresses are formed only now, to keep them out of the main loop's registers.
    o += batch * o_batch_stride + head * o_head_stride + (i64)seq.q_start * o_row_stride;
    lse += batch * lse_batch_stride + head * lse_head_stride + seq.q_start;
    const float sink = HAS_SINKS ? p.sinks[head] : 0.f;
    write_output(acc_o, row_max, row_sum, o, o_row_stride, lse, wave_row_start, seqlen_q, head_dim, scale, sink, lane);
}
