// Flash-decoding on tensor cores: fp16/bf16 queries against a KV cache (contiguous or paged).
// The algorithm, grid, key layout, append, masks and sinks are described in decode_common.h.
// Here: S = Q K^T and O += P V on mma.sync m16n8k16 fed by ldmatrix (mma_tile.h), P kept in
// registers between the two products.
//
// FP8 caches (KV_FP8): K and V stay FP8 codes in the ring, and ldmatrix reads them as if they
// were 16-bit elements of two codes each; each fragment register is then converted in registers
// to float16 (platform.h, fp8x2_to_half2: one instruction a pair), exactly, and both products run
// in float16 whatever the query type: Q's tile is float16 (scaled by a power of two,
// decode_common.h q_tile_scale) and P is packed to float16. Nothing is staged through shared
// memory a second time.
//   S = Q K^T: lane (g = lane / 4, t = lane % 4) of a plain ldmatrix holds codes 4t..4t+3 of key
//     row g, which serve as head-dim positions 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1) of the k16 step.
//     Q's tile holds the same permutation of each 16 columns (decode_common.h, fp8_q_slot); the
//     sum over the head dim does not depend on the order.
//   O += P V: a transposed ldmatrix gives lane (g, t) codes 2g, 2g+1 of key rows 2t and 2t+1; one
//     byte permutation pairs the two keys of head-dim column 2g (the even n8 tile of O) and of
//     column 2g+1 (the odd one). O's columns are put back in place by the epilogue (fp8_o_store).
// tests/test_decode_fp8_fragments.py checks these maps on the CPU against a model of ldmatrix and
// mma.sync.
//
// Reads q, the caches (and k_new, v_new, cache_seqlens, block_table, sinks); writes the new rows
// into the caches, and o and lse (one split) or o_part and lse_part (several: flash_decode_merge.cu).
// Layouts: q, o (B, Hq, Sq, D); lse (B, Hq, Sq) float32, natural log; o_part (B, Hq, Sq,
// num_splits, HEAD_DIM) and lse_part (B, Hq, Sq, num_splits) float32, LSE there in base 2.

#define ELEM_F32 0
#ifndef RING_SWIZZLE  // the ring tiles' rows unpadded, their chunks permuted (decode_common.h)
#define RING_SWIZZLE 1   // (xattn/kernels.py turns it off where ptxas would spill)
#endif
#include "platform.h"
#include "../kernels_common/decode_common.h"

#define M_TILES (BLOCK_M / 16)  // m16 row tiles
#define D_TILES (HEAD_DIM / 8)  // n8 column tiles of O
static_assert(BLOCK_M % 16 == 0, "whole m16 tiles");
#include "mma_tile.h"
static_assert(WARP_N % 16 == 0 && HEAD_DIM % 16 == 0, "k16 steps over keys and head dim");

// ---- ldmatrix addresses in the swizzled ring tiles ---------------------------------------------
// Each lane gives the address of one 16-byte row of an 8 x 8 matrix: its own row of the tile
// (lane-dependent) and its own chunk (0 or 1), plus per fragment a whole number of 8-row groups and
// an even number of chunks. Adding multiples of 8 rows keeps the row's swizzle; adding an even
// number to a chunk of 0 or 1 is an XOR. Ring rows start on 128-byte boundaries (64- and 32-byte
// rows: on their own size), so the lane's address is its row's plus its swizzled chunk in the low
// bits, and a fragment's address is that XOR the chunk offset inside 128 bytes, plus whole
// 128-byte steps that fold into ldmatrix's immediate offset: one register per operand, as
// unswizzled tiles need.
__device__ __forceinline__ u32 ring_lane(u32 tile, int row, int chunk) {
    return tile + (u32)(row * CACHE_STRIDE * CACHE_BYTES + 16 * (chunk ^ ring_swizzle(row)));
}

// The lane's address in the fragment `rows` rows (a multiple of 8) and `chunks` 16-byte chunks
// (even) past its own. Each distinct XOR costs a register across the loop over keys, where a
// padded tile's offsets all fold into the immediate: the D64 FP8 variants of sm_80-sm_89 (64
// query rows, already at 255 registers) spill with it, so xattn/kernels.py compiles those
// unswizzled (RING_SWIZZLE = 0: padded rows, plain offsets).
__device__ __forceinline__ u32 ring_at(u32 lane_address, int rows, int chunks) {
    const u32 bytes = (u32)(16 * chunks);
#if RING_SWIZZLE
    return (lane_address ^ (bytes & 127u)) + (bytes & ~127u) + (u32)(rows * CACHE_STRIDE * CACHE_BYTES);
#else
    return lane_address + bytes + (u32)(rows * CACHE_STRIDE * CACHE_BYTES);
#endif
}

#if KV_FP8
static_assert(HEAD_DIM % 32 == 0, "FP8: ldmatrix.x4 covers two 16-code chunks of a row");

// The ldmatrix rows of the FP8 ring tiles.
// K (plain): matrix i / 8 = (keys (lane / 16) * 8.., k16 step (lane / 8) % 2), row lane % 8.
__device__ __forceinline__ u32 fp8_k_lane(u32 tile, int lane) {
    return ring_lane(tile, (lane / 16) * 8 + lane % 8, lane / 8 % 2);
}
// V (transposed): matrix i / 8 = (keys ((lane / 8) % 2) * 8.., 16-code chunk lane / 16), row lane % 8.
__device__ __forceinline__ u32 fp8_v_lane(u32 tile, int lane) {
    return ring_lane(tile, (lane / 8 % 2) * 8 + lane % 8, lane / 16);
}

// C += Q K8^T for MT m16 tiles and NT n8 tiles of keys, Q from the (permuted) tile at q_lane
// (LANE_ROWS_X), K8 the codes of the ring tile (fp8_k_lane).
template <int MT, int NT, int K_STEPS>
__device__ __forceinline__ void mma_q_k8(float (&c)[MT][NT][4], u32 q_lane, u32 k_lane) {
#pragma unroll
    for (int kk = 0; kk < K_STEPS; kk += 2) {
        u32 a[2][MT][4];
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldmatrix_x4(a[s][mt], q_lane + tile_offset<TILE_STRIDE>(mt * 16, (kk + s) * 16));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            u32 r[4];  // keys 0-7 step kk | keys 0-7 step kk+1 | keys 8-15 step kk | keys 8-15 step kk+1
            ldmatrix_x4(r, ring_at(k_lane, np * 16, kk));  // kk is even: chunks kk, kk + 1
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const u32 lo0 = fp8x2_to_half2((u16)(r[s] & 0xffffu)), lo1 = fp8x2_to_half2((u16)(r[s] >> 16));
                const u32 hi0 = fp8x2_to_half2((u16)(r[2 + s] & 0xffffu)), hi1 = fp8x2_to_half2((u16)(r[2 + s] >> 16));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816_f16(c[mt][2 * np], a[s][mt], lo0, lo1);
                    mma_16816_f16(c[mt][2 * np + 1], a[s][mt], hi0, hi1);
                }
            }
        }
    }
}

// C += P V8, P in registers (K_STEPS k16 fragments per m16 tile), V8 the codes of the ring tile at
// v_lane (fp8_v_lane). Logical n8 tile 2c of C is head-dim column 16c' + 2n of V (c' = c), tile
// 2c+1 column 16c' + 2n + 1 (fp8_o_store).
template <int MT, int NT, int K_STEPS>
__device__ __forceinline__ void mma_p_v8(float (&c)[MT][NT][4], const u32 (&a)[MT][K_STEPS][4], u32 v_lane) {
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk)
#pragma unroll
        for (int cp = 0; cp < NT / 4; ++cp) {
            u32 r[4];  // transposed: keys 0-7 chunk 2cp | keys 8-15 chunk 2cp | keys 0-7 2cp+1 | keys 8-15 2cp+1
            ldmatrix_x4_trans(r, ring_at(v_lane, kk * 16, 2 * cp));
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // bytes (key 2t col 2g, key 2t col 2g+1, key 2t+1 col 2g, key 2t+1 col 2g+1) ->
                // (2t, 2t+1) of column 2g in the low half, of column 2g+1 in the high half
                const u32 lo = byte_perm<0x3120>(r[2 * h]), hi = byte_perm<0x3120>(r[2 * h + 1]);
                const u32 even0 = fp8x2_to_half2((u16)(lo & 0xffffu)), even1 = fp8x2_to_half2((u16)(hi & 0xffffu));
                const u32 odd0 = fp8x2_to_half2((u16)(lo >> 16)), odd1 = fp8x2_to_half2((u16)(hi >> 16));
                const int dt = 2 * (2 * cp + h);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816_f16(c[mt][dt], a[mt][kk], even0, even1);
                    mma_16816_f16(c[mt][dt + 1], a[mt][kk], odd0, odd1);
                }
            }
        }
}
#else
// The 16-bit products are mma_tile.h's, with the ring tile's addresses for K and V (at(row, col):
// col in elements, a multiple of 16).
struct RingTile {
    u32 lane;  // ring_lane's address
    __device__ __forceinline__ u32 operator()(int row, int col) const { return ring_at(lane, row, col * CACHE_BYTES / 16); }
};
#endif

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
#if KV_FP8
    mma_q_k8<M_TILES, WARP_N / 8, HEAD_DIM / 16>(acc_s, q_lane, k_lane);  // S = Q K8^T
#else
    mma_a_bt_at<M_TILES, WARP_N / 8, HEAD_DIM / 16, TILE_STRIDE>(acc_s, q_lane, RingTile{k_lane});  // S = Q K^T
#endif

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
        for (int kk = 0; kk < WARP_N / 16; ++kk) {
#if KV_FP8  // float16 P for the float16 product with V's codes (pack_a_fragment's layout)
            const float(&lo)[4] = acc_s[mt][2 * kk];
            const float(&hi)[4] = acc_s[mt][2 * kk + 1];
            p_frag[mt][kk][0] = pack_half2(lo[0], lo[1]);
            p_frag[mt][kk][1] = pack_half2(lo[2], lo[3]);
            p_frag[mt][kk][2] = pack_half2(hi[0], hi[1]);
            p_frag[mt][kk][3] = pack_half2(hi[2], hi[3]);
#else
            pack_a_fragment(p_frag[mt][kk], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
#endif
        }
#if KV_FP8
    mma_p_v8<M_TILES, D_TILES, WARP_N / 16>(st.acc_o, p_frag, v_lane);  // O += P V8
#else
    mma_areg_b_at<M_TILES, D_TILES, WARP_N / 16>(st.acc_o, p_frag, RingTile{v_lane});  // O += P V
#endif
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_decode(const __grid_constant__ DecodeParams p) {
    extern __shared__ __align__(128) unsigned char smem[];  // ring rows on 128-byte boundaries (ring_lane)
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
    const float q_scale = load_q_tile(sQ, p, b, tid);  // 1, but under FP8 caches
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
    // ldmatrix row addresses: Q is the A operand of S = Q K^T (mma_tile.h), K's rows are those of
    // B^T, V is the row-major B of O += P V (FP8: the codes' own lane patterns, above). Ring slots
    // are a fixed number of bytes apart, and the swizzle repeats in each.
    const float factor = score_factor(p, src) / q_scale;  // exact: q_scale is a power of two
    const u32 q_lane = lane_address_x<TILE_STRIDE>(smem_addr(sQ), 0, 0, lane);
#if KV_FP8
    const u32 k_lane = fp8_k_lane(smem_addr(ring_warp), lane);
    const u32 v_lane = fp8_v_lane(smem_addr(ring_warp) + CACHE_TILE_BYTES, lane);
#else
    const u32 k_lane = ring_lane(smem_addr(ring_warp), lane % 8 + (lane / 16) * 8, lane / 8 % 2);
    const u32 v_lane = ring_lane(smem_addr(ring_warp) + CACHE_TILE_BYTES, lane % 16, lane / 16);
#endif

    for (int t = 0; t < steps; ++t) {
        issue_step(t + STAGES - 1);  // into the slot read in step t - 1 (released by the __syncwarp below)
        cp_async_wait<STAGES - 1>();
        __syncwarp();  // step t's tiles, copied by every lane, are visible to the whole warp
        const int n0 = warp_key0 + t * KEYS_PER_STAGE;
        // Masking is needed only where some row's band edge or the split's end falls in the tile.
        const bool needs_mask = n0 < b.full_lo || n0 + WARP_N > min(b.full_hi, b.key_end);
        const u32 slot_offset = (t % STAGES) * STAGE_BYTES;
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
#if KV_FP8
                    // O's columns back in place: n8 tiles 2c and 2c+1 hold, in this lane, columns
                    // 16c + 4t + (0, 2) and (1, 3): one float4 per 16 columns.
                    float* dst = sO + (mt * 16 + lane / 4 + h * 8) * OUT_STRIDE + (lane % 4) * 4;
#pragma unroll
                    for (int c = 0; c < HEAD_DIM / 16; ++c) {
                        float4 x = wt != 0.f ? make_float4(wt * st.acc_o[mt][2 * c][2 * h], wt * st.acc_o[mt][2 * c + 1][2 * h],
                                                           wt * st.acc_o[mt][2 * c][2 * h + 1], wt * st.acc_o[mt][2 * c + 1][2 * h + 1])
                                             : make_float4(0.f, 0.f, 0.f, 0.f);
                        if (w != 0) {
                            const float4 y = *(float4*)(dst + c * 16);
                            x.x += y.x;
                            x.y += y.y;
                            x.z += y.z;
                            x.w += y.w;
                        }
                        *(float4*)(dst + c * 16) = x;
                    }
#else
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
#endif
                }
        }
        __syncthreads();  // warp w's contribution is complete before warp w + 1 adds to it
    }
    write_rows(p, b, sO, sM, sL, src.v.scale, tid);
}
