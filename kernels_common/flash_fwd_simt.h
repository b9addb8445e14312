// FlashAttention-2 forward without matrix instructions: every product is a plain FMA over shared
// memory (LDS) tiles held in float32. One body for both vendors, entered from
// kernels_cuda/flash_fwd_f32.cu (float32 on NVIDIA: tensor cores would need tf32, which keeps 10
// of float32's 23 mantissa bits) and kernels_hip/flash_fwd_portable.hip (float32 on every AMD GPU,
// float16/bfloat16 where no MFMA/WMMA row serves; the test-only tests/hip_on_cuda.h runs it on
// NVIDIA too). The entry file includes its vendor's platform.h first: element type, wave size
// (a CUDA warp is a wave here), shuffles, exp2 and the wave barrier.
//
// Same algorithm and conventions as kernels_cuda/flash_fwd.cu (read that header first): Q block
// loaded once, K and V tiles streamed through shared memory, running row max m_i and row sum l_i,
// base-2 softmax with scale_log2 = scale * log2(e) folded into one FFMA, one division at the end,
// natural-log LSE (lse = scale * m_i + ln(l_i)), key tiles walked right to left.
//
// Grid: x = query block (reversed), y = query head, z = batch. Block: NUM_WAVES waves; wave w owns
// ROWS_PER_WAVE query rows. For S = Q K^T a wave splits into ROW_GROUPS groups of BLOCK_N lanes:
// lane (g, n) scores key n of the tile against the wave's rows g, g + ROW_GROUPS, ..., so the row
// max and row sum are reductions inside a group. For O += P V lane l owns head dims l,
// l + WAVE_SIZE, ... of all the wave's rows, reading P through shared memory. With one row group
// (BLOCK_N == WAVE_SIZE: every NVIDIA row) a lane's S rows are its O rows and the rescale factors
// stay in registers; with more, they go through sRow too.
// Every wave reads only its own rows of sQ, sP and sRow: between the softmax and P V a wave
// barrier suffices, and only the K/V tiles need block barriers.
// Layouts: q, o (B, Hq, Sq, D), k, v (B, Hk, Sk, D), lse (B, Hq, Sq); one AttnParams by value
// (kernels_common/params.h). Masks, score modifiers, packed batches (IS_VARLEN: the grid covers
// the longest sequence, blocks past a shorter one's end return), paged keys and values (IS_PAGED)
// and sinks (HAS_SINKS: folded into the LSE and O's normalization in the epilogue) as in
// flash_fwd.cu, through attention_common.h.

// ---- compile-time configuration (set with -D by xattn/kernels.py) ------------------------------
// HEAD_DIM    padded head dim (multiple of WAVE_SIZE);  BLOCK_N  keys per tile (divides WAVE_SIZE)
// BLOCK_M     query rows per block;  NUM_WAVES  waves per block (WAVE_SIZE: platform.h on CUDA,
//             -D on AMD);  the element type (platform.h);  IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP,
//             HAS_ALIBI, IS_VARLEN, IS_PAGED (attention_common.h);  HAS_SINKS

#include "attention_common.h"

#define NUM_THREADS (NUM_WAVES * WAVE_SIZE)
#define ROWS_PER_WAVE (BLOCK_M / NUM_WAVES)
#define ROW_GROUPS (WAVE_SIZE / BLOCK_N)
#define ROWS_PER_LANE (ROWS_PER_WAVE / ROW_GROUPS)
#define D_PER_LANE (HEAD_DIM / WAVE_SIZE)
// Odd row stride for K: the BLOCK_N lanes of a group read dim d of BLOCK_N different keys, which
// then fall in different banks. Q: one row per group at a time, a broadcast with one group; with
// more, the groups read different rows, likewise spread by an odd stride. V (consecutive dims)
// needs none.
#define K_STRIDE (HEAD_DIM + 1)
#define Q_STRIDE (ROW_GROUPS == 1 ? HEAD_DIM : HEAD_DIM + 1)

static_assert(WAVE_SIZE % BLOCK_N == 0, "a wave holds whole groups of BLOCK_N lanes");
static_assert(BLOCK_M % NUM_WAVES == 0 && ROWS_PER_WAVE % ROW_GROUPS == 0, "rows split evenly");
static_assert(HEAD_DIM % WAVE_SIZE == 0, "each lane owns whole head dims");

#include "simt_tile.h"

// ---- shared-memory layout (float32) ------------------------------------------------------------
// sQ [BLOCK_M][Q_STRIDE] | sK [BLOCK_N][K_STRIDE] | sV [BLOCK_N][HEAD_DIM] | sP [BLOCK_M][BLOCK_N]
// | sRow [BLOCK_M] with more than one row group (the rescale factor in the loop, 1 / l in the
// epilogue). xattn/kernels.py (_simt_forward_smem) computes the same size; tests/test_kernels.py
// compares the two.
#define SROW_FLOATS (ROW_GROUPS == 1 ? 0 : BLOCK_M)
#define SMEM_BYTES ((BLOCK_M * Q_STRIDE + BLOCK_N * K_STRIDE + BLOCK_N * HEAD_DIM + BLOCK_M * BLOCK_N \
                     + SROW_FLOATS) * 4)

// ---- device helpers ---------------------------------------------------------------------------

// A value of each of the lane's S rows (x[i] of row group + i * ROW_GROUPS: alpha, 1 / l), handed
// to the lanes that own O's dims of the wave's rows. With one row group they are the same lanes:
// nothing to do. Else the group's lane of key 0 writes it to sRow, and after the caller's wave
// barrier row_value reads it back for any row of the wave.
__device__ __forceinline__ void share_rows(float* sRow_wave, const float (&x)[ROWS_PER_LANE],
                                           int group, int key) {
    if (ROW_GROUPS == 1 || key != 0) return;
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) sRow_wave[group + i * ROW_GROUPS] = x[i];
}

__device__ __forceinline__ void rescale(float (&o_row)[D_PER_LANE], float alpha) {
#pragma unroll
    for (int i = 0; i < D_PER_LANE; ++i) o_row[i] *= alpha;
}

__device__ __forceinline__ float row_value(const float* sRow_wave, const float (&x)[ROWS_PER_LANE],
                                           int r) {
    return ROW_GROUPS == 1 ? x[r % ROWS_PER_LANE] : sRow_wave[r];
}

// ---- the body, called by the vendors' entry points ------------------------------------------

__device__ __forceinline__ void flash_fwd_simt(const AttnParams& p) {
    // The parameter block (kernels_common/params.h), in this kernel's names.
    TENSOR_FROM_PARAMS(const elem_t, q, p.q);
    TENSOR_FROM_PARAMS(const elem_t, k, p.k);
    TENSOR_FROM_PARAMS(const elem_t, v, p.v);
    TENSOR_FROM_PARAMS(elem_t, o, p.o);
    TENSOR_FROM_PARAMS(float, lse, p.lse);
    ATTENTION_SCALARS_FROM_PARAMS(p);
    extern __shared__ float smem_f32[];
    float* sQ = smem_f32;
    float* sK = sQ + BLOCK_M * Q_STRIDE;
    float* sV = sK + BLOCK_N * K_STRIDE;
    float* sP = sV + BLOCK_N * HEAD_DIM;
    float* sRow = sP + BLOCK_M * BLOCK_N;

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / heads_per_kv;
    const int tid = threadIdx.x, wave = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int key = lane % BLOCK_N, group = lane / BLOCK_N;  // this lane's key and row group in S
    const int m_start = m_block * BLOCK_M;
    const int wave_row0 = m_start + wave * ROWS_PER_WAVE;  // the wave's first query row
    // The wave's rows of the per-row tiles; the lane's i-th S row is row group + i * ROW_GROUPS.
    const float* sQ_wave = sQ + wave * ROWS_PER_WAVE * Q_STRIDE;
    float* sP_wave = sP + wave * ROWS_PER_WAVE * BLOCK_N;
    float* sRow_wave = sRow + wave * ROWS_PER_WAVE;

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
    load_rows(sQ, Q_STRIDE, q, q_row_stride, BLOCK_M, seqlen_q - m_start, head_dim, tid);

    float acc_o[ROWS_PER_WAVE][D_PER_LANE];                // O rows of the wave, this lane's dims
    float row_max[ROWS_PER_LANE], row_sum[ROWS_PER_LANE];  // row_sum: this lane's keys only
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
        __syncthreads();  // every wave is done with the previous K and V tiles (and its P)
        load_kv_rows(sK, K_STRIDE, k, p, batch, k_batch_stride, k_row_stride, n_start, BLOCK_N, seqlen_k - n_start, head_dim, tid);
        load_kv_rows(sV, HEAD_DIM, v, p, batch, v_batch_stride, v_row_stride, n_start, BLOCK_N, seqlen_k - n_start, head_dim, tid);
        __syncthreads();  // K and V tiles (and, the first time, Q) visible to every wave

        // S = Q K^T: this lane's key against its rows.
        float s[ROWS_PER_LANE];
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) s[i] = 0.f;
        for (int d = 0; d < head_dim; ++d) {
            const float k_d = sK[key * K_STRIDE + d];
#pragma unroll
            for (int i = 0; i < ROWS_PER_LANE; ++i)
                s[i] = fmaf(sQ_wave[(group + i * ROW_GROUPS) * Q_STRIDE + d], k_d, s[i]);
        }

        // Modifiers and mask, then the online softmax update (see softmax_rescale_o in flash_fwd.cu).
        float alpha[ROWS_PER_LANE];
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) {
            const int row = group + i * ROW_GROUPS;  // within the wave
            s[i] = modified_score(s[i], wave_row0 + row, n_start + key, mods, true);
            const float m_new = group_max<BLOCK_N>(fmaxf(row_max[i], s[i]));
            const bool row_empty = m_new == NEG_INF;  // no key seen yet: offset 0 keeps exp2 from NaN
            const float offset = row_empty ? 0.f : m_new * scale_log2;
            alpha[i] = row_empty ? 1.f : fast_exp2((row_max[i] - m_new) * scale_log2);
            row_max[i] = m_new;
            const float p = fast_exp2(s[i] * scale_log2 - offset);
            row_sum[i] = row_sum[i] * alpha[i] + p;
            sP_wave[row * BLOCK_N + key] = p;
            if (ROW_GROUPS == 1) rescale(acc_o[i], alpha[i]);  // O = alpha O: S rows are O rows
        }
        share_rows(sRow_wave, alpha, group, key);
        wave_barrier();  // the wave's P (and alpha) visible to all its lanes

        // O = alpha O (with row groups: alpha from sRow) + P V: this lane's dims of the wave's rows.
        if (ROW_GROUPS > 1)
#pragma unroll
            for (int r = 0; r < ROWS_PER_WAVE; ++r) rescale(acc_o[r], sRow_wave[r]);
        for (int n = 0; n < BLOCK_N; ++n) {
            float v_n[D_PER_LANE];
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) v_n[i] = sV[n * HEAD_DIM + lane + i * WAVE_SIZE];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WAVE; ++r) {
                const float p = sP_wave[r * BLOCK_N + n];
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) acc_o[r][i] = fmaf(p, v_n[i], acc_o[r][i]);
            }
        }
        // No barrier here: the two block barriers at the top of the next tile come before its
        // P and alpha overwrite these.
    }

    // Epilogue: l = the group's sum; lse = scale * m + ln(l), with the sink folded in (HAS_SINKS:
    // fold_sink also scales 1 / l); 1 / l to the lanes that own the dims. A row that saw no key
    // has l = 0: O = 0, lse = -inf (the sink's logit with a sink).
    const float sink = HAS_SINKS ? p.sinks[head] : 0.f;
    float inv_l[ROWS_PER_LANE];
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) {
        const int row = wave_row0 + group + i * ROW_GROUPS;
        const float l = group_sum<BLOCK_N>(row_sum[i]);
        inv_l[i] = l != 0.f ? 1.f / l : 0.f;
        float row_lse = l != 0.f ? row_max[i] * scale + logf(l) : NEG_INF;
        if (HAS_SINKS) row_lse = fold_sink(row_lse, sink, &inv_l[i]);
        if (key == 0 && row < seqlen_q) lse[row] = row_lse;
    }
    if (ROW_GROUPS > 1) {
        wave_barrier();  // every lane of the wave is done reading sRow as rescale factors
        share_rows(sRow_wave, inv_l, group, key);
        wave_barrier();  // 1 / l of the wave's rows visible to all its lanes
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WAVE; ++r) {
        const int row = wave_row0 + r;
        const float inv_l_r = row_value(sRow_wave, inv_l, r);
        if (row < seqlen_q) {
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) {
                const int col = lane + i * WAVE_SIZE;
                if (col < head_dim) o[row * o_row_stride + col] = from_float(acc_o[r][i] * inv_l_r);
            }
        }
    }
}
