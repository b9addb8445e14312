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
//      online softmax   running row max m_i and sum l_i in registers, exp2 with the scale folded,
//                       O rescaled only when a row's max rises past RESCALE_SLACK (lazy rescaling)
//      O += P V         wgmma with P from registers (RS): S's accumulators, packed to 16 bits,
//                       already have the A-operand layout (hopper.h: acc_to_a_operand)
//    then O /= l_i, written through shared memory by a TMA store, and lse.
// Overlaps (compile-time switches; each row of xattn/sm90.py sets its own, as measured):
//  - OVERLAP (inside a warpgroup): S of tile j is issued together with P V of tile j - 1, and the
//    softmax of tile j runs while that P V is still on the tensor cores (wgmma.wait_group 1),
//    unless OVERLAP_WAIT_LATE (below) lets ptxas wait for that P V before the softmax.
//  - PINGPONG (between the two consumers): named barriers make them take turns issuing their
//    GEMMs, so one's softmax runs while the other's GEMMs occupy the tensor cores.
//
// Grid: x = query block (reversed, so the heaviest causal blocks start first), y = query head,
// z = batch entry (+ batch_offset). Key tiles are visited right to left, so the tiles that need
// masking (the end of the keys, the causal diagonal) come first; tiles outside the band of the
// block are never loaded (attention_common.h: key_tiles).
//
// Persistent grid (PERSISTENT, never with IS_VARLEN): one CTA per SM, each walking work units
// blockIdx.x, blockIdx.x + gridDim.x, ... (next_tile). A unit is one query block of one (batch,
// head), query blocks fastest, so the CTAs running at once read the keys of few heads (L2); with a
// causal edge a unit pairs block M - 1 - j with block j, so every unit visits about M + 1 key
// tiles and the static round robin stays balanced. The ring of K/V stages and its barrier phases
// run on from tile to tile; sQ has a full and an empty barrier of its own, and the consumers
// release it after their last S = Q K^T of a tile, so the producer loads the next tile's Q and
// first K/V tiles while the consumers finish the last P V, the softmax and the epilogue. O is then
// stored from the registers (as in a packed batch), so that no shared buffer outlives its tile.
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
// RESCALE_SLACK how far a row's running max may rise (base 2) before O and l are rescaled to it
//             (online_softmax: lazy rescaling; 0, the default: at every rise)
// IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN: masks, modifiers and packed batches
//             (attention_common.h)
// HAS_SINKS   1: p.sinks holds float32 (Hq,) sink logits
// PERSISTENT  1: the persistent grid above (p.batch: the batch entries it walks)

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
#ifndef PERSISTENT
#define PERSISTENT 0
#endif
// OVERLAP_WAIT_LATE 1: the overlapped loop waits for P V right after the softmax, where ptxas hoists
// that wait above the softmax (no overlap; as every row ran before 2026-11-30), and fewer registers
// are live: the rows whose tune chose it (xattn/sm90.py, softmax_under_pv), and variants that spill
// without it.
#ifndef OVERLAP_WAIT_LATE
#define OVERLAP_WAIT_LATE 0
#endif
#ifndef RESCALE_SLACK
#define RESCALE_SLACK 0
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
static_assert(!(PERSISTENT && IS_VARLEN), "a packed batch keeps one CTA per query block of each sequence");
static_assert(PRODUCER_REGS * WARPGROUP_THREADS + CONSUMER_REGS * NUM_CONSUMERS * WARPGROUP_THREADS <=
              (65536 / NUM_THREADS) / 8 * 8 * NUM_THREADS, "setmaxnreg: the consumers take what the producer frees");

// ---- shared-memory layout ---------------------------------------------------------------------
// (1024-byte aligned; xattn/kernels.py computes the same size)
// sQ   D_CHUNKS boxes of BLOCK_M rows x 128 bytes; consumer c's rows start at c * 64. Reused for O
//      by the TMA store (not PERSISTENT, not IS_VARLEN).
// sK   STAGES tiles of D_CHUNKS boxes of BLOCK_N rows x 128 bytes;  sV: the same
// bars q_full, q_empty, k_full[STAGES], v_full[STAGES], k_empty[STAGES], v_empty[STAGES], v_tail
//      (8 bytes each)
#define Q_BOX_BYTES (BLOCK_M * SWIZZLE_BYTES)
#define KV_BOX_BYTES (BLOCK_N * SWIZZLE_BYTES)
#define Q_BYTES (D_CHUNKS * Q_BOX_BYTES)
#define KV_BYTES (D_CHUNKS * KV_BOX_BYTES)
#define SMEM_Q 0
#define SMEM_K (SMEM_Q + Q_BYTES)
#define SMEM_V (SMEM_K + STAGES * KV_BYTES)
#define SMEM_BARS (SMEM_V + STAGES * KV_BYTES)

struct Barriers {
    u32 q_full, q_empty;                   // sQ holds the tile's Q / the consumers are done reading it
    u32 k_full, v_full, k_empty, v_empty;  // stage s: + 8 s
    u32 v_tail;                            // IS_VARLEN: the first V tile's rows past the sequence are zero
};

__device__ __forceinline__ Barriers barriers(u32 base) {
    Barriers b;
    b.q_full = base;
    b.q_empty = base + 8;
    b.k_full = base + 16;
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

// Which stage of the ring the i-th K/V tile of a CTA uses (counted over all its query blocks),
// and the parity of that stage's use.
__device__ __forceinline__ int stage_of(int i) { return i % STAGES; }
__device__ __forceinline__ int phase_of(int i) { return (i / STAGES) & 1; }

// S = Q K^T for the warpgroup's 64 rows: HEAD_DIM / 16 k steps, each 32 bytes further into a
// 128-byte row of both tiles (the next 64 columns are the next box).
__device__ __forceinline__ void issue_qk(float (&s)[S_REGS], u32 q_rows, u32 k_tile) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / WGMMA_K; ++kk) {
        const u32 box = kk / (SWIZZLE_ELEMS / WGMMA_K), step = (kk % (SWIZZLE_ELEMS / WGMMA_K)) * WGMMA_K * 2;
        Wgmma<BLOCK_N>::ss(s, smem_descriptor(q_rows, box * Q_BOX_BYTES + step, 16),
                           smem_descriptor(k_tile, box * KV_BOX_BYTES + step, 16), kk > 0);
    }
    wgmma_commit();
}

// O += P V: BLOCK_N / 16 k steps over the keys, two swizzle atoms (16 rows of V) each; V is the
// N-major B operand, its next 64 columns one box (KV_BOX_BYTES) further.
__device__ __forceinline__ void issue_pv(float (&o)[O_REGS], const u32 (&p)[P_STEPS][4], u32 v_tile) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < P_STEPS; ++kk)
        Wgmma<HEAD_DIM>::rs<1>(o, p[kk], smem_descriptor(v_tile, kk * 2 * SWIZZLE_ATOM_BYTES, KV_BOX_BYTES), true);
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
        // Lazy rescaling (FlashAttention-4's): the row keeps its old max as the exponent offset
        // while the new one exceeds it by at most RESCALE_SLACK. P then reaches at most
        // 2^RESCALE_SLACK (far inside fp16 and float32), O and l share the offset, so O / l and
        // lse = m_i + ln(l) stay exact; alpha stays exactly 1, and a warp whose rows all kept
        // their max skips rescaling O (rescale_o). An empty row (m_i = -inf) never keeps: the
        // difference is +inf or NaN.
        const bool keep = RESCALE_SLACK > 0 && (m_new - m_i[h]) * scale_log2 <= (float)RESCALE_SLACK;
        if (keep) m_new = m_i[h];
        // A row that has seen no key yet keeps m = -inf: use 0 as the offset so that
        // exp2(-inf - offset) is 0 rather than exp2(-inf + inf) = NaN.
        const bool row_empty = m_new == NEG_INF;
        offset[h] = row_empty ? 0.f : m_new * scale_log2;
        alpha[h] = row_empty || keep ? 1.f : fast_exp2((m_i[h] - m_new) * scale_log2);
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

// O *= alpha, row by row; skipped where every row of the warp kept its max (alpha exactly 1).
__device__ __forceinline__ void rescale_o(float (&o)[O_REGS], const float (&alpha)[2]) {
    if (RESCALE_SLACK > 0 && !__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int i = 0; i < O_REGS; ++i) o[i] *= alpha[acc_half(i)];
}

// Pingpong: wait for this consumer's turn to issue GEMMs / hand the turn to the other one. The
// first consumer's first turn is given by the second one at the start (give_first_turn), and it
// takes one turn more at the end (take_last_turn), which matches the second consumer's last hand-
// over: every arrival is matched by a sync before the CTA ends, however many tiles it visited.
__device__ __forceinline__ void take_turn(int consumer) {
    if (PINGPONG) named_barrier_sync(BAR_TURN + consumer, TURN_THREADS);
}
__device__ __forceinline__ void hand_over_turn(int consumer) {
    if (PINGPONG) named_barrier_arrive(BAR_TURN + (consumer + 1) % NUM_CONSUMERS, TURN_THREADS);
}
__device__ __forceinline__ void give_first_turn(int consumer) {
    if (PINGPONG && consumer == NUM_CONSUMERS - 1) named_barrier_arrive(BAR_TURN, TURN_THREADS);
}
__device__ __forceinline__ void take_last_turn(int consumer) {
    if (PINGPONG && consumer == 0) named_barrier_sync(BAR_TURN, TURN_THREADS);
}

// ---- which query blocks a CTA computes ---------------------------------------------------------

struct Tile {
    int m_block, head, batch;
};

// A CTA's walk over its query blocks: one block (blockIdx), or with PERSISTENT the work units
// blockIdx.x, blockIdx.x + gridDim.x, ... (the header's "Persistent grid"). The producer and the
// consumers walk the same sequence, each on its own copy: no tile index is ever communicated. The
// walk is one counter (registers are scarce in the consumers), and its sizes are read from the
// parameters at each step (constant memory). With a causal edge every unit is two steps: blocks
// M - 1 - j and j, or for the middle block of an odd M, the block and an empty step (block M,
// past the rows, which both roles skip).
struct TileWalk {
    int step;  // steps the CTA has taken
};

__device__ __forceinline__ int walk_m_blocks(const AttnParams& p) {
    return PERSISTENT ? (p.seqlen_q + BLOCK_M - 1) / BLOCK_M : gridDim.x;
}
__device__ __forceinline__ int units_per_head(int m_blocks) { return IS_CAUSAL ? (m_blocks + 1) / 2 : m_blocks; }
#define STEPS_PER_UNIT (IS_CAUSAL ? 2 : 1)

__device__ __forceinline__ TileWalk tile_walk() { return TileWalk{0}; }

__device__ __forceinline__ int walk_unit(const TileWalk& w) {
    return blockIdx.x + (w.step / STEPS_PER_UNIT) * gridDim.x;
}

// Whether the walk has a query block left, which one it is, and the step to the next.
__device__ __forceinline__ bool walk_active(const TileWalk& w, const AttnParams& p) {
    if (!PERSISTENT) return w.step == 0;
    return walk_unit(w) < units_per_head(walk_m_blocks(p)) * p.heads_q * p.batch;
}
__device__ __forceinline__ Tile tile_at(const TileWalk& w, const AttnParams& p) {
    const int m_blocks = walk_m_blocks(p);
    Tile t;
    if (!PERSISTENT) {
        t.m_block = m_blocks - 1 - blockIdx.x;
        t.head = blockIdx.y;
        t.batch = blockIdx.z + p.batch_offset;
        return t;
    }
    const int unit = walk_unit(w), per_head = units_per_head(m_blocks), j = unit % per_head, entry = unit / per_head;
    t.head = entry % p.heads_q;
    t.batch = entry / p.heads_q;
    t.m_block = j;
    if (IS_CAUSAL && w.step % 2 == 0) t.m_block = m_blocks - 1 - j;            // the longer block of a pair first
    if (IS_CAUSAL && w.step % 2 == 1 && j == m_blocks - 1 - j) t.m_block = m_blocks;  // no second block
    return t;
}
__device__ __forceinline__ void advance(TileWalk& w) { ++w.step; }

// What both roles derive from a query block: its sequence, rows, band and key tiles.
struct TileWork {
    Sequence seq;
    int m_start;
    int map_batch;     // the batch coordinate of the tensor maps (0 in a packed batch)
    KeyRange tiles;
    int n_tiles;       // key tiles to visit (0: the rows see no key)
    bool has_rows;     // the block starts inside its sequence (a packed batch's grid covers the longest)
};

__device__ __forceinline__ TileWork tile_work(const AttnParams& p, const Tile& t) {
    TileWork w;
    w.seq = sequence(t.batch, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
    w.m_start = t.m_block * BLOCK_M;
    w.map_batch = IS_VARLEN ? 0 : t.batch;  // a packed batch is one entry of the maps
    w.has_rows = w.m_start < w.seq.seqlen_q;
    const Band band = make_band(w.seq.seqlen_q, w.seq.seqlen_k, p.window_left, p.window_right);
    w.tiles = key_tiles(w.m_start, min(BLOCK_M, w.seq.seqlen_q - w.m_start), BLOCK_N, w.seq.seqlen_k, band);
    w.n_tiles = w.has_rows ? max(w.tiles.tile_end - w.tiles.tile_begin, 0) : 0;
    return w;
}

// ---- the consumers -------------------------------------------------------------------------------

// The consumer's constants for one query block.
struct ConsumerCtx {
    int consumer, t;           // consumer warpgroup 0/1, thread within it
    int row_start;             // first query row of the warpgroup (in its sequence)
    u32 q_rows, k_tiles, v_tiles;
    Barriers bars;
    ScoreMods mods;
    float scale_log2;
    bool v_tail;               // the first tile's V waits for bars.v_tail too (IS_VARLEN)
};

// The consumers may read the V tile of the block's i-th key tile (stage st, parity phase).
__device__ __forceinline__ void wait_v(const ConsumerCtx& c, int i, int st, int phase) {
    mbar_wait(c.bars.v_full + 8 * st, phase);
    if (IS_VARLEN && i == 0 && c.v_tail) mbar_wait(c.bars.v_tail, 0);
}

// S of tile `tile` is ready in s: mask and modify it.
__device__ __forceinline__ void score_tile(float (&s)[S_REGS], const ConsumerCtx& c, int tile) {
    const int n_start = tile * BLOCK_N;
    const bool needs_mask = tile_needs_mask(c.row_start, WGMMA_M, n_start, BLOCK_N, c.mods.seqlen_k, c.mods.band);
    if (HAS_SOFTCAP || HAS_ALIBI || needs_mask) modify_scores(s, c.row_start, n_start, c.mods, needs_mask, c.t);
}

// Wait for this warpgroup's last P V: O and the P fragments it read are settled in their registers.
__device__ __forceinline__ void wait_pv(float (&o)[O_REGS], u32 (&p_frag)[P_STEPS][4]) {
    wgmma_wait<0>();
    pin_registers(o);
    pin_registers(p_frag);
}

// The main loop of one query block over its n_tiles key tiles, right to left from tile_end - 1:
// O, m_i and l_i of the warpgroup's 64 rows. kv: K/V tiles the CTA consumed before this block
// (the ring's position). sQ is released (q_empty) once the last S = Q K^T has completed, before
// the last P V: the producer loads the next block's Q under it and the epilogue.
__device__ __forceinline__ void attend(const ConsumerCtx& c, int tile_end, int n_tiles, int kv, float (&o)[O_REGS],
                                       float (&m_i)[2], float (&l_i)[2]) {
    float alpha[2];
    u32 p_frag[P_STEPS][4];
    float s[S_REGS];
#if OVERLAP
    // Tile 0: S, softmax, P (O is still 0: nothing to rescale or add yet).
    {
        const int st = stage_of(kv);
        mbar_wait(c.bars.k_full + 8 * st, phase_of(kv));
        take_turn(c.consumer);
        issue_qk(s, c.q_rows, c.k_tiles + st * KV_BYTES);
        hand_over_turn(c.consumer);
        wgmma_wait<0>();
        pin_registers(s);
        release(c.bars.k_empty + 8 * st);
        score_tile(s, c, tile_end - 1);
        online_softmax(s, m_i, l_i, alpha, c.scale_log2);
    }
    for (int i = 1; i < n_tiles; ++i) {
        const int s_now = stage_of(kv + i), s_prev = stage_of(kv + i - 1);
        // The P V of tile i - 2, issued by the last turn of this loop, is done. This wait belongs
        // after the softmax that runs under that P V, and sits here, across the loop's back edge
        // from it, because ptxas hoists a wgmma.wait_group to the top of its basic block: placed
        // right after the softmax, it went above it and the softmax ran with the tensor cores idle
        // (SASS, every row before 2026-11-30).
#if !OVERLAP_WAIT_LATE
        wait_pv(o, p_frag);
        if (i > 1) release(c.bars.v_empty + 8 * stage_of(kv + i - 2));
#endif
        acc_to_a_operand<BLOCK_N>(p_frag, s);  // P of tile i - 1
        mbar_wait(c.bars.k_full + 8 * s_now, phase_of(kv + i));
        wait_v(c, i - 1, s_prev, phase_of(kv + i - 1));
        take_turn(c.consumer);
        issue_qk(s, c.q_rows, c.k_tiles + s_now * KV_BYTES);              // S = Q K_i^T
        rescale_o(o, alpha);                                               // O *= exp2(m_old - m_new)
        issue_pv(o, p_frag, c.v_tiles + s_prev * KV_BYTES);                // O += P_{i-1} V_{i-1}
        hand_over_turn(c.consumer);
        wgmma_wait<1>();                                                   // S is ready, P V may run on
        pin_registers(s);
        release(c.bars.k_empty + 8 * s_now);
        score_tile(s, c, tile_end - 1 - i);
        online_softmax(s, m_i, l_i, alpha, c.scale_log2);                  // under the P V wgmma
#if OVERLAP_WAIT_LATE
        wait_pv(o, p_frag);
        release(c.bars.v_empty + 8 * s_prev);
#endif
    }
#if !OVERLAP_WAIT_LATE
    wait_pv(o, p_frag);  // the loop's last P V
    if (n_tiles > 1) release(c.bars.v_empty + 8 * stage_of(kv + n_tiles - 2));
#endif
    if (PERSISTENT) release(c.bars.q_empty);  // the block's last S = Q K^T has completed (waited above)
    // The last tile's O += P V.
    {
        const int last = kv + n_tiles - 1, s_last = stage_of(last);
        acc_to_a_operand<BLOCK_N>(p_frag, s);
        wait_v(c, n_tiles - 1, s_last, phase_of(last));
        take_turn(c.consumer);
        rescale_o(o, alpha);
        issue_pv(o, p_frag, c.v_tiles + s_last * KV_BYTES);
        hand_over_turn(c.consumer);
        wgmma_wait<0>();
        pin_registers(o);
        release(c.bars.v_empty + 8 * s_last);
    }
#else
    for (int i = 0; i < n_tiles; ++i) {
        const int st = stage_of(kv + i), phase = phase_of(kv + i);
        mbar_wait(c.bars.k_full + 8 * st, phase);
        issue_qk(s, c.q_rows, c.k_tiles + st * KV_BYTES);  // S = Q K^T
        wgmma_wait<0>();
        pin_registers(s);
        release(c.bars.k_empty + 8 * st);
        if (PERSISTENT && i == n_tiles - 1) release(c.bars.q_empty);  // the block's last read of sQ
        score_tile(s, c, tile_end - 1 - i);                 // mask, softcap, ALiBi
        online_softmax(s, m_i, l_i, alpha, c.scale_log2);   // S becomes P
        rescale_o(o, alpha);                                // O *= exp2(m_old - m_new)
        acc_to_a_operand<BLOCK_N>(p_frag, s);
        wait_v(c, i, st, phase);
        issue_pv(o, p_frag, c.v_tiles + st * KV_BYTES);     // O += P V
        wgmma_wait<0>();
        pin_registers(o);
        release(c.bars.v_empty + 8 * st);
    }
#endif
}

// Epilogue: O /= l, and lse = scale * m + ln(l) (with the sink folded in, HAS_SINKS). A row that
// saw no key has l = 0: it gets O = 0, lse = -inf (or the sink). A NaN that reached the row makes l
// NaN, and O and lse come out NaN. O goes through the warpgroup's rows of sQ (swizzled as the TMA
// store reads them) and a TMA store per 64-column box; in a packed batch and on the persistent
// grid, straight from the registers to the sequence's rows (q_start: its first row in the tensors).
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
    if (IS_VARLEN || PERSISTENT) {
        // Rows past the sequence belong to the next one (or to nobody); columns past head_dim to
        // nobody (the real head dim is a multiple of 8, so a pair of columns never straddles it).
        u16* out = (u16*)p.o.ptr + batch * p.o.batch_stride + head * p.o.head_stride + (i64)q_start * p.o.row_stride;
#pragma unroll
        for (int i = 0; i < O_REGS; i += 2) {
            const int row = c.row_start + acc_row(i, c.t), col = acc_col(i, c.t);
            const float inv = inv_l[acc_half(i)];
            if (row < seqlen_q && col < p.head_dim)
                *(u32*)(out + (i64)row * p.o.row_stride + col) = pack_float2(o[i] * inv, o[i + 1] * inv);
        }
        return;
    }
    // sQ's rows of this warpgroup were last read by its final S = Q K^T, completed (waited) in
    // attend; with one query block per CTA no Q is loaded after it.
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

// A consumer warpgroup: for each query block of the walk, the main loop over its key tiles and
// the epilogue. A block that sees no key waits for nothing and writes O = 0, lse = -inf.
__device__ __forceinline__ void consume(const TmaDesc* tm_o, const AttnParams& p, u32 smem_base, int consumer) {
    ConsumerCtx c;
    c.consumer = consumer;
    c.t = threadIdx.x % WARPGROUP_THREADS;
    c.scale_log2 = p.scale_log2;
    int q_loads = 0, kv = 0;  // Q loads and K/V tiles consumed so far: the barriers' phases
    if (OVERLAP) give_first_turn(c.consumer);  // pingpong takes turns only in the overlapped loop
    for (TileWalk walk = tile_walk(); walk_active(walk, p); advance(walk)) {
        const Tile t = tile_at(walk, p);
        const TileWork w = tile_work(p, t);
        if (!w.has_rows) continue;
        // The shared-memory addresses (and the wgmma descriptors made from them) afresh for each
        // block of a persistent walk: hoisted out of it, the compiler would hold them in registers
        // all along.
        u32 smem = smem_base;
        if (PERSISTENT) asm volatile("" : "+r"(smem));
        const Barriers bars = barriers(smem + SMEM_BARS);
        c.q_rows = smem + SMEM_Q + c.consumer * WGMMA_M * SWIZZLE_BYTES;
        c.k_tiles = smem + SMEM_K;
        c.v_tiles = smem + SMEM_V;
        c.bars = bars;
        c.row_start = w.m_start + c.consumer * WGMMA_M;
        c.mods = make_score_mods(w.seq.seqlen_q, w.seq.seqlen_k, p.window_left, p.window_right, p.softcap_scale,
                                 p.alibi_slopes + t.batch * p.alibi_batch_stride + t.head, p.scale);
        // The first tile visited holds keys past the sequence (a packed batch's next sequence).
        c.v_tail = IS_VARLEN && w.n_tiles > 0 && w.tiles.tile_end * BLOCK_N > w.seq.seqlen_k;

        float o[O_REGS], m_i[2] = {NEG_INF, NEG_INF}, l_i[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < O_REGS; ++i) o[i] = 0.f;
        if (w.n_tiles > 0) {
            mbar_wait(bars.q_full, q_loads & 1);
            attend(c, w.tiles.tile_end, w.n_tiles, kv, o, m_i, l_i);
            ++q_loads;
            kv += w.n_tiles;
        }
        // The block and its sequence again, from the walk: cheaper than holding them in registers
        // through the main loop (the opaque asm keeps the compiler from doing that).
        TileWalk again = walk;
        asm volatile("" : "+r"(again.step));
        const Tile te = tile_at(again, p);
        const Sequence seq = sequence(te.batch, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
        write_output(c, o, m_i, l_i, tm_o, p, smem + SMEM_Q, te.head, IS_VARLEN ? 0 : te.batch, seq.seqlen_q,
                     seq.q_start);
    }
    if (OVERLAP) take_last_turn(c.consumer);
}

// ---- the producer --------------------------------------------------------------------------------

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

// The producer's one thread: for each query block of the walk that sees keys, its Q once the
// consumers are done with the previous block's (q_empty), then its K and V tiles, right to left,
// into the ring, each stage once the consumers have released it.
__device__ __forceinline__ void produce(const TmaDesc* tm_q, const TmaDesc* tm_k, const TmaDesc* tm_v,
                                        const AttnParams& p, u32 smem, const Barriers& bars) {
    tma_prefetch(tm_q);
    tma_prefetch(tm_k);
    tma_prefetch(tm_v);
    int q_loads = 0, kv = 0;  // Q loads and K/V tiles issued so far: the barriers' phases
    for (TileWalk walk = tile_walk(); walk_active(walk, p); advance(walk)) {
        const Tile t = tile_at(walk, p);
        const TileWork w = tile_work(p, t);
        if (w.n_tiles == 0) continue;
        const int kv_head = t.head / p.heads_per_kv;
        mbar_wait(bars.q_empty, (q_loads & 1) ^ 1);  // the previous block's last S = Q K^T is done
        mbar_arrive_expect_tx(bars.q_full, Q_BYTES);
        for (int box = 0; box < D_CHUNKS; ++box)
            tma_load_4d(smem + SMEM_Q + box * Q_BOX_BYTES, tm_q, bars.q_full, box * SWIZZLE_ELEMS,
                        w.seq.q_start + w.m_start, t.head, w.map_batch);
        ++q_loads;
        for (int i = 0; i < w.n_tiles; ++i, ++kv) {
            const int tile = w.tiles.tile_end - 1 - i, s = stage_of(kv), phase = phase_of(kv);
            const int key_row = w.seq.k_start + tile * BLOCK_N;
            const u32 k_dst = smem + SMEM_K + s * KV_BYTES, v_dst = smem + SMEM_V + s * KV_BYTES;
            mbar_wait(bars.k_empty + 8 * s, phase ^ 1);  // the consumers are done with this stage's K
            mbar_arrive_expect_tx(bars.k_full + 8 * s, KV_BYTES);
            for (int box = 0; box < D_CHUNKS; ++box)
                tma_load_4d(k_dst + box * KV_BOX_BYTES, tm_k, bars.k_full + 8 * s, box * SWIZZLE_ELEMS, key_row,
                            kv_head, w.map_batch);
            mbar_wait(bars.v_empty + 8 * s, phase ^ 1);  // ... and with its V
            mbar_arrive_expect_tx(bars.v_full + 8 * s, KV_BYTES);
            for (int box = 0; box < D_CHUNKS; ++box)
                tma_load_4d(v_dst + box * KV_BOX_BYTES, tm_v, bars.v_full + 8 * s, box * SWIZZLE_ELEMS, key_row,
                            kv_head, w.map_batch);
        }
    }
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
flash_fwd_sm90(const __grid_constant__ TmaDesc tm_q, const __grid_constant__ TmaDesc tm_k,
               const __grid_constant__ TmaDesc tm_v, const __grid_constant__ TmaDesc tm_o, const AttnParams p) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The 128-byte swizzle repeats every 1024 bytes and the descriptors assume atoms start there.
    const u32 smem = (smem_addr(smem_raw) + SWIZZLE_ATOM_BYTES - 1) / SWIZZLE_ATOM_BYTES * SWIZZLE_ATOM_BYTES;
    const Barriers bars = barriers(smem + SMEM_BARS);

    if (threadIdx.x == 0) {
        mbar_init(bars.q_full, 1);
        mbar_init(bars.q_empty, CONSUMER_WARPS);
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
        // The V tail (a packed batch: one query block per CTA) is cleared before this warp gives up
        // its registers: at 24 the copy loop would spill. The consumers' setmaxnreg.inc waits for
        // those registers, so this delays them by at most the first V tile's arrival, in the CTAs
        // that have a tail.
        if (IS_VARLEN && threadIdx.x / WARP_SIZE == 1) {
            const TileWork w = tile_work(p, tile_at(tile_walk(), p));
            if (w.n_tiles > 0 && w.tiles.tile_end * BLOCK_N > w.seq.seqlen_k)
                zero_v_tail(smem + SMEM_V, w.seq.seqlen_k - (w.tiles.tile_end - 1) * BLOCK_N, bars,
                            threadIdx.x % WARP_SIZE);
        }
        setmaxnreg_dec<PRODUCER_REGS>();
        if (threadIdx.x == 0) produce(&tm_q, &tm_k, &tm_v, p, smem, bars);
    } else {
        // ---- consumers ----
        setmaxnreg_inc<CONSUMER_REGS>();
        consume(&tm_o, p, smem, warpgroup - 1);
    }
}
