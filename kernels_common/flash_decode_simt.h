// Flash-decoding without matrix instructions: every product a plain FMA over float32 tiles in
// shared memory (LDS). One body for both vendors, entered from kernels_cuda/flash_decode_f32.cu
// (float32 queries and caches on NVIDIA, FP8 caches too: exact, no tf32) and
// kernels_hip/flash_decode_portable.hip (every dtype on AMD where no MFMA/WMMA row serves, FP8 and
// paged caches; the test-only tests/hip_on_cuda.h runs it on NVIDIA too). The entry file includes
// its vendor's platform.h first: element type, wave size (a CUDA warp is a wave here), shuffles,
// exp2, the wave barrier, and the copies global -> shared (ASYNC_COPIES: cp.async on NVIDIA,
// synchronous on AMD).
//
// The algorithm, grid, key layout, append, masks, sinks, FP8 rules and split-KV partials are
// decode_common.h's (read it first): each wave owns WARP_N keys of every pipeline step, copies
// them into its own ring, and keeps (m_i, l_i, O) of all BLOCK_M rows; the waves are merged through
// shared memory at the end.
//
// Inside a wave, for S = Q K^T the lanes split into ROW_GROUPS groups of WARP_N: lane (g, n)
// scores key n of the wave's tile against rows g, g + ROW_GROUPS, ... (so a row's max and sum are
// reductions inside a group). For O += P V lane l owns head-dim columns l, l + WAVE_SIZE, ... of
// every row and takes each probability from the lane that scored it by a shuffle. NVIDIA's rows
// have one group (WARP_N = 32 = a warp: lane = key); AMD's wave64 rows several, which keeps a
// wave's tiles small enough for 64 KB of LDS.
//
// Reads q, the caches (and k_new, v_new, cache_seqlens, block_table, cache_leftpad, sinks,
// k_scale, v_scale); writes o and lse (one split) or o_part and lse_part (several), and, with the
// fused append (FUSED_APPEND, decode_common.h), the new rows into the caches.

// ---- compile-time configuration (set with -D by xattn/kernels.py, or by the entry file) --------
// decode_common.h's (HEAD_DIM, BLOCK_M, NUM_WARPS, WARP_N, STAGES, VEC_LOADS, SOFTCAP, PAGE_SIZE
// or IS_PAGED, KV_FP8, FUSED_APPEND, L2_PREFETCH); WARP_N divides the wave.

#define DECODE_SIMT 1
#include "decode_common.h"

#define ROW_GROUPS (WAVE_SIZE / WARP_N)
#define ROWS_PER_LANE (BLOCK_M / ROW_GROUPS)  // S rows of a lane
#define D_PER_LANE (HEAD_DIM / WAVE_SIZE)     // O columns of a lane

static_assert(WAVE_SIZE % WARP_N == 0, "a wave holds whole groups of WARP_N lanes");
static_assert(BLOCK_M % ROW_GROUPS == 0, "the row groups split the rows evenly");
static_assert(HEAD_DIM % WAVE_SIZE == 0, "each lane owns whole head-dim columns");
static_assert(FP8_TILES || CACHE_STRIDE == TILE_STRIDE, "the products read the ring in place");
#if ASYNC_COPIES
static_assert(ELEM_F32, "cp.async moves the elements as they are: float32 only");
#endif

#include "simt_tile.h"

// ---- shared-memory layout -----------------------------------------------------------------------
// decode_common.h's, with float32 tiles (sQ, and FP8_TILES's conversion tiles) and rings of ring_t.
// xattn/kernels.py computes the same size (_decode_smem on NVIDIA, _hip_decode_smem on AMD).

// ---- one wave's step ----------------------------------------------------------------------------

struct WarpState {
    float acc_o[BLOCK_M][D_PER_LANE];  // O, this lane's columns of every row
    float row_max[ROWS_PER_LANE];      // m_i of the lane's S rows, group + i * ROW_GROUPS
    float row_sum[ROWS_PER_LANE];      // l_i of those rows over this lane's keys only; the group
                                       // is summed at the end
};

// The row of the lane's i-th S row.
__device__ __forceinline__ int lane_row(int group, int i) { return group + i * ROW_GROUPS; }

__device__ __forceinline__ void warp_step(WarpState& st, const float* sQ, const float* sK,
                                          const float* sV, int n0, bool needs_mask, const int* row_lo,
                                          const int* row_hi, int key_end, float factor, const DecodeParams& p,
                                          int lane) {
    const int key = ROW_GROUPS == 1 ? lane : lane % WARP_N, group = ROW_GROUPS == 1 ? 0 : lane / WARP_N;
    float s[ROWS_PER_LANE];
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) s[i] = 0.f;
    // S = Q K^T: K by float4 (rows padded: no conflicts), Q broadcast. Several row groups: not
    // unrolled whole, or clang-19 keeps the lane's Q rows in registers across the steps (gfx942,
    // D64: 256 of them, and spills).
#if ROW_GROUPS > 1
#pragma unroll 4
#endif
    for (int d = 0; d < HEAD_DIM; d += 4) {
        const float4 kd = *(const float4*)(sK + key * TILE_STRIDE + d);
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) {
            const float4 qd = *(const float4*)(sQ + lane_row(group, i) * TILE_STRIDE + d);
            s[i] = fmaf(qd.x, kd.x, fmaf(qd.y, kd.y, fmaf(qd.z, kd.z, fmaf(qd.w, kd.w, s[i]))));
        }
    }
    // Mask, online softmax; O's rows rescaled by their alpha, which with several row groups comes
    // from the group that owns the row.
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) {
        const int r = lane_row(group, i);
        float s2 = score_log2(s[i], factor, p);
        if (needs_mask && (n0 + key < row_lo[r] || n0 + key >= min(row_hi[r], key_end))) s2 = NEG_INF;
        float offset;
        const float alpha = update_max(st.row_max[i], group_max<WARP_N>(s2), offset);
        s[i] = fast_exp2(s2 - offset);  // P
        st.row_sum[i] = st.row_sum[i] * alpha + s[i];
#pragma unroll
        for (int g = 0; g < ROW_GROUPS; ++g) {
            const float a = ROW_GROUPS == 1 ? alpha : shfl(alpha, g * WARP_N);
#pragma unroll
            for (int c = 0; c < D_PER_LANE; ++c) st.acc_o[lane_row(g, i)][c] *= a;
        }
    }
    for (int n = 0; n < WARP_N; ++n) {  // O += P V
        float vn[D_PER_LANE];
#pragma unroll
        for (int c = 0; c < D_PER_LANE; ++c) vn[c] = sV[n * TILE_STRIDE + lane + c * WAVE_SIZE];
#pragma unroll
        for (int i = 0; i < ROWS_PER_LANE; ++i) {
#pragma unroll
            for (int g = 0; g < ROW_GROUPS; ++g) {
                const float p = shfl(s[i], g * WARP_N + n);
#pragma unroll
                for (int c = 0; c < D_PER_LANE; ++c)
                    st.acc_o[lane_row(g, i)][c] = fmaf(p, vn[c], st.acc_o[lane_row(g, i)][c]);
            }
        }
    }
}

// ---- the body -----------------------------------------------------------------------------------

__device__ __forceinline__ void flash_decode_simt(const DecodeParams& p) {
    extern __shared__ __align__(16) unsigned char smem[];
    float* sQ = (float*)smem;
    int* row_lo = (int*)(smem + Q_BYTES);
    int* row_hi = row_lo + BLOCK_M;
    unsigned char* ring = smem + Q_BYTES + LIMIT_BYTES;  // K/V rings, later the merge scratch

    const int tid = threadIdx.x, warp = tid / WAVE_SIZE, lane = tid % WAVE_SIZE;
    const int key = ROW_GROUPS == 1 ? lane : lane % WARP_N, group = ROW_GROUPS == 1 ? 0 : lane / WARP_N;
    const DecodeBlock b = decode_block(p);
    const KeySource src = key_source(p, b);
#if FUSED_APPEND
    append_new_rows(p, src, tid);
#endif
    if (p.seqlen_q == 0) return;  // an append-only call

    // This warp's ring and its keys: the warp-th WARP_N keys of every pipeline step.
    const int steps = b.key_end > b.key_begin ? (b.key_end - b.key_begin + KEYS_PER_STAGE - 1) / KEYS_PER_STAGE : 0;
    ring_t* ring_warp = (ring_t*)(ring + warp * STAGES * STAGE_BYTES);
    const int warp_key0 = b.key_begin + warp * WARP_N;

    // Copies of step t into ring slot t % STAGES; one commit group per step, empty past the end,
    // so that cp_async_wait<STAGES - 1> always means "step t has landed".
    auto issue_step = [&](int t) {
        if (t < steps) {
            ring_t* slot = ring_warp + (t % STAGES) * (STAGE_BYTES / RING_BYTES);
            const int key0 = warp_key0 + t * KEYS_PER_STAGE;
            warp_load_keys(slot, slot + CACHE_TILE_BYTES / RING_BYTES, src, key0, b.key_end - key0, p.head_dim, lane);
        }
        cp_async_commit();
    };

    // Prologue: the first STAGES - 1 steps' copies are issued before Q is loaded, so that the Q
    // tile's load latency overlaps them.
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) issue_step(t);
    load_q_tile(sQ, p, b, tid);
    row_limits(row_lo, row_hi, p, b, tid);
    __syncthreads();  // sQ and the row limits are visible to every warp

    const float factor = score_factor(p, src);
#if FP8_TILES
    float* tiles = (float*)(ring + RINGS_BYTES + warp * 2 * TILE_BYTES);  // this warp's K, V tiles
#endif
    WarpState st;
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) {
        st.row_max[i] = NEG_INF;
        st.row_sum[i] = 0.f;
    }
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r)
#pragma unroll
        for (int c = 0; c < D_PER_LANE; ++c) st.acc_o[r][c] = 0.f;

    for (int t = 0; t < steps; ++t) {
        issue_step(t + STAGES - 1);  // into the slot read in step t - 1 (released by the barrier below)
        cp_async_wait<STAGES - 1>();
        wave_barrier();  // step t's tiles, copied by every lane, are visible to the whole wave
        const int n0 = warp_key0 + t * KEYS_PER_STAGE;
        // Masking is needed only where some row's band edge or the split's end falls in the tile.
        const bool needs_mask = n0 < b.full_lo || n0 + WARP_N > min(b.full_hi, b.key_end);
#if FP8_TILES
        const cache_t* slot = ring_warp + (t % STAGES) * (STAGE_BYTES / CACHE_BYTES);
        convert_tile(tiles, slot, lane);
        convert_tile(tiles + TILE_BYTES / 4, slot + CACHE_TILE_BYTES / CACHE_BYTES, lane);
        wave_barrier();  // the converted tiles are visible to the whole wave
        const float* sK = tiles;
#else
        const float* sK = ring_warp + (t % STAGES) * (STAGE_BYTES / RING_BYTES);
#endif
        warp_step(st, sQ, sK, sK + TILE_BYTES / 4, n0, needs_mask, row_lo, row_hi, b.key_end,
                  factor, p, lane);
        wave_barrier();  // every lane is done reading this slot before the next step refills it
    }

    // ---- epilogue: merge the warps' states, then write this split's rows ----
    // The warps add their weighted O, 2^(m_w - m) O_w, into one scratch tile in turn (warp order,
    // so the result does not depend on timing). A warp that saw no key of a row adds nothing.
    float* sO = (float*)ring;               // [BLOCK_M][OUT_STRIDE]
    float* sM = sO + BLOCK_M * OUT_STRIDE;  // [NUM_WARPS][BLOCK_M]
    float* sL = sM + NUM_WARPS * BLOCK_M;   // [NUM_WARPS][BLOCK_M]
    cp_async_wait<0>();
    __syncthreads();  // no copy is in flight and no warp reads its ring any more: it becomes scratch
#pragma unroll
    for (int i = 0; i < ROWS_PER_LANE; ++i) {
        const float l = group_sum<WARP_N>(st.row_sum[i]);
        if (key == 0) {
            sM[warp * BLOCK_M + lane_row(group, i)] = st.row_max[i];
            sL[warp * BLOCK_M + lane_row(group, i)] = l;
        }
    }
    __syncthreads();  // every warp's m and l are visible

#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
        if (warp == w) {  // warp 0 stores, the others add
#pragma unroll
            for (int r = 0; r < BLOCK_M; ++r) {
                float m = NEG_INF;  // warp-uniform: computed here, per row, to keep registers free
#pragma unroll
                for (int v = 0; v < NUM_WARPS; ++v) m = fmaxf(m, sM[v * BLOCK_M + r]);
                // This warp's m of row r: in the lane's registers with one row group, else read back.
                const float mw = ROW_GROUPS == 1 ? st.row_max[r % ROWS_PER_LANE] : sM[warp * BLOCK_M + r];
                const float wt = mw == NEG_INF ? 0.f : fast_exp2(mw - m);
#pragma unroll
                for (int c = 0; c < D_PER_LANE; ++c) {
                    float* dst = sO + r * OUT_STRIDE + lane + c * WAVE_SIZE;
                    const float x = wt != 0.f ? wt * st.acc_o[r][c] : 0.f;
                    *dst = w == 0 ? x : *dst + x;
                }
            }
        }
        __syncthreads();  // warp w's contribution is complete before warp w + 1 adds to it
    }
    write_rows(p, b, sO, sM, sL, src.v.scale, tid);
}
