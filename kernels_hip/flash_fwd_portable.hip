// FlashAttention-2 forward without matrix instructions: every product is a plain FMA over LDS
// tiles held in float32. Serves float32 exactly on every AMD GPU, and float16/bfloat16 on GPUs
// without MFMA (RDNA, gfx9 before gfx908). The wave size is a compile-time parameter, not a
// constant, so the same source runs in wave64 (CDNA, GCN), wave32 (RDNA) and, through the
// test-only tests/hip_on_cuda.h, on NVIDIA GPUs.
//
// Same algorithm and conventions as kernels_cuda/flash_fwd.cu: Q block loaded once, K and V tiles
// streamed through LDS, running row max m_i and row sum l_i, base-2 softmax with
// scale_log2 = scale * log2(e) folded into the subtraction of the max, one division at the end,
// natural-log LSE (lse = scale * m_i + ln(l_i)), key tiles walked right to left.
//
// Grid: x = query block (reversed), y = query head, z = batch. Block: NUM_WAVES waves; wave w
// owns ROWS_PER_WAVE query rows. For S = Q K^T a wave splits into ROW_GROUPS groups of BLOCK_N
// lanes: lane (g, n) scores key n of the tile against rows g, g + ROW_GROUPS, ..., so the row max
// and row sum are reductions inside a group. For O += P V lane l owns head dims l, l + WAVE_SIZE,
// ... of all the wave's rows, reading P and the rescale factors through LDS.
// Layouts as in flash_fwd_mfma.hip: q, o (B, Hq, Sq, D), k, v (B, Hk, Sk, D), lse (B, Hq, Sq).
// Run time: one AttnParams by value (kernels_common/params.h), as the CUDA kernels.
// Masks, score modifiers and packed batches as in kernels_cuda/flash_fwd.cu (attention_common.h):
// key tiles outside the band of the block are never loaded; every score goes through
// modified_score. Packed batches (IS_VARLEN): batch strides are 0 and sequence b starts at row
// cu_seqlens[b]; the grid covers the longest sequence and blocks past a shorter one's end return.
// Paged keys and values (IS_PAGED, with IS_VARLEN): k and v are (num_pages, page_size, Hk, D) and
// each K/V row is found through the sequence's pages (attention_common.h: kv_row_offset, shared
// with the CUDA kernels). The MFMA/WMMA forwards have no paged variant: xattn/hip.py sends paged
// calls here.
// Sinks (HAS_SINKS, GPT-OSS): as in kernels_cuda/flash_fwd.cu, the sink of query head h is one more
// key of score sinks[h] and value 0; it touches no tile: the epilogue folds it into the row's LSE
// and O's normalization (attention_common.h, fold_sink).

// ---- compile-time configuration (set with -D by xattn/kernels.py) ------------------------------
// ELEM_TYPE   0: float16, 1: bfloat16, 2: float32
// HEAD_DIM    padded head dim (multiple of WAVE_SIZE);  BLOCK_N  keys per tile (divides WAVE_SIZE)
// BLOCK_M     query rows per block;  NUM_WAVES  waves per block;  WAVE_SIZE  32 or 64
// IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN, IS_PAGED: masks, modifiers and where
//             sequences live (attention_common.h);  HAS_SINKS  the sinks, read from p.sinks

#include "platform.h"
#include "../kernels_common/attention_common.h"

#define NUM_THREADS (NUM_WAVES * WAVE_SIZE)
#define ROWS_PER_WAVE (BLOCK_M / NUM_WAVES)
#define ROW_GROUPS (WAVE_SIZE / BLOCK_N)
#define ROWS_PER_LANE (ROWS_PER_WAVE / ROW_GROUPS)
#define D_PER_LANE (HEAD_DIM / WAVE_SIZE)
// Odd row strides for sQ and sK: the BLOCK_N lanes of a group read one dim of BLOCK_N different
// keys, which then fall in different banks; the groups read different Q rows, likewise.
#define QK_STRIDE (HEAD_DIM + 1)

static_assert(WAVE_SIZE % BLOCK_N == 0, "a wave holds whole groups of BLOCK_N lanes");
static_assert(BLOCK_M % NUM_WAVES == 0 && ROWS_PER_WAVE % ROW_GROUPS == 0, "rows split evenly");
static_assert(HEAD_DIM % WAVE_SIZE == 0, "each lane owns whole head dims");

// ---- LDS layout (float32) ---------------------------------------------------------------------
// sQ [BLOCK_M][QK_STRIDE] | sK [BLOCK_N][QK_STRIDE] | sV [BLOCK_N][HEAD_DIM] | sP [BLOCK_M][BLOCK_N]
// | sRow [BLOCK_M] (per-row rescale factor in the loop, 1 / l in the epilogue).
// xattn/kernels.py (the kernel's shared_memory) computes the same size.

// ---- device helpers ---------------------------------------------------------------------------

// Copy rows x HEAD_DIM elements into LDS as float32, zeros outside valid_rows x head_dim.
__device__ __forceinline__ void load_rows(float* smem, int smem_stride, const elem_t* gmem,
                                          i64 row_stride, int rows, int valid_rows, int head_dim,
                                          int tid) {
    for (int e = tid; e < rows * HEAD_DIM; e += NUM_THREADS) {
        const int row = e / HEAD_DIM, col = e % HEAD_DIM;
        const bool valid = row < valid_rows && col < head_dim;
        smem[row * smem_stride + col] = valid ? elem_to_float(gmem[row * row_stride + col]) : 0.f;
    }
}

// BLOCK_N rows of a sequence's K or V from key row n_start, as load_rows: consecutive rows, or each
// through its page (IS_PAGED; page_stride is the tensor's batch stride there). Rows past
// valid_rows are zeros and their addresses are never formed.
__device__ __forceinline__ void load_kv_rows(float* smem, int smem_stride, const elem_t* kv,
                                             const AttnParams& p, int batch, i64 page_stride,
                                             i64 row_stride, int n_start, int valid_rows,
                                             int head_dim, int tid) {
#if IS_PAGED
    for (int e = tid; e < BLOCK_N * HEAD_DIM; e += NUM_THREADS) {
        const int row = e / HEAD_DIM, col = e % HEAD_DIM;
        const bool valid = row < valid_rows && col < head_dim;
        smem[row * smem_stride + col] =
            valid ? elem_to_float(kv[kv_row_offset(p, batch, n_start + row, page_stride, row_stride) + col]) : 0.f;
    }
#else
    load_rows(smem, smem_stride, kv + n_start * row_stride, row_stride, BLOCK_N, valid_rows, head_dim, tid);
#endif
}

__device__ __forceinline__ float group_max(float x) {
#pragma unroll
    for (int lane_mask = BLOCK_N / 2; lane_mask > 0; lane_mask /= 2) x = fmaxf(x, shfl_xor(x, lane_mask));
    return x;
}

__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int lane_mask = BLOCK_N / 2; lane_mask > 0; lane_mask /= 2) x += shfl_xor(x, lane_mask);
    return x;
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_fwd_portable(const AttnParams p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const elem_t, q, p.q);
    TENSOR_FROM_PARAMS(const elem_t, k, p.k);
    TENSOR_FROM_PARAMS(const elem_t, v, p.v);
    TENSOR_FROM_PARAMS(elem_t, o, p.o);
    TENSOR_FROM_PARAMS(float, lse, p.lse);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    // scale: the softmax's scale of the values in S (the softcap c under a softcap, else the
    // attention scale); scale_log2 = scale * log2(e).
    extern __shared__ float smem_f32[];
    float* sQ = smem_f32;
    float* sK = sQ + BLOCK_M * QK_STRIDE;
    float* sV = sK + BLOCK_N * QK_STRIDE;
    float* sP = sV + BLOCK_N * HEAD_DIM;
    float* sRow = sP + BLOCK_M * BLOCK_N;

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / heads_per_kv;
    const int tid = threadIdx.x, wave = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int key = lane % BLOCK_N, group = lane / BLOCK_N;  // this lane's key and row group in S
    const int m_start = m_block * BLOCK_M;
    const int wave_row0 = wave * ROWS_PER_WAVE;  // the wave's first row, within the block
    // Row of the i-th score this lane computes, within the block.
    #define LANE_ROW(i) (wave_row0 + group + (i) * ROW_GROUPS)

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
    o += batch * o_batch_stride + head * o_head_stride + (i64)(seq.q_start + m_start) * o_row_stride;
    lse += batch * lse_batch_stride + head * lse_head_stride + seq.q_start + m_start;

    const KeyRange tiles = key_tiles(m_start, min(BLOCK_M, seqlen_q - m_start), BLOCK_N, seqlen_k, mods.band);
    load_rows(sQ, QK_STRIDE, q, q_row_stride, BLOCK_M, seqlen_q - m_start, head_dim, tid);

    float acc_o[ROWS_PER_WAVE][D_PER_LANE];                      // O rows of the wave, this lane's dims
    float row_max[ROWS_PER_LANE], row_sum[ROWS_PER_LANE];        // row_sum: this lane's keys only
#pragma unroll
    for (int r = 0; r < ROWS_PER_WAVE; ++r)
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] = 0.f;
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) {
        row_max[i] = NEG_INF;
        row_sum[i] = 0.f;
    }

    for (int tile = tiles.tile_end - 1; tile >= tiles.tile_begin; --tile) {
        const int n_start = tile * BLOCK_N;
        __syncthreads();  // every wave is done with the previous K, V and P tiles
        load_kv_rows(sK, QK_STRIDE, k, p, batch, k_batch_stride, k_row_stride, n_start, seqlen_k - n_start, head_dim, tid);
        load_kv_rows(sV, HEAD_DIM, v, p, batch, v_batch_stride, v_row_stride, n_start, seqlen_k - n_start, head_dim, tid);
        __syncthreads();  // K and V tiles (and, the first time, Q) visible to every wave

        // S = Q K^T: this lane's key against its rows.
        float s[ROWS_PER_LANE];
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) s[i] = 0.f;
        for (int d = 0; d < head_dim; ++d) {
            const float k_d = sK[key * QK_STRIDE + d];
#pragma unroll
            for (int i = 0; i < ROWS_PER_LANE; ++i) s[i] = fmaf(sQ[LANE_ROW(i) * QK_STRIDE + d], k_d, s[i]);
        }

        // Modifiers and mask, then the online softmax update (see softmax_rescale_o in flash_fwd.cu).
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) {
            s[i] = modified_score(s[i], m_start + LANE_ROW(i), n_start + key, mods, true);
            const float m_new = group_max(fmaxf(row_max[i], s[i]));
            const bool row_empty = m_new == NEG_INF;  // no key seen yet: offset 0 keeps exp2 from NaN
            const float offset = row_empty ? 0.f : m_new * scale_log2;
            const float alpha = row_empty ? 1.f : fast_exp2((row_max[i] - m_new) * scale_log2);
            row_max[i] = m_new;
            const float p = fast_exp2(s[i] * scale_log2 - offset);
            row_sum[i] = row_sum[i] * alpha + p;
            sP[LANE_ROW(i) * BLOCK_N + key] = p;
            if (key == 0) sRow[LANE_ROW(i)] = alpha;
        }
        // P and alpha visible to every lane of the wave. A block barrier where a wave barrier
        // would do: every wave reaches it the same number of times, and it is portable.
        __syncthreads();

        // O = alpha O + P V: this lane's head dims of every row of the wave.
#pragma unroll
        for (int r = 0; r < ROWS_PER_WAVE; ++r) {
            const float alpha = sRow[wave_row0 + r];
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] *= alpha;
        }
        for (int n = 0; n < BLOCK_N; ++n) {
            float v_n[D_PER_LANE];
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) v_n[i] = sV[n * HEAD_DIM + lane + i * WAVE_SIZE];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WAVE; ++r) {
                const float p = sP[(wave_row0 + r) * BLOCK_N + n];
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] = fmaf(p, v_n[i], acc_o[r][i]);
            }
        }
    }

    // Epilogue: l = the group's sum; lse = scale * m + ln(l), with the sink folded in (HAS_SINKS:
    // fold_sink also scales 1 / l); 1 / l through LDS to the lanes that own the dims. A row that
    // saw no key has l = 0: O = 0, lse = -inf (the sink's logit with a sink).
    const float sink = HAS_SINKS ? p.sinks[head] : 0.f;
    __syncthreads();  // every wave is done reading sRow as rescale factors
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) {
        const float l = group_sum(row_sum[i]);
        float inv_l = l != 0.f ? 1.f / l : 0.f;
        float row_lse = l != 0.f ? row_max[i] * scale + logf(l) : NEG_INF;
        if (HAS_SINKS) row_lse = fold_sink(row_lse, sink, &inv_l);
        if (key == 0) {
            sRow[LANE_ROW(i)] = inv_l;
            if (m_start + LANE_ROW(i) < seqlen_q) lse[LANE_ROW(i)] = row_lse;
        }
    }
    __syncthreads();  // 1 / l of every row visible
#pragma unroll
    for (int r = 0; r < ROWS_PER_WAVE; ++r) {
        const int row = wave_row0 + r;
        if (m_start + row >= seqlen_q) break;
        const float inv_l = sRow[row];
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) {
            const int col = lane + i * WAVE_SIZE;
            if (col < head_dim) o[row * o_row_stride + col] = float_to_elem(acc_o[r][i] * inv_l);
        }
    }
    #undef LANE_ROW
}
