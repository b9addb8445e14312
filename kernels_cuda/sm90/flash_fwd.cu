// FlashAttention forward for Hopper (sm_90a): TMA, wgmma and warp specialization (FA3's design).
//
// O = softmax(scale * Q K^T + modifiers) V, one block of BLOCK_M = 128 query rows per CTA. Three
// warpgroups with fixed roles:
//  - the producer (warpgroup 0): gives up registers (setmaxnreg.dec), and one thread of it issues
//    the TMA loads: the Q block once, then the K and V tiles into a ring of STAGES shared-memory
//    stages. Each stage has a "full" mbarrier (the copy engine completes it with the tile's byte
//    count) and an "empty" one (each consumer warp arrives when its wgmmas are done reading).
//  - two consumers (warpgroups 1 and 2, setmaxnreg.inc), each owning 64 query rows:
//      S = Q K^T        wgmma, both operands in shared memory (SS), f32 accumulators
//      mask, modifiers  attention_common.h: the band (causal, windows), softcap, ALiBi
//      online softmax   running row max m_i and sum l_i in registers, exp2 with the scale folded
//      O += P V         wgmma with P from registers (RS): S's accumulators, packed to 16 bits,
//                       already have the A-operand layout (hopper.h: acc_to_a_operand)
//    then O /= l_i, written through shared memory by a TMA store, and lse.
// Overlaps (compile-time switches; each row of xattn/sm90.py sets its own, as measured):
//  - OVERLAP (inside a warpgroup): S of tile j is issued together with P V of tile j - 1, and the
//    softmax of tile j runs while that P V is still on the tensor cores (wgmma.wait_group 1).
//  - PINGPONG (between the two consumers): named barriers make them take turns issuing their
//    GEMMs, so one's softmax runs while the other's GEMMs occupy the tensor cores.
//
// Grid: x = query block (reversed, so the heaviest causal blocks start first), y = query head,
// z = batch entry (+ batch_offset). Key tiles are visited right to left, so the tiles that need
// masking (the end of the keys, the causal diagonal) come first; tiles outside the band of the
// block are never loaded (attention_common.h: key_tiles).
//
// Packed variable-length batches (IS_VARLEN): q, k, v, o are (1, H, T, D) views, sequence b is rows
// [cu_seqlens[b], cu_seqlens[b + 1]) (attention_common.h: sequence), blockIdx.z is the sequence and
// the grid covers the longest one. The maps span all T rows, so a tile that runs past its
// sequence's end loads the next sequence's rows (or zeros past T): their keys are masked like any
// key past seqlen_k, and, so that a non-finite value there cannot reach this sequence's O as
// 0 * inf, the second producer warp zeroes those rows of the V tile before the consumers read it
// (the last key tile is the first one visited; bars.v_tail). O is stored row by row from the
// registers, only the sequence's rows: a TMA box would write into the next sequence.
//
// Sinks (HAS_SINKS, GPT-OSS): the epilogue folds sink_h into each row's lse and O's
// normalization (attention_common.h: fold_sink); no tile sees them.
//
// Layouts: q, o (B, Hq, Sq, D) and k, v (B, Hk, Sk, D), any batch/head/row strides (multiples of
// 16 bytes), D contiguous: each is a 4-D tensor map (D, S, H, B) with boxes of 64 columns (128
// bytes, the widest box under 128-byte swizzle) by BLOCK_M or BLOCK_N rows. The copy engine zero-
// fills rows past S and columns past the real head dim, so padding never reaches a result, and the
// TMA store of O writes nothing outside the tensor. GQA: query head h reads key/value head
// h / heads_per_kv. lse: float32 (B, Hq, Sq), natural log: lse = scale * m_i + ln(l_i). Internally
// the softmax is base 2: p = exp2(s * scale_log2 - m_i * scale_log2), one FFMA and one MUFU.EX2.
// Reads q, k, v; writes o and lse. Rows that see no key get O = 0 and lse = -inf.
//
// Registers per thread, by role (ptxas, sm_90a: 168 kernel-wide = 65536 / 384 at launch, no spills,
// no stack, in every row): producer PRODUCER_REGS = 24, consumers CONSUMER_REGS = 240 (24 * 128 +
// 240 * 256 = 64512 = 168 * 384: the registers the producer gives up are exactly those the
// consumers take; setmaxnreg.inc would wait forever for more).

// ---- compile-time configuration (set with -D by xattn/kernels.py) ---------------------------
// ELEM_BF16   1: bfloat16, 0: float16
// HEAD_DIM    padded head dim of this row (a multiple of 64); the real one, head_dim, is <= it
// BLOCK_N     keys per tile (a multiple of 16, at most 256)
// STAGES      K/V tiles in flight
// OVERLAP, PINGPONG: the overlaps above (default 1)
// IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN: masks, modifiers and packed batches
//             (attention_common.h)
// HAS_SINKS   1: p.sinks holds float32 (Hq,) sink logits

#include "../platform.h"
#include "../../kernels_common/params.h"
#include "../../kernels_common/attention_common.h"
#include "hopper.h"

#ifndef OVERLAP
#define OVERLAP 1
#endif
#ifndef PINGPONG
#define PINGPONG 1
#endif

#define NUM_CONSUMERS 2                          // consumer warpgroups
#define BLOCK_M (NUM_CONSUMERS * WGMMA_M)        // query rows per CTA
#define NUM_THREADS ((NUM_CONSUMERS + 1) * WARPGROUP_THREADS)
#define CONSUMER_WARPS (NUM_CONSUMERS * WARPGROUP_THREADS / WARP_SIZE)
#define PRODUCER_REGS 24
#define CONSUMER_REGS 240
#define D_CHUNKS (HEAD_DIM / SWIZZLE_ELEMS)      // 64-column boxes per row
#define S_REGS (BLOCK_N / 2)                     // f32 values of S per consumer thread
#define O_REGS (HEAD_DIM / 2)                    // f32 values of O per consumer thread
#define P_STEPS (BLOCK_N / WGMMA_K)              // k16 steps of O += P V

static_assert(HEAD_DIM % SWIZZLE_ELEMS == 0 && HEAD_DIM <= 256, "head dim: whole 64-column boxes, one wgmma wide");
static_assert(BLOCK_N % WGMMA_K == 0 && BLOCK_N <= 256, "key tile: whole k16 steps, one wgmma wide");
static_assert(PRODUCER_REGS * WARPGROUP_THREADS + CONSUMER_REGS * NUM_CONSUMERS * WARPGROUP_THREADS <=
              (65536 / NUM_THREADS) / 8 * 8 * NUM_THREADS, "setmaxnreg: the consumers take what the producer frees");

// ---- shared-memory layout ---------------------------------------------------------------------
// (1024-byte aligned; xattn/kernels.py computes the same size)
// sQ   D_CHUNKS boxes of BLOCK_M rows x 128 bytes; consumer c's rows start at c * 64. Reused for O.
// sK   STAGES tiles of D_CHUNKS boxes of BLOCK_N rows x 128 bytes;  sV: the same
// bars q_full, k_full[STAGES], v_full[STAGES], k_empty[STAGES], v_empty[STAGES], v_tail (8 bytes each)
#define Q_BOX_BYTES (BLOCK_M * SWIZZLE_BYTES)
#define KV_BOX_BYTES (BLOCK_N * SWIZZLE_BYTES)
#define Q_BYTES (D_CHUNKS * Q_BOX_BYTES)
#define KV_BYTES (D_CHUNKS * KV_BOX_BYTES)
#define SMEM_Q 0
#define SMEM_K (SMEM_Q + Q_BYTES)
#define SMEM_V (SMEM_K + STAGES * KV_BYTES)
#define SMEM_BARS (SMEM_V + STAGES * KV_BYTES)

struct Barriers {
    u32 q_full;
    u32 k_full, v_full, k_empty, v_empty;  // stage s: + 8 s
    u32 v_tail;                            // IS_VARLEN: the first V tile's rows past the sequence are zero
};

__device__ __forceinline__ Barriers barriers(u32 base) {
    Barriers b;
    b.q_full = base;
    b.k_full = base + 8;
    b.v_full = b.k_full + 8 * STAGES;
    b.k_empty = b.v_full + 8 * STAGES;
    b.v_empty = b.k_empty + 8 * STAGES;
    b.v_tail = b.v_empty + 8 * STAGES;
    return b;
}

// Named barriers (0 is __syncthreads): the pingpong turn of each consumer, then each consumer's
// epilogue.
#define BAR_TURN 1
#define BAR_EPILOGUE (BAR_TURN + NUM_CONSUMERS)
#define TURN_THREADS (2 * WARPGROUP_THREADS)  // the waiting consumer and the one handing over

// ---- device helpers ---------------------------------------------------------------------------

// Which stage of the ring the i-th tile of a CTA uses, and the parity of that stage's i-th use.
__device__ __forceinline__ int stage_of(int i) { return i % STAGES; }
__device__ __forceinline__ int phase_of(int i) { return (i / STAGES) & 1; }

// S = Q K^T for the warpgroup's 64 rows: HEAD_DIM / 16 k steps, each 32 bytes further into a
// 128-byte row of both tiles (the next 64 columns are the next box).
__device__ __forceinline__ void issue_qk(float (&s)[S_REGS], u32 q_rows, u32 k_tile) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / WGMMA_K; ++kk) {
        const u32 box = kk / (SWIZZLE_ELEMS / WGMMA_K), step = (kk % (SWIZZLE_ELEMS / WGMMA_K)) * WGMMA_K * 2;
        Wgmma<BLOCK_N>::ss(s, smem_descriptor(q_rows + box * Q_BOX_BYTES + step, 16),
                           smem_descriptor(k_tile + box * KV_BOX_BYTES + step, 16), kk > 0);
    }
    wgmma_commit();
}

// O += P V: BLOCK_N / 16 k steps over the keys, two swizzle atoms (16 rows of V) each; V is the
// N-major B operand, its next 64 columns one box (KV_BOX_BYTES) further.
__device__ __forceinline__ void issue_pv(float (&o)[O_REGS], const u32 (&p)[P_STEPS][4], u32 v_tile) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < P_STEPS; ++kk)
        Wgmma<HEAD_DIM>::rs<1>(o, p[kk], smem_descriptor(v_tile + kk * 2 * SWIZZLE_ATOM_BYTES, KV_BOX_BYTES), true);
    wgmma_commit();
}

// A consumer warp is done reading a stage: one arrival per warp (the barrier counts CONSUMER_WARPS).
__device__ __forceinline__ void release(u32 bar) {
    if (threadIdx.x % WARP_SIZE == 0) mbar_arrive(bar);
}

// Raw dot products -> scores: softcap, ALiBi, and -inf outside the band where the tile crosses an
// edge of it or the end of the keys (attention_common.h: modified_score).
__device__ __forceinline__ void modify_scores(float (&s)[S_REGS], int row_start, int n_start, const ScoreMods& mods,
                                              bool check_mask, int t) {
#pragma unroll
    for (int i = 0; i < S_REGS; ++i)
        s[i] = modified_score(s[i], row_start + acc_row(i, t), n_start + acc_col(i, t), mods, check_mask);
}

// Online softmax step: fold this tile's scores into the running max m_i and sum l_i of the
// thread's two rows, turn S into P in place (still f32), and return in alpha the factor that
// rescales O: exp2(m_old - m_new), in the scaled units. The four lanes of a quad share a row, so
// the row max needs two shuffles; the row sum stays per thread until the epilogue.
__device__ __forceinline__ void online_softmax(float (&s)[S_REGS], float (&m_i)[2], float (&l_i)[2], float (&alpha)[2],
                                               float scale_log2) {
    float offset[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float m_new = m_i[h];
#pragma unroll
        for (int i = 0; i < S_REGS; ++i)
            if (acc_half(i) == h) m_new = fmaxf(m_new, s[i]);
        m_new = fmaxf(m_new, shfl_xor(m_new, 1));
        m_new = fmaxf(m_new, shfl_xor(m_new, 2));
        // A row that has seen no key yet keeps m = -inf: use 0 as the offset so that
        // exp2(-inf - offset) is 0 rather than exp2(-inf + inf) = NaN.
        const bool row_empty = m_new == NEG_INF;
        offset[h] = row_empty ? 0.f : m_new * scale_log2;
        alpha[h] = row_empty ? 1.f : fast_exp2((m_i[h] - m_new) * scale_log2);
        m_i[h] = m_new;
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < S_REGS; ++i) {
        s[i] = fast_exp2(s[i] * scale_log2 - offset[acc_half(i)]);
        sum[acc_half(i)] += s[i];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l_i[h] = l_i[h] * alpha[h] + sum[h];
}

__device__ __forceinline__ void rescale_o(float (&o)[O_REGS], const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < O_REGS; ++i) o[i] *= alpha[acc_half(i)];
}

// Pingpong: wait for this consumer's turn to issue GEMMs / hand the turn to the other one. The
// second consumer hands over one turn fewer than it takes (its first turn is given at the start),
// so every arrival is matched by a sync before the CTA ends.
__device__ __forceinline__ void take_turn(int consumer) {
    if (PINGPONG) named_barrier_sync(BAR_TURN + consumer, TURN_THREADS);
}
__device__ __forceinline__ void hand_over_turn(int consumer, bool last) {
    if (PINGPONG && !(consumer == NUM_CONSUMERS - 1 && last))
        named_barrier_arrive(BAR_TURN + (consumer + 1) % NUM_CONSUMERS, TURN_THREADS);
}

// The consumer's per-CTA constants.
struct ConsumerCtx {
    int consumer, t;           // consumer warpgroup 0/1, thread within it
    int row_start;             // first query row of the warpgroup (in its sequence)
    u32 q_rows, k_tiles, v_tiles;
    Barriers bars;
    ScoreMods mods;
    float scale_log2;
    bool v_tail;               // the first tile's V waits for bars.v_tail too (IS_VARLEN)
};

// The consumers may read the V tile of the CTA's i-th key tile (stage st, parity phase).
__device__ __forceinline__ void wait_v(const ConsumerCtx& c, int i, int st, int phase) {
    mbar_wait(c.bars.v_full + 8 * st, phase);
    if (IS_VARLEN && i == 0 && c.v_tail) mbar_wait(c.bars.v_tail, 0);
}

// S of tile `tile` (the i-th of the CTA) is ready in s: mask and modify it.
__device__ __forceinline__ void score_tile(float (&s)[S_REGS], const ConsumerCtx& c, int tile) {
    const int n_start = tile * BLOCK_N;
    const bool needs_mask = tile_needs_mask(c.row_start, WGMMA_M, n_start, BLOCK_N, c.mods.seqlen_k, c.mods.band);
    if (HAS_SOFTCAP || HAS_ALIBI || needs_mask) modify_scores(s, c.row_start, n_start, c.mods, needs_mask, c.t);
}

// Epilogue: O /= l, and lse = scale * m + ln(l) (with the sink folded in, HAS_SINKS). A row that
// saw no key has l = 0: it gets O = 0, lse = -inf (or the sink). A NaN that reached the row makes l
// NaN, and O and lse come out NaN. O goes through the warpgroup's rows of sQ (swizzled as the TMA
// store reads them) and a TMA store per 64-column box; in a packed batch, straight from the
// registers to the sequence's rows (q_start: its first row in the tensors).
__device__ __forceinline__ void write_output(const ConsumerCtx& c, float (&o)[O_REGS], const float (&m_i)[2],
                                             const float (&l_i)[2], const TmaDesc* tm_o, const AttnParams& p,
                                             u32 smem_q, int head, int batch, int seqlen_q, int q_start) {
    const float sink = HAS_SINKS ? p.sinks[head] : 0.f;
    float inv_l[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = l_i[h];
        l += shfl_xor(l, 1);
        l += shfl_xor(l, 2);
        inv_l[h] = l != 0.f ? 1.f / l : 0.f;
        float row_lse = l != 0.f ? m_i[h] * p.scale + logf(l) : NEG_INF;
        if (HAS_SINKS) row_lse = fold_sink(row_lse, sink, &inv_l[h]);
        const int row = c.row_start + acc_row_of_half(h, c.t);
        if (c.t % 4 == 0 && row < seqlen_q) {
            float* lse = (float*)p.lse.ptr + batch * p.lse.batch_stride + head * p.lse.head_stride +
                         (i64)(q_start + row) * p.lse.row_stride;
            *lse = row_lse;
        }
    }
    if (IS_VARLEN) {
        // Rows past the sequence belong to the next one; columns past head_dim to nobody (the
        // real head dim is a multiple of 8, so a pair of columns never straddles it).
        u16* out = (u16*)p.o.ptr + head * p.o.head_stride + (i64)q_start * p.o.row_stride;
#pragma unroll
        for (int i = 0; i < O_REGS; i += 2) {
            const int row = c.row_start + acc_row(i, c.t), col = acc_col(i, c.t);
            const float inv = inv_l[acc_half(i)];
            if (row < seqlen_q && col < p.head_dim)
                *(u32*)(out + (i64)row * p.o.row_stride + col) = pack_float2(o[i] * inv, o[i + 1] * inv);
        }
        return;
    }
    // sQ's rows of this warpgroup were last read by its final S = Q K^T, completed (waited) above.
    const int first_row = c.consumer * WGMMA_M;
#pragma unroll
    for (int i = 0; i < O_REGS; i += 2) {
        const int row = first_row + acc_row(i, c.t), col = acc_col(i, c.t);
        const u32 addr = smem_q + (col / SWIZZLE_ELEMS) * Q_BOX_BYTES + swizzled_offset(row, col % SWIZZLE_ELEMS);
        const float inv = inv_l[acc_half(i)];
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pack_float2(o[i] * inv, o[i + 1] * inv)) : "memory");
    }
    fence_proxy_async();  // the copy engine reads what these ordinary stores wrote
    named_barrier_sync(BAR_EPILOGUE + c.consumer, WARPGROUP_THREADS);  // every row of the warpgroup is in sQ
    if (c.t == 0) {
#pragma unroll
        for (int box = 0; box < D_CHUNKS; ++box)
            tma_store_4d(tm_o, smem_q + box * Q_BOX_BYTES + first_row * SWIZZLE_BYTES, box * SWIZZLE_ELEMS,
                         q_start + c.row_start, head, batch);
        tma_store_commit();
        tma_store_wait_read();  // shared memory stays allocated until the stores have read it
    }
}

// IS_VARLEN, second producer warp: once the copy engine has filled the first V tile (stage 0, its
// first use), zero its rows from `valid` on, in every 64-column box (a whole 128-byte row of a box
// is that row's 64 columns whatever the swizzle), and let the consumers read it.
__device__ __forceinline__ void zero_v_tail(u32 v_tile, int valid, const Barriers& bars, int lane) {
    mbar_wait(bars.v_full, 0);
    // Lane l clears 16 bytes at l % 8 of rows valid + l / 8, + 4, ...: 8 lanes per 128-byte row.
    const u32 lane_bytes = v_tile + (lane % 8) * 16;
    for (int row = valid + lane / 8; row < BLOCK_N; row += WARP_SIZE / 8)
#pragma unroll
        for (int box = 0; box < D_CHUNKS; ++box)
            asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n"
                         ::"r"(lane_bytes + box * KV_BOX_BYTES + row * SWIZZLE_BYTES), "r"(0) : "memory");
    fence_proxy_async();  // wgmma reads these ordinary stores through the async proxy
    __syncwarp();
    if (lane == 0) mbar_arrive(bars.v_tail);
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
flash_fwd_sm90(const __grid_constant__ TmaDesc tm_q, const __grid_constant__ TmaDesc tm_k,
               const __grid_constant__ TmaDesc tm_v, const __grid_constant__ TmaDesc tm_o, const AttnParams p) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The 128-byte swizzle repeats every 1024 bytes and the descriptors assume atoms start there.
    const u32 smem = (smem_addr(smem_raw) + SWIZZLE_ATOM_BYTES - 1) / SWIZZLE_ATOM_BYTES * SWIZZLE_ATOM_BYTES;
    const Barriers bars = barriers(smem + SMEM_BARS);

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset, kv_head = head / p.heads_per_kv;
    const int m_start = m_block * BLOCK_M;
    const Sequence seq = sequence(batch, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
    if (IS_VARLEN && m_start >= seq.seqlen_q) return;  // the grid covers the longest sequence
    const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
    const int map_batch = IS_VARLEN ? 0 : batch;  // a packed batch is one entry of the maps
    const ScoreMods mods = make_score_mods(seqlen_q, seqlen_k, p.window_left, p.window_right, p.softcap_scale,
                                           p.alibi_slopes + batch * p.alibi_batch_stride + head, p.scale);
    const KeyRange tiles = key_tiles(m_start, min(BLOCK_M, seqlen_q - m_start), BLOCK_N, seqlen_k, mods.band);
    const int n_tiles = max(tiles.tile_end - tiles.tile_begin, 0);
    // The first tile visited holds keys past the sequence (a packed batch's next sequence).
    const bool v_tail = IS_VARLEN && n_tiles > 0 && tiles.tile_end * BLOCK_N > seqlen_k;

    if (threadIdx.x == 0) {
        mbar_init(bars.q_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bars.k_full + 8 * s, 1);  // the producer's expect_tx arrival; the bytes do the rest
            mbar_init(bars.v_full + 8 * s, 1);
            mbar_init(bars.k_empty + 8 * s, CONSUMER_WARPS);
            mbar_init(bars.v_empty + 8 * s, CONSUMER_WARPS);
        }
        mbar_init(bars.v_tail, 1);
        mbar_fence_init();
    }
    __syncthreads();  // barriers initialized before anyone waits on them; the last CTA-wide sync

    const int warpgroup = threadIdx.x / WARPGROUP_THREADS;
    if (warpgroup == 0) {
        // ---- producer: one thread issues every copy ----
        // The V tail is cleared before this warp gives up its registers: at 24 the copy loop
        // below would spill. The consumers' setmaxnreg.inc waits for those registers, so this
        // delays them by at most the first V tile's arrival, in the CTAs that have a tail.
        if (IS_VARLEN && v_tail && threadIdx.x / WARP_SIZE == 1)
            zero_v_tail(smem + SMEM_V, seqlen_k - (tiles.tile_end - 1) * BLOCK_N, bars, threadIdx.x % WARP_SIZE);
        setmaxnreg_dec<PRODUCER_REGS>();
        if (threadIdx.x == 0) {
            tma_prefetch(&tm_q);
            tma_prefetch(&tm_k);
            tma_prefetch(&tm_v);
            mbar_arrive_expect_tx(bars.q_full, Q_BYTES);
            for (int box = 0; box < D_CHUNKS; ++box)
                tma_load_4d(smem + SMEM_Q + box * Q_BOX_BYTES, &tm_q, bars.q_full, box * SWIZZLE_ELEMS,
                            seq.q_start + m_start, head, map_batch);
            for (int i = 0; i < n_tiles; ++i) {
                const int tile = tiles.tile_end - 1 - i, s = stage_of(i), phase = phase_of(i);
                const u32 k_dst = smem + SMEM_K + s * KV_BYTES, v_dst = smem + SMEM_V + s * KV_BYTES;
                mbar_wait(bars.k_empty + 8 * s, phase ^ 1);  // the consumers are done with this stage's K
                mbar_arrive_expect_tx(bars.k_full + 8 * s, KV_BYTES);
                for (int box = 0; box < D_CHUNKS; ++box)
                    tma_load_4d(k_dst + box * KV_BOX_BYTES, &tm_k, bars.k_full + 8 * s, box * SWIZZLE_ELEMS,
                                seq.k_start + tile * BLOCK_N, kv_head, map_batch);
                mbar_wait(bars.v_empty + 8 * s, phase ^ 1);  // ... and with its V
                mbar_arrive_expect_tx(bars.v_full + 8 * s, KV_BYTES);
                for (int box = 0; box < D_CHUNKS; ++box)
                    tma_load_4d(v_dst + box * KV_BOX_BYTES, &tm_v, bars.v_full + 8 * s, box * SWIZZLE_ELEMS,
                                seq.k_start + tile * BLOCK_N, kv_head, map_batch);
            }
        }
    } else {
        // ---- consumers ----
        setmaxnreg_inc<CONSUMER_REGS>();
        ConsumerCtx c;
        c.consumer = warpgroup - 1;
        c.t = threadIdx.x % WARPGROUP_THREADS;
        c.row_start = m_start + c.consumer * WGMMA_M;
        c.q_rows = smem + SMEM_Q + c.consumer * WGMMA_M * SWIZZLE_BYTES;
        c.k_tiles = smem + SMEM_K;
        c.v_tiles = smem + SMEM_V;
        c.bars = bars;
        c.mods = mods;
        c.scale_log2 = p.scale_log2;
        c.v_tail = v_tail;

        float o[O_REGS], m_i[2] = {NEG_INF, NEG_INF}, l_i[2] = {0.f, 0.f}, alpha[2];
#pragma unroll
        for (int i = 0; i < O_REGS; ++i) o[i] = 0.f;
        u32 p_frag[P_STEPS][4];
        float s[S_REGS];

        mbar_wait(bars.q_full, 0);  // also before the epilogue reuses sQ when there is no tile
        if (PINGPONG && c.consumer == NUM_CONSUMERS - 1 && n_tiles > 0)
            named_barrier_arrive(BAR_TURN, TURN_THREADS);  // the first consumer takes the first turn

#if OVERLAP
        // Tile 0: S, softmax, P (O is still 0: nothing to rescale or add yet).
        if (n_tiles > 0) {
            mbar_wait(bars.k_full, 0);
            take_turn(c.consumer);
            issue_qk(s, c.q_rows, c.k_tiles);
            hand_over_turn(c.consumer, false);
            wgmma_wait<0>();
            pin_registers(s);
            release(bars.k_empty);
            score_tile(s, c, tiles.tile_end - 1);
            online_softmax(s, m_i, l_i, alpha, c.scale_log2);
        }
        for (int i = 1; i < n_tiles; ++i) {
            const int s_now = stage_of(i), s_prev = stage_of(i - 1);
            acc_to_a_operand<BLOCK_N>(p_frag, s);  // P of tile i - 1
            mbar_wait(bars.k_full + 8 * s_now, phase_of(i));
            wait_v(c, i - 1, s_prev, phase_of(i - 1));
            take_turn(c.consumer);
            issue_qk(s, c.q_rows, c.k_tiles + s_now * KV_BYTES);             // S = Q K_i^T
            rescale_o(o, alpha);                                              // O *= exp2(m_old - m_new)
            issue_pv(o, p_frag, c.v_tiles + s_prev * KV_BYTES);               // O += P_{i-1} V_{i-1}
            hand_over_turn(c.consumer, false);
            wgmma_wait<1>();                                                  // S is ready, P V may run on
            pin_registers(s);
            release(bars.k_empty + 8 * s_now);
            score_tile(s, c, tiles.tile_end - 1 - i);
            online_softmax(s, m_i, l_i, alpha, c.scale_log2);                 // under the P V wgmma
            wgmma_wait<0>();
            pin_registers(o);
            pin_registers(p_frag);
            release(bars.v_empty + 8 * s_prev);
        }
        // The last tile's O += P V.
        if (n_tiles > 0) {
            const int s_last = stage_of(n_tiles - 1);
            acc_to_a_operand<BLOCK_N>(p_frag, s);
            wait_v(c, n_tiles - 1, s_last, phase_of(n_tiles - 1));
            take_turn(c.consumer);
            rescale_o(o, alpha);
            issue_pv(o, p_frag, c.v_tiles + s_last * KV_BYTES);
            hand_over_turn(c.consumer, true);
            wgmma_wait<0>();
            pin_registers(o);
            release(bars.v_empty + 8 * s_last);
        }
#else
        for (int i = 0; i < n_tiles; ++i) {
            const int st = stage_of(i), phase = phase_of(i);
            mbar_wait(bars.k_full + 8 * st, phase);
            issue_qk(s, c.q_rows, c.k_tiles + st * KV_BYTES);  // S = Q K^T
            wgmma_wait<0>();
            pin_registers(s);
            release(bars.k_empty + 8 * st);
            score_tile(s, c, tiles.tile_end - 1 - i);           // mask, softcap, ALiBi
            online_softmax(s, m_i, l_i, alpha, c.scale_log2);   // S becomes P
            rescale_o(o, alpha);                                // O *= exp2(m_old - m_new)
            acc_to_a_operand<BLOCK_N>(p_frag, s);
            wait_v(c, i, st, phase);
            issue_pv(o, p_frag, c.v_tiles + st * KV_BYTES);     // O += P V
            wgmma_wait<0>();
            pin_registers(o);
            release(bars.v_empty + 8 * st);
        }
#endif
        write_output(c, o, m_i, l_i, &tm_o, p, smem + SMEM_Q, head, map_batch, seqlen_q, seq.q_start);
    }
}
