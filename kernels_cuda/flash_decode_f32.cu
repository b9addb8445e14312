// Flash-decoding on CUDA cores: float32 queries against a float32 KV cache (contiguous or paged),
// exact (no tf32). The algorithm, grid, key layout, append, masks and sinks are described in
// decode_common.h. Here: lane = key for S = Q K^T (WARP_N = 32 keys per warp and step), lane =
// head-dim column for O += P V. FP8 caches (KV_FP8): the products read the warp's float32
// conversion tiles instead of the ring slot.
//
// Reads q, the caches (and k_new, v_new, cache_seqlens, block_table, sinks); writes the new rows
// into the caches, and o and lse (one split) or o_part and lse_part (several: flash_decode_merge.cu).

#define ELEM_F32 1
#include "decode_common.h"

static_assert(WARP_N == WARP_SIZE, "float32: lane = key");
static_assert(BLOCK_M <= WARP_SIZE, "float32: rows are registers of every lane");

#include "../kernels_common/simt_tile.h"

// ---- one warp's step on CUDA cores (float32) --------------------------------------------------
// Lane l computes the scores of key n0 + l against every row; for P V it owns head-dim columns
// l, l + 32, ... and takes each key's probability from that key's lane by a shuffle.
#define D_PER_LANE (HEAD_DIM / WARP_SIZE)
struct WarpState {
    float acc_o[BLOCK_M][D_PER_LANE];
    float row_max[BLOCK_M];
    float row_sum[BLOCK_M];  // this lane's keys only; the warp is summed at the end
};

__device__ __forceinline__ void warp_step(WarpState& st, const float* sQ, const float* sK,
                                          const float* sV, int n0, bool needs_mask, const int* row_lo,
                                          const int* row_hi, int key_end, float factor, const DecodeParams& p,
                                          int lane) {
    float s[BLOCK_M];
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r) s[r] = 0.f;
    for (int d = 0; d < HEAD_DIM; d += 4) {  // S = Q K^T: K by float4 (rows padded: no conflicts), Q broadcast
        const float4 kd = *(const float4*)(sK + lane * TILE_STRIDE + d);
#pragma unroll
        for (int r = 0; r < BLOCK_M; ++r) {
            const float4 qd = *(const float4*)(sQ + r * TILE_STRIDE + d);
            s[r] = fmaf(qd.x, kd.x, fmaf(qd.y, kd.y, fmaf(qd.z, kd.z, fmaf(qd.w, kd.w, s[r]))));
        }
    }
    const int key = n0 + lane;
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r) {
        float s2 = score_log2(s[r], factor, p);
        if (needs_mask && (key < row_lo[r] || key >= min(row_hi[r], key_end))) s2 = NEG_INF;
        float offset;
        const float alpha = update_max(st.row_max[r], group_max(s2), offset);
        s[r] = fast_exp2(s2 - offset);  // P
        st.row_sum[r] = st.row_sum[r] * alpha + s[r];
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) st.acc_o[r][i] *= alpha;
    }
    for (int n = 0; n < WARP_N; ++n) {  // O += P V
        float vn[D_PER_LANE];
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) vn[i] = sV[n * TILE_STRIDE + lane + i * WARP_SIZE];
#pragma unroll
        for (int r = 0; r < BLOCK_M; ++r) {
            const float p = __shfl_sync(FULL_MASK, s[r], n);
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) st.acc_o[r][i] = fmaf(p, vn[i], st.acc_o[r][i]);
        }
    }
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_decode_f32(const __grid_constant__ DecodeParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    float* sQ = (float*)smem;
    int* row_lo = (int*)(smem + Q_BYTES);
    int* row_hi = row_lo + BLOCK_M;
    unsigned char* ring = smem + Q_BYTES + LIMIT_BYTES;  // K/V rings, later the merge scratch

    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const DecodeBlock b = decode_block(p);
    const KeySource src = key_source(p, b);
    append_new_rows(p, src, tid);
    if (p.seqlen_q == 0) return;  // an append-only call

    // This warp's ring and its keys: the warp-th WARP_N keys of every pipeline step.
    const int steps = b.key_end > b.key_begin ? (b.key_end - b.key_begin + KEYS_PER_STAGE - 1) / KEYS_PER_STAGE : 0;
    cache_t* ring_warp = (cache_t*)(ring + warp * STAGES * STAGE_BYTES);
    const int warp_key0 = b.key_begin + warp * WARP_N;

    // Copies of step t into ring slot t % STAGES; one commit group per step, empty past the end,
    // so that cp_async_wait<STAGES - 1> always means "step t has landed".
    auto issue_step = [&](int t) {
        if (t < steps) {
            cache_t* slot = ring_warp + (t % STAGES) * (STAGE_BYTES / CACHE_BYTES);
            const int key0 = warp_key0 + t * KEYS_PER_STAGE;
            warp_load_keys(slot, slot + CACHE_TILE_BYTES / CACHE_BYTES, src, key0, b.key_end - key0, p.head_dim, lane);
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
#if KV_FP8
    float* tiles = (float*)(ring + RINGS_BYTES + warp * 2 * TILE_BYTES);  // this warp's K, V tiles
#endif
    WarpState st;
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r) {
        st.row_max[r] = NEG_INF;
        st.row_sum[r] = 0.f;
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) st.acc_o[r][i] = 0.f;
    }

    for (int t = 0; t < steps; ++t) {
        issue_step(t + STAGES - 1);  // into the slot read in step t - 1 (released by the __syncwarp below)
        cp_async_wait<STAGES - 1>();
        __syncwarp();  // step t's tiles, copied by every lane, are visible to the whole warp
        const int n0 = warp_key0 + t * KEYS_PER_STAGE;
        // Masking is needed only where some row's band edge or the split's end falls in the tile.
        const bool needs_mask = n0 < b.full_lo || n0 + WARP_N > min(b.full_hi, b.key_end);
#if KV_FP8
        const cache_t* slot = ring_warp + (t % STAGES) * (STAGE_BYTES / CACHE_BYTES);
        convert_tile(tiles, slot, lane);
        convert_tile(tiles + TILE_BYTES / ELEM_BYTES, slot + CACHE_TILE_BYTES / CACHE_BYTES, lane);
        __syncwarp();  // the converted tiles are visible to the whole warp
        const float* sK = tiles;
#else
        const float* sK = ring_warp + (t % STAGES) * (STAGE_BYTES / ELEM_BYTES);
#endif
        warp_step(st, sQ, sK, sK + TILE_BYTES / ELEM_BYTES, n0, needs_mask, row_lo, row_hi, b.key_end,
                  factor, p, lane);
        __syncwarp();  // every lane is done reading this slot before the next step refills it
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
    for (int r = 0; r < BLOCK_M; ++r) {
        const float l = group_sum(st.row_sum[r]);
        if (lane == 0) {
            sM[warp * BLOCK_M + r] = st.row_max[r];
            sL[warp * BLOCK_M + r] = l;
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
                const float wt = st.row_max[r] == NEG_INF ? 0.f : fast_exp2(st.row_max[r] - m);
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) {
                    float* dst = sO + r * OUT_STRIDE + lane + i * WARP_SIZE;
                    const float x = wt != 0.f ? wt * st.acc_o[r][i] : 0.f;
                    *dst = w == 0 ? x : *dst + x;
                }
            }
        }
        __syncthreads();  // warp w's contribution is complete before warp w + 1 adds to it
    }
    write_rows(p, b, sO, sM, sL, src.v.scale, tid);
}
