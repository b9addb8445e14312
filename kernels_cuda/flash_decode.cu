// Flash-decoding on tensor cores: fp16/bf16 queries against a KV cache (contiguous or paged).
// The algorithm, grid, key layout, append, masks and sinks are described in decode_common.h.
// Here: S = Q K^T and O += P V on mma.sync m16n8k16 fed by ldmatrix (mma_tile.h), P kept in
// registers between the two products. FP8 caches (KV_FP8): the products read the warp's 16-bit
// conversion tiles instead of the ring slot.
//
// Reads q, the caches (and k_new, v_new, cache_seqlens, block_table, sinks); writes the new rows
// into the caches, and o and lse (one split) or o_part and lse_part (several: flash_decode_merge.cu).
// Layouts: q, o (B, Hq, Sq, D); lse (B, Hq, Sq) float32, natural log; o_part (B, Hq, Sq,
// num_splits, HEAD_DIM) and lse_part (B, Hq, Sq, num_splits) float32, LSE there in base 2.

#define ELEM_F32 0
#include "decode_common.h"

#define M_TILES (BLOCK_M / 16)  // m16 row tiles
#define D_TILES (HEAD_DIM / 8)  // n8 column tiles of O
static_assert(BLOCK_M % 16 == 0, "whole m16 tiles");
#include "mma_tile.h"
static_assert(WARP_N % 16 == 0 && HEAD_DIM % 16 == 0, "k16 steps over keys and head dim");

// ---- one warp's step on tensor cores ----------------------------------------------------------
// S = Q K^T for the warp's WARP_N keys, masked, turned into P; O is rescaled and O += P V.
// Thread layout (mma accumulators): rows mt * 16 + lane / 4 (+ 8), key columns nt * 8 + (lane % 4) * 2.
struct WarpState {
    float acc_o[M_TILES][D_TILES][4];
    float row_max[M_TILES][2];
    float row_sum[M_TILES][2];  // this thread's columns only; the quad is summed at the end
};

__device__ __forceinline__ void warp_step(WarpState& st, u32 q_lane, u32 k_lane, u32 v_lane, int n0,
                                          bool needs_mask, const int (&lo)[M_TILES][2],
                                          const int (&hi)[M_TILES][2], float factor, const DecodeParams& p,
                                          int lane) {
    float acc_s[M_TILES][WARP_N / 8][4];
    zero(acc_s);
    mma_a_bt<M_TILES, WARP_N / 8, HEAD_DIM / 16, TILE_STRIDE, TILE_STRIDE>(acc_s, q_lane, k_lane);  // S = Q K^T

#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int nt = 0; nt < WARP_N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float s = score_log2(acc_s[mt][nt][e], factor, p);
                if (needs_mask) {  // keys outside the row's band or past the split's end
                    const int key = n0 + nt * 8 + (lane % 4) * 2 + (e & 1);
                    if (key < lo[mt][e / 2] || key >= hi[mt][e / 2]) s = NEG_INF;
                }
                acc_s[mt][nt][e] = s;
            }

    // Online softmax; the four threads of a quad share a row, so the row max takes two shuffles.
    float alpha[M_TILES][2];
    bool max_moved = false;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float tile_max = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < WARP_N / 8; ++nt)
                tile_max = fmaxf(tile_max, fmaxf(acc_s[mt][nt][2 * h], acc_s[mt][nt][2 * h + 1]));
            tile_max = fmaxf(tile_max, shfl_xor(tile_max, 1));
            tile_max = fmaxf(tile_max, shfl_xor(tile_max, 2));
            max_moved |= tile_max > st.row_max[mt][h];
            float offset;
            alpha[mt][h] = update_max(st.row_max[mt][h], tile_max, offset);
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < WARP_N / 8; ++nt)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    const float p = fast_exp2(acc_s[mt][nt][e] - offset);
                    acc_s[mt][nt][e] = p;
                    sum += p;
                }
            st.row_sum[mt][h] = st.row_sum[mt][h] * alpha[mt][h] + sum;
        }
    if (warp_any(max_moved)) {  // O *= exp2(m_old - m_new), only when some row's max moved
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int dt = 0; dt < D_TILES; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) st.acc_o[mt][dt][e] *= alpha[mt][e / 2];
    }

    // P stays in registers: the accumulators of S are the A operand of O += P V.
    u32 p_frag[M_TILES][WARP_N / 16][4];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int kk = 0; kk < WARP_N / 16; ++kk) pack_a_fragment(p_frag[mt][kk], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
    mma_areg_b<M_TILES, D_TILES, WARP_N / 16, TILE_STRIDE>(st.acc_o, p_frag, v_lane);  // O += P V
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_decode(const __grid_constant__ DecodeParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    elem_t* sQ = (elem_t*)smem;
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

    WarpState st;
    zero(st.acc_o);
    int lo[M_TILES][2], hi[M_TILES][2];  // this thread's two rows per m16 tile
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = mt * 16 + lane / 4 + h * 8;
            lo[mt][h] = row_lo[row];
            hi[mt][h] = min(row_hi[row], b.key_end);
            st.row_max[mt][h] = NEG_INF;
            st.row_sum[mt][h] = 0.f;
        }
    // ldmatrix row addresses (mma_tile.h): Q is the A operand of S = Q K^T, K's rows are those of
    // B^T, V is the row-major B of O += P V. Ring slots are a fixed number of bytes apart; FP8
    // caches: the products read the warp's conversion tiles (K, then V), refilled every step.
    const float factor = score_factor(p, src);
#if KV_FP8
    elem_t* tiles = (elem_t*)(ring + RINGS_BYTES + warp * 2 * TILE_BYTES);
#else
    elem_t* tiles = (elem_t*)ring_warp;
#endif
    const u32 q_lane = lane_address_x<TILE_STRIDE>(smem_addr(sQ), 0, 0, lane);
    const u32 k_lane = lane_address_y<TILE_STRIDE>(smem_addr(tiles), 0, 0, lane);
    const u32 v_lane = lane_address_x<TILE_STRIDE>(smem_addr(tiles) + TILE_BYTES, 0, 0, lane);

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
        const u32 slot_offset = 0;
#else
        const u32 slot_offset = (t % STAGES) * STAGE_BYTES;
#endif
        warp_step(st, q_lane, k_lane + slot_offset, v_lane + slot_offset, n0, needs_mask, lo, hi, factor, p, lane);
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
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = st.row_sum[mt][h];
            l += shfl_xor(l, 1);
            l += shfl_xor(l, 2);
            if (lane % 4 == 0) {
                const int row = mt * 16 + lane / 4 + h * 8;
                sM[warp * BLOCK_M + row] = st.row_max[mt][h];
                sL[warp * BLOCK_M + row] = l;
            }
        }
    __syncthreads();  // every warp's m and l are visible

    float weight[M_TILES][2];  // 2^(m_w - m) for this thread's rows (0: nothing to add)
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = mt * 16 + lane / 4 + h * 8;
            float m = NEG_INF;
#pragma unroll
            for (int w = 0; w < NUM_WARPS; ++w) m = fmaxf(m, sM[w * BLOCK_M + row]);
            weight[mt][h] = st.row_max[mt][h] == NEG_INF ? 0.f : fast_exp2(st.row_max[mt][h] - m);
        }
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
        if (warp == w) {  // warp 0 stores, the others add
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float wt = weight[mt][h];
                    float* dst = sO + (mt * 16 + lane / 4 + h * 8) * OUT_STRIDE + (lane % 4) * 2;
#pragma unroll
                    for (int dt = 0; dt < D_TILES; ++dt) {
                        float2 x = wt != 0.f ? make_float2(wt * st.acc_o[mt][dt][2 * h], wt * st.acc_o[mt][dt][2 * h + 1])
                                             : make_float2(0.f, 0.f);
                        if (w != 0) {
                            const float2 y = *(float2*)(dst + dt * 8);
                            x.x += y.x;
                            x.y += y.y;
                        }
                        *(float2*)(dst + dt * 8) = x;
                    }
                }
        }
        __syncthreads();  // warp w's contribution is complete before warp w + 1 adds to it
    }
    write_rows(p, b, sO, sM, sL, src.v.scale, tid);
}
