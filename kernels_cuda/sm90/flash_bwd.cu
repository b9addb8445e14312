// FlashAttention backward for Hopper (sm_90a): TMA, wgmma and warp specialization (FA3's design).
//
// With S = scale Q K^T (+ modifiers), P = softmax(S) recomputed from the forward's LSE (never
// stored), dP = dO V^T and delta = rowsum(dO * O) (flash_bwd_prep.cu):
//   dS = P * (dP - delta),   dV = P^T dO,   dK = scale dS^T Q,   dQ = scale dS K.
//
// One CTA per (block of BLOCK_N = 128 keys (64 above D128), key/value head, batch entry). It keeps its K and V
// tiles in shared memory and walks every query block of every query head of its GQA group, so
// dK and dV, summed over the group, stay in registers from the first step to the last: no
// reduction pass for them. Three warpgroups with fixed roles:
//  - the producer (warpgroup 0) gives up registers (setmaxnreg.dec). Its thread 0 loads K and V
//    once, then each step's Q and dO tiles into a ring of STAGES shared-memory stages, by TMA;
//    its warp 1 loads the step's LSE (made base 2) and delta with plain loads. A stage has a
//    "full" mbarrier (the copy engine's bytes plus warp 1's 32 arrivals) and an "empty" one (each
//    consumer thread arrives when its wgmmas are done reading the stage).
//  - two consumers (warpgroups 1 and 2, setmaxnreg.inc), consumer c owning keys [64c, 64c + 64)
//    of the block. A step (64 or 128 queries of one head), on the tensor cores unless noted:
//      S^T  = K_c Q^T         SS wgmma, f32: rows are the consumer's keys, columns the queries
//      dP^T = V_c dO^T        SS wgmma, issued right behind S^T
//      P^T  = exp2(S^T scale_log2 - lse2), dS^T = P^T (dP^T - delta)   in registers (CUDA cores)
//      dV  += P^T dO          RS wgmma: P^T's accumulators, packed to 16 bits, are already the A
//      dK  += dS^T Q          operand (hopper.h: acc_to_a_operand); dO and Q are N-major B
//      dS^T -> shared memory  both consumers' keys, then a named barrier
//      dQ   = dS K            SS wgmma, dS^T read as an MN-major A and K as an N-major B; each
//                             consumer computes half of the step's dQ tile (half the head dim
//                             when BLOCK_M = 64, half the rows when 128)
//      dq_accum += dQ         float32 reductions straight from registers (red.global.add), or
//                             the tile through shared memory and a TMA reduce-add (DQ_TMA)
//    After the last step: dK *= scale, dK and dV through shared memory (the consumer's own rows
//    of sK and sV) and TMA stores.
//
// Head dims above 128 (SHARED_KEYS: the D256 row, BLOCK_N = 64). dK and dV of 64 keys at D256
// are 256 floats a thread for one warpgroup, more than its registers: the two consumers share the
// CTA's 64 keys and each owns half of the columns of dK and dV (128 floats a thread). Each
// computes S^T and dP^T for half of the step's 64 queries (32 of them: m64n32 wgmmas over the
// whole head dim, so no product is computed twice) and from them P^T and dS^T in float32, as
// above; both consumers' halves meet, 16-bit, in sP and sdS (a named barrier), and each runs dV
// += P^T dO and dK += dS^T Q for its columns with both operands in shared memory (SS), and its
// half of the columns of dQ = dS K. Shared memory is then full (sK, sV and two stages of Q and dO
// are 192 KB), so dQ takes red.global. FA3 splits its D256 backward between two warpgroups too;
// this split is chosen so that each P^T and dS^T element is made once, where it is computed.
//
// The dQ path. dQ of a step is a 64 x 64 float32 tile per consumer (32 floats a thread) that every
// key block adds into the float32 (B, Hq, Sq, head_dim) accumulator of the mma.sync path, which
// flash_bwd_prep.cu zeroes before and converts (times scale, to the input type) after. Two ways:
//  - DQ_TMA = 0 (no row since 2026-12-01; the A/B's other path): red.global.add.v2.f32 from the
//    accumulators, 16 a thread a step (two columns each), rows past Sq and columns past head_dim
//    skipped. No shared memory, no barrier.
//  - DQ_TMA = 1 (the other rows; FA3's choice): each consumer writes its tile into its own 16 KB of shared memory
//    (128-byte swizzled, as the copy engine reads it), and one thread issues two
//    cp.reduce.async.bulk.tensor .add (32 columns x 64 rows each) through a float32 tensor map of
//    dq_accum; the copy engine skips rows past Sq and columns past head_dim. Before the next
//    step's tile is written, that thread waits for the reads of the previous reduce (before the
//    step's BAR_DS barrier, a whole step later). It costs 32 KB of shared memory, 16 KB more
//    shared-memory writes and reads per consumer and step, and a named barrier.
// Measured on an H200 (bf16, D128, S 4096/8192, ci/results/2026-11-30-sm90-bwd/): with DQ_TMA = 0
// the kernel runs at 405-413 TFLOP/s, and at 648-696 with the reductions left out (a timing switch then):
// 40% of its time goes to the 8-byte reductions, each warp instruction touching 8 rows (eight
// 32-byte sectors) of the accumulator. The bulk reduce moves the same bytes to L2 as whole 128-byte
// lines from one thread, off the consumers' load/store path: DQ_TMA = 1 is the candidate to win
// that back (predicted ~560 at D128). It passed the float64 checks and racecheck/synccheck on the
// H200 and measured 475-504 TFLOP/s (ci/results/2026-11-30-h200-round2/): 16-18% over red.global,
// short of the prediction (not profiled: the staging writes and the BAR_DQ wait are the suspects).
// At D64 with a causal edge it spills 8 bytes (NVRTC 13.0 and 13.5) and still runs 12-14% faster
// than with red.global; without one it does not spill, and gains 15% (xattn/sm90.py).
//
// Deterministic? Not with dQ here: the order of the float32 additions into dq_accum depends on
// which key block gets there first, so dQ may differ in the last bits between runs (dK and dV
// are deterministic: each CTA owns its keys). deterministic=True runs this kernel with
// COMPUTE_DQ = 0 (dK and dV only) and takes dQ from flash_bwd_dq.cu, which owns each query
// block and sums over the keys in order (xattn/cuda.py's backward plan): FA3's alternative, a
// semaphore per query block ordering the reduce-adds by key block, keeps one kernel but
// serializes the CTAs of a column; this way reuses a kernel the mma.sync path already has, and
// its dQ runs on mma.sync.

// Grid: x = key block (the heaviest blocks of a causal call, the first keys, start first),
// y = key/value head, z = batch entry (+ batch_offset). A step covers query block m of query head
// h; a CTA visits only the query blocks whose band reaches its keys (attention_common.h), and
// masks element-wise only where a tile crosses an edge of the band or the end of the keys.
//
// Packed variable-length batches (IS_VARLEN): q, k, v, dout, dk, dv are (1, H, T, D) views, lse,
// delta and dq_accum (1, H, T[, D]); blockIdx.z is the sequence (attention_common.h: sequence) and
// x covers the longest key sequence (a CTA past its own sequence's keys ends at once). The maps
// span all T rows, so the tiles that run past a sequence's end load the next sequence's rows (or
// zeros past T): keys past seqlen_k are masked; queries past seqlen_q have lse2 = +inf and delta 0,
// so their P^T and dS^T columns are exactly 0 and add nothing to dK, dV (their dQ rows, added by
// the TMA reduce-add, get + 0). That holds for finite inputs: a NaN or infinity in the rows of a
// neighbouring sequence would reach these gradients as 0 * inf (the forward zeroes its V tail for
// that; the backward does not). dK and dV are stored from the registers, only the sequence's rows:
// a TMA box would write into the next sequence.
//
// Layouts as in flash_fwd.cu: q, dout (B, Hq, Sq, D) and k, v, dk, dv (B, Hk, Sk, D), any
// batch/head/row strides (multiples of 16 bytes), D contiguous: each a 4-D tensor map (D, S, H, B)
// with boxes of 64 columns by BLOCK_M, BLOCK_N or 64 rows under 128-byte swizzle; the copy
// engine zero-fills rows past S and columns past head_dim, and the TMA stores of dK, dV write
// nothing outside the tensors. lse: float32 (B, Hq, Sq), natural log (the forward's, softcap c
// as its scale); it becomes base 2 on loading: lse2 = lse * log2(e), and +inf for rows past Sq
// and rows that saw no key, so that P = exp2(s * scale_log2 - lse2) is 0 there with no mask and
// no NaN. delta float32 (B, Hq, Sq). Reads q, k, v, dout, lse, delta; writes dk, dv; adds into
// dq_accum.
//
// Registers per thread, by role (ptxas, sm_90a: 168 kernel-wide = 65536 / 384 at launch, no spills,
// no stack in any row): producer PRODUCER_REGS = 32, consumers CONSUMER_REGS = 232 (32 * 128 +
// 232 * 256 = 63488 <= 168 * 384); 40 and 224 at D256. 24/240, the forward's split, spilled in the producer's TMA loop
// (the map addresses and coordinates of Q and dO); the consumers fit in 232.

// ---- compile-time configuration (set with -D by xattn/kernels.py from xattn/sm90.py's rows) -----
// ELEM_BF16   1: bfloat16, 0: float16
// HEAD_DIM    padded head dim of the row (64, 128 or 256); the real one, head_dim, is <= it
// BLOCK_N     keys per CTA: 128, or 64 shared by the consumers (above D128)
// BLOCK_M     queries per step (64 or 128)
// STAGES      Q/dO stages in flight
// IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN: masks, modifiers and packed batches
//             (attention_common.h)
// DQ_TMA      0: dQ added into dq_accum by red.global.add; 1: by a TMA reduce-add from shared memory
// EARLY_SCORES 1 (default): the next step's S^T issued under this step's dQ reduction (ISSUE_S_EARLY
//             below); 0: each step issues its own S^T and dP^T together (the A/B of the bench)
// COMPUTE_DQ  1 (default): dQ as above; 0: dK and dV only (no dS^T staging, no dQ product, no
//             dq_accum and no tensor map for it), for deterministic=True, whose dQ comes from
//             flash_bwd_dq.cu (query-block parallel, no atomics); also what the dQ path costs
//             (ci/sm90_bwd_check.py --phase bench)

#include "../platform.h"
#include "../../kernels_common/params.h"
#include "../../kernels_common/attention_common.h"
#include "hopper.h"

#ifndef DQ_TMA
#define DQ_TMA 0
#endif
#ifndef COMPUTE_DQ
#define COMPUTE_DQ 1
#endif
#ifndef EARLY_SCORES
#define EARLY_SCORES 1
#endif

#define NUM_CONSUMERS 2                          // consumer warpgroups
// BLOCK_N (the row's): keys per CTA. 128: each consumer owns 64 keys with every column of their
// dK and dV. 64 (SHARED_KEYS, the D256 row): both consumers work on the same 64 keys, each with
// half of the step's queries in S^T and dP^T and half of the columns of dK, dV and dQ (see
// "Head dims above 128" above).
#define SHARED_KEYS (BLOCK_N == WGMMA_M)
#define NUM_THREADS ((NUM_CONSUMERS + 1) * WARPGROUP_THREADS)
// EARLY_SCORES (the row's early_scores): each step issues the next step's S^T = K Q^T before its
// own dQ leaves the registers, so the tensor cores run it under the dQ reduction and the loop's
// turn; only where dQ is computed and keys are not shared (the D256 row has no registers for a
// second S^T).
#define ISSUE_S_EARLY (EARLY_SCORES && COMPUTE_DQ && !SHARED_KEYS)
#define CONSUMER_THREADS (NUM_CONSUMERS * WARPGROUP_THREADS)
// The producer's TMA loop over four boxes a row (D256) spills in 32 registers; the consumers of
// that row fit in 224 (ptxas, NVRTC 13).
#ifndef PRODUCER_REGS
#define PRODUCER_REGS (HEAD_DIM > 128 ? 40 : 32)
#endif
#ifndef CONSUMER_REGS
#define CONSUMER_REGS (HEAD_DIM > 128 ? 224 : 232)
#endif
#define ROW_WARP 1                               // the producer warp that loads lse and delta
#define D_BOXES (HEAD_DIM / SWIZZLE_ELEMS)       // 64-column boxes of a row of Q, K, V, dO
#define M_BOXES (BLOCK_M / SWIZZLE_ELEMS)        // 64-query boxes of a row of dS^T
#define ST_COLS (SHARED_KEYS ? BLOCK_M / NUM_CONSUMERS : BLOCK_M)  // a consumer's queries of S^T, dP^T
#define KV_COLS (SHARED_KEYS ? HEAD_DIM / NUM_CONSUMERS : HEAD_DIM) // a consumer's columns of dK, dV
#define ST_REGS (ST_COLS / 2)                    // f32 values of S^T (and of dP^T) per thread
#define DKV_REGS (KV_COLS / 2)                   // f32 values of dK (and of dV) per thread
#define ST_STEPS (ST_COLS / WGMMA_K)             // k16 steps of a consumer's P^T, dS^T fragments
#define M_STEPS (BLOCK_M / WGMMA_K)              // k16 steps of dV += P^T dO (over the queries)
// dQ = dS K, the step's BLOCK_M x HEAD_DIM tile split between the consumers: by columns when a
// step is one warpgroup's 64 rows, by rows when it is two.
#define DQ_SPLIT_ROWS (BLOCK_M / WGMMA_M)        // 1 or 2
#define DQ_COLS (HEAD_DIM / (NUM_CONSUMERS / DQ_SPLIT_ROWS))
#define DQ_REGS (DQ_COLS / 2)
#define DQ_BOX_COLS (SWIZZLE_BYTES / 4)          // float32 columns of one reduce box (128 bytes)
#define DQ_BOX_REGS (DQ_BOX_COLS / 2)            // a thread's dQ values in one box
// Shared keys with the TMA reduce-add: sK, sV and two stages of Q and dO leave 32 KB, so sP and
// sdS have one buffer each (a barrier before they are rewritten) and each warp stages its 16 rows
// of the consumer's dQ one 32-column box (2 KB) at a time: only the warp waits for the copy
// engine's read of its last box (a warpgroup-wide handshake per box stalled every warp on it: 31%
// of the stall samples, ncu, ci/results/2026-11-30-session7/).
#define DQ_BY_BOX (SHARED_KEYS && DQ_TMA && COMPUTE_DQ)
#define WARP_ROWS 16                             // a warp's rows of a wgmma accumulator
#define DQ_WARP_BOX_BYTES (WARP_ROWS * SWIZZLE_BYTES)
#define PDS_BUFFERS (DQ_BY_BOX ? 1 : 2)          // buffers of sP and of sdS, which steps alternate
#define DQ_STAGED_BOXES (DQ_BY_BOX ? 1 : DQ_COLS / DQ_BOX_COLS)

static_assert(BLOCK_N == NUM_CONSUMERS * WGMMA_M || BLOCK_N == WGMMA_M, "keys per CTA: 64 per consumer, or 64 shared");
static_assert(HEAD_DIM % SWIZZLE_ELEMS == 0 && KV_COLS <= 128, "head dim: whole boxes; dK and dV must fit in registers");
static_assert(!SHARED_KEYS || (BLOCK_M == WGMMA_M && KV_COLS % SWIZZLE_ELEMS == 0),
              "shared keys: 64 queries a step, whole boxes per consumer");
static_assert(BLOCK_M % SWIZZLE_ELEMS == 0 && BLOCK_M <= 2 * WGMMA_M, "query step: one or two warpgroups' rows");
static_assert(DQ_COLS % SWIZZLE_ELEMS == 0, "each consumer's dQ columns start at a box of K");
static_assert(PRODUCER_REGS * WARPGROUP_THREADS + CONSUMER_REGS * CONSUMER_THREADS <=
              (65536 / NUM_THREADS) / 8 * 8 * NUM_THREADS, "setmaxnreg: the consumers take what the producer frees");

// ---- shared-memory layout ---------------------------------------------------------------------
// (1024-byte aligned; xattn/kernels.py computes the same size)
// sK, sV   D_BOXES boxes of BLOCK_N rows x 128 bytes; consumer c's keys are rows [64c, 64c + 64).
//          After the last step, each consumer's dK and dV rows in its own rows of them.
// sQ, sdO  STAGES tiles of D_BOXES boxes of BLOCK_M rows x 128 bytes
// sdS      (COMPUTE_DQ or SHARED_KEYS) PDS_BUFFERS buffers (steps alternate) of M_BOXES boxes of
//          BLOCK_N rows (keys) x 128 bytes (64 queries): dS^T, 16-bit, swizzled as the TMA would
//          write it
// sP       (SHARED_KEYS) PDS_BUFFERS buffers like sdS: P^T, 16-bit, the A operand of dV += P^T dO
// sdQ      (COMPUTE_DQ and DQ_TMA) per consumer, DQ_STAGED_BOXES boxes of 64 rows x 128 bytes (32
//          floats): its step's dQ tile (DQ_BY_BOX: each warp's 16 rows of one box at a time),
//          swizzled as the copy engine reads it
// sLse, sDelta  STAGES x BLOCK_M floats each
// bars     kv_full, full[STAGES], empty[STAGES] (8 bytes each)
#define KV_BOX_BYTES (BLOCK_N * SWIZZLE_BYTES)
#define Q_BOX_BYTES (BLOCK_M * SWIZZLE_BYTES)
#define DS_BOX_BYTES (BLOCK_N * SWIZZLE_BYTES)
#define KV_BYTES (D_BOXES * KV_BOX_BYTES)
#define Q_BYTES (D_BOXES * Q_BOX_BYTES)
#define DS_BYTES (M_BOXES * DS_BOX_BYTES)
#define DQ_BOX_BYTES (WGMMA_M * SWIZZLE_BYTES)
#define DQ_TILE_BYTES (COMPUTE_DQ && DQ_TMA ? DQ_STAGED_BOXES * DQ_BOX_BYTES : 0)
#define DS_BUFFERS (COMPUTE_DQ || SHARED_KEYS ? PDS_BUFFERS : 0)
#define P_BUFFERS (SHARED_KEYS ? PDS_BUFFERS : 0)
#define SMEM_K 0
#define SMEM_V (SMEM_K + KV_BYTES)
#define SMEM_Q (SMEM_V + KV_BYTES)
#define SMEM_DO (SMEM_Q + STAGES * Q_BYTES)
#define SMEM_DS (SMEM_DO + STAGES * Q_BYTES)
#define SMEM_P (SMEM_DS + DS_BUFFERS * DS_BYTES)
#define SMEM_DQ (SMEM_P + P_BUFFERS * DS_BYTES)
#define SMEM_LSE (SMEM_DQ + NUM_CONSUMERS * DQ_TILE_BYTES)
#define SMEM_DELTA (SMEM_LSE + STAGES * BLOCK_M * 4)
#define SMEM_BARS (SMEM_DELTA + STAGES * BLOCK_M * 4)

struct Barriers {
    u32 kv_full;
    u32 full, empty;  // stage s: + 8 s
};

__device__ __forceinline__ Barriers barriers(u32 base) {
    Barriers b;
    b.kv_full = base;
    b.full = base + 8;
    b.empty = b.full + 8 * STAGES;
    return b;
}

// Named barriers (0 is __syncthreads).
#define BAR_DS 1        // both consumers' dS^T of a step is in sdS
#define BAR_EPILOGUE 2  // both consumers are done reading sK (their last dQ = dS K)
#define BAR_STORE 3     // + consumer: its dK and dV rows are staged for the TMA stores
#define BAR_DQ 5        // + consumer: its dQ tile is staged for the TMA reduce-add
#define BAR_PDS_FREE 7  // (one buffer of sP and sdS) both consumers' products of the last step are done

// ---- device helpers ---------------------------------------------------------------------------

// Which stage of the ring step i uses, and the parity of that stage's i-th use.
__device__ __forceinline__ int stage_of(int i) { return i % STAGES; }
__device__ __forceinline__ int phase_of(int i) { return (i / STAGES) & 1; }

// The steps of a CTA: query blocks [m_begin, m_end) of each query head of the group, head by
// head. A cursor walks them in order without divisions (the producer has 32 registers).
struct Steps {
    int m_begin, m_end, count;
    int first_head;
};

struct StepCursor {
    int head, m_block;
    __device__ __forceinline__ int m_start() const { return m_block * BLOCK_M; }
    __device__ __forceinline__ void advance(const Steps& s) {
        if (++m_block == s.m_end) {
            m_block = s.m_begin;
            ++head;
        }
    }
};

__device__ __forceinline__ StepCursor first_step(const Steps& s) { return StepCursor{s.first_head, s.m_begin}; }

// The query blocks that see any key of [n_start, n_start + BLOCK_N): the band of its first key
// starts them, the band of its last key ends them.
__device__ __forceinline__ Steps steps_of(int n_start, int seqlen_q, int seqlen_k, Band band, int kv_head,
                                          int heads_per_kv) {
    const int last_key = min(n_start + BLOCK_N, seqlen_k) - 1;
    const int first_query = IS_CAUSAL ? max(0, first_visible_query(n_start, band)) : 0;
    const int last_query = IS_LOCAL ? min(seqlen_q - 1, last_visible_query(last_key, band)) : seqlen_q - 1;
    Steps s;
    s.m_begin = first_query / BLOCK_M;
    s.m_end = last_query < first_query ? s.m_begin : last_query / BLOCK_M + 1;
    s.count = (s.m_end - s.m_begin) * heads_per_kv;
    s.first_head = kv_head * heads_per_kv;
    return s;
}

// K-major x K-major product over the head dim: D (64 x ST_COLS) = A (the consumer's 64 rows of
// sK or sV) * B^T (the consumer's ST_COLS rows of the stage's sQ or sdO). HEAD_DIM / 16 k steps, each 32 bytes
// further into a 128-byte row of both tiles (the next 64 columns are the next box).
__device__ __forceinline__ void issue_transposed_scores(float (&d)[ST_REGS], u32 a_rows, u32 b_tile) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / WGMMA_K; ++kk) {
        const u32 box = kk / (SWIZZLE_ELEMS / WGMMA_K), step = (kk % (SWIZZLE_ELEMS / WGMMA_K)) * WGMMA_K * 2;
        Wgmma<ST_COLS>::ss(d, smem_descriptor(a_rows, box * KV_BOX_BYTES + step, 16),
                           smem_descriptor(b_tile, box * Q_BOX_BYTES + step, 16), kk > 0);
    }
    wgmma_commit();
}

// acc (64 keys x KV_COLS) += A (64 keys x BLOCK_M queries, registers) * B (the stage's BLOCK_M
// rows of sQ or sdO, from the consumer's first column): M_STEPS k steps over the queries, two
// swizzle atoms (16 rows) each; B is N-major, its next 64 columns one box (Q_BOX_BYTES) further.
// Not committed: dV and dK form one group.
__device__ __forceinline__ void issue_key_gradient(float (&acc)[DKV_REGS], const u32 (&a)[M_STEPS][4], u32 b_tile) {
#pragma unroll
    for (int kk = 0; kk < M_STEPS; ++kk)
        Wgmma<KV_COLS>::rs<1>(acc, a[kk], smem_descriptor(b_tile, kk * 2 * SWIZZLE_ATOM_BYTES, Q_BOX_BYTES), true);
}

// The same with A from shared memory (SHARED_KEYS): sP or sdS, rows = keys and the step's 64
// queries contiguous (K-major), each consumer having written half of the queries.
__device__ __forceinline__ void issue_key_gradient_ss(float (&acc)[DKV_REGS], u32 a_tile, u32 b_tile) {
#pragma unroll
    for (int kk = 0; kk < M_STEPS; ++kk)
        Wgmma<KV_COLS>::ss<0, 1>(acc, smem_descriptor(a_tile, kk * WGMMA_K * 2, 16),
                                 smem_descriptor(b_tile, kk * 2 * SWIZZLE_ATOM_BYTES, Q_BOX_BYTES), true);
}

// dQ (64 queries x DQ_COLS) = dS (64 queries x BLOCK_N keys) K (BLOCK_N keys x DQ_COLS): BLOCK_N
// / 16 k steps over the keys, two swizzle atoms (16 rows of sdS and of sK) each. dS is read from
// dS^T (rows = keys, queries contiguous) as an MN-major A; K (rows = keys, columns contiguous)
// as an N-major B whose next 64 columns are the next box.
__device__ __forceinline__ void issue_dq(float (&dq)[DQ_REGS], u32 ds_box, u32 k_cols) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / WGMMA_K; ++kk)
        Wgmma<DQ_COLS>::ss<1, 1>(dq, smem_descriptor(ds_box, kk * 2 * SWIZZLE_ATOM_BYTES, DS_BOX_BYTES),
                                 smem_descriptor(k_cols, kk * 2 * SWIZZLE_ATOM_BYTES, KV_BOX_BYTES), kk > 0);
    wgmma_commit();
}

// A consumer thread is done reading a stage: every consumer thread arrives (the barrier counts
// CONSUMER_THREADS). Each thread read lse and delta with plain loads, and an arrival releases only
// the arriving thread's own accesses: one arrival per warp would order the other lanes' loads
// before the row warp's next stores only through the BAR_DS barrier in between, which
// compute-sanitizer's racecheck does not follow (it reported that write-after-read as a hazard).
__device__ __forceinline__ void release(u32 bar) { mbar_arrive(bar); }

// The consumer's per-CTA constants.
struct ConsumerCtx {
    int consumer, t;    // consumer warpgroup 0/1, thread within it
    int key_row;        // the consumer's first row of sK and sV (0 with SHARED_KEYS)
    int key_start;      // its key (in its sequence)
    int q0;             // its first query of a step's S^T and dP^T (0 unless SHARED_KEYS)
    int kv_col0;        // its first column of dK and dV (0 unless SHARED_KEYS)
    u32 k_rows, v_rows; // the consumer's 64 rows of sK and sV
    u32 smem;           // the aligned base of shared memory
    const unsigned char* smem_generic;  // the same, for plain loads of lse and delta
    ScoreMods mods;
    float scale_log2;
};

// Step i's S^T = K Q^T, once its stage has landed (ISSUE_S_EARLY): one commit group.
__device__ __forceinline__ void issue_step_s(float (&s)[ST_REGS], const ConsumerCtx& c, const Barriers& bars, int i) {
    const int st = stage_of(i);
    mbar_wait(bars.full + 8 * st, phase_of(i));
    issue_transposed_scores(s, c.k_rows, c.smem + SMEM_Q + st * Q_BYTES + c.q0 * SWIZZLE_BYTES);
}

// Raw dot products -> scores (softcap, ALiBi, the band's mask where the tile crosses an edge),
// as the forward saw them. Rows of S^T are keys, columns queries.
__device__ __forceinline__ void score_tile(float (&s)[ST_REGS], const ConsumerCtx& c, int m_start) {
    const int q_start = m_start + c.q0;
    const bool needs_mask = tile_needs_mask(q_start, ST_COLS, c.key_start, WGMMA_M, c.mods.seqlen_k, c.mods.band);
    if (!(HAS_SOFTCAP || HAS_ALIBI || needs_mask)) return;
#pragma unroll
    for (int i = 0; i < ST_REGS; ++i)
        s[i] = modified_score(s[i], q_start + acc_col(i, c.t), c.key_start + acc_row(i, c.t), c.mods, needs_mask);
}

// The softmax backward, in place: P^T = exp2(S^T scale_log2 - lse2[query]) into s, and dS^T =
// P^T (dP^T - delta[query]) into dp (times 1 - t^2 under a softcap, t being the score S^T holds).
// A thread's columns are 8 j + 2 (t % 4) + {0, 1}: one 8-byte load of lse2 and of delta per j
// (both pointing at the consumer's first query).
__device__ __forceinline__ void softmax_backward(float (&s)[ST_REGS], float (&dp)[ST_REGS], const float* lse2,
                                                 const float* delta, float scale_log2, int t) {
#pragma unroll
    for (int j = 0; j < ST_COLS / 8; ++j) {
        const int col = 8 * j + 2 * (t % 4);
        const float2 l = *(const float2*)(lse2 + col), d = *(const float2*)(delta + col);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = 4 * j + e;  // acc_col(i, t) == col + i % 2
            const float score = s[i];
            const float p = fast_exp2(score * scale_log2 - (e % 2 ? l.y : l.x));
            const float ds = p * (dp[i] - (e % 2 ? d.y : d.x));
            s[i] = p;
            dp[i] = HAS_SOFTCAP ? ds * softcap_grad(score) : ds;
        }
    }
}

// dS^T or P^T (packed to 16 bits, as the A fragments of dK += dS^T Q) into the consumer's rows
// and queries of sdS or sP, swizzled: register r of k step kk holds columns (c, c + 1) of one
// row. The eight rows a warp writes at once fall in eight different 16-byte chunks: no bank
// conflicts.
__device__ __forceinline__ void stage_transposed(u32 ds_buf, const u32 (&ds)[ST_STEPS][4], const ConsumerCtx& c) {
#pragma unroll
    for (int kk = 0; kk < ST_STEPS; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int i = 8 * kk + 2 * r;
            const int row = c.key_row + acc_row(i, c.t), col = c.q0 + acc_col(i, c.t);
            const u32 addr = ds_buf + (col / SWIZZLE_ELEMS) * DS_BOX_BYTES + swizzled_offset(row, col % SWIZZLE_ELEMS);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(ds[kk][r]) : "memory");
        }
}

// dq_accum[rows, cols] += the consumer's dQ tile (float32 reductions, two columns at a time; the
// accumulator's rows are head_dim floats, an even number here, so a pair never straddles a row).
__device__ __forceinline__ void add_dq(float* dq_accum, i64 row_stride, const float (&dq)[DQ_REGS], int row0,
                                       int col0, int seqlen_q, int head_dim, int t) {
#pragma unroll
    for (int i = 0; i < DQ_REGS; i += 2) {
        const int row = row0 + acc_row(i, t), col = col0 + acc_col(i, t);
        if (row < seqlen_q && col < head_dim) atomic_add_pair(dq_accum + row * row_stride + col, dq[i], dq[i + 1]);
    }
}

// The rows of (batch, head) in dq_accum, from the sequence's first (q_start).
__device__ __forceinline__ float* dq_accum_rows(const AttnParams& p, int batch, int head, int q_start) {
    return (float*)p.dq_accum.ptr + batch * p.dq_accum.batch_stride + head * p.dq_accum.head_stride +
           (i64)q_start * p.dq_accum.row_stride;
}

// Boxes [first, first + boxes) of the consumer's dQ tile into its sdQ boxes from the first,
// swizzled as the copy engine reads them: two columns (8 bytes) a store; a warp's 32 stores cover
// 16 distinct 16-byte chunks, two per bank group: the minimum of two wavefronts for 256 bytes.
__device__ __forceinline__ void stage_dq(u32 sdq, const float (&dq)[DQ_REGS], int first, int boxes, int t) {
#pragma unroll
    for (int i = first * DQ_BOX_REGS; i < (first + boxes) * DQ_BOX_REGS; i += 2) {
        const int row = acc_row(i, t), col = acc_col(i, t) - first * DQ_BOX_COLS;
        const u32 addr = sdq + (col / DQ_BOX_COLS) * DQ_BOX_BYTES + swizzled_offset_f32(row, col % DQ_BOX_COLS);
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(dq[i]), "f"(dq[i + 1]) : "memory");
    }
}

// One gradient (64 keys x KV_COLS, times `scale`) into the consumer's rows and columns of a
// K/V-shaped tile, swizzled as the TMA store reads it.
__device__ __forceinline__ void stage_rows(u32 tile, const float (&acc)[DKV_REGS], float scale, const ConsumerCtx& c) {
#pragma unroll
    for (int i = 0; i < DKV_REGS; i += 2) {
        const int row = c.key_row + acc_row(i, c.t), col = c.kv_col0 + acc_col(i, c.t);
        const u32 addr = tile + (col / SWIZZLE_ELEMS) * KV_BOX_BYTES + swizzled_offset(row, col % SWIZZLE_ELEMS);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pack_float2(acc[i] * scale, acc[i + 1] * scale))
                     : "memory");
    }
}

// A packed batch's gradient rows straight from the registers, only the sequence's (a TMA box would
// write into the next sequence's rows): two 16-bit values a store. g: dK or dV; batch stride 0.
__device__ __forceinline__ void store_rows(const TensorRef& g, const float (&acc)[DKV_REGS], float scale,
                                           const ConsumerCtx& c, int kv_head, int k_row0, int seqlen_k,
                                           int head_dim) {
    unsigned char* head = (unsigned char*)g.ptr + kv_head * g.head_stride * 2;
#pragma unroll
    for (int i = 0; i < DKV_REGS; i += 2) {
        const int key = c.key_start + acc_row(i, c.t), col = c.kv_col0 + acc_col(i, c.t);
        if (key < seqlen_k && col < head_dim)
            *(u32*)(head + ((i64)(k_row0 + key) * g.row_stride + col) * 2) =
                pack_float2(acc[i] * scale, acc[i + 1] * scale);
    }
}

// Epilogue: dK (times the attention scale) and dV through the consumer's rows of sK and sV, and a
// TMA store per 64-column box (a packed batch: store_rows). sK is read by both consumers' dQ
// products until their last step.
__device__ __forceinline__ void write_gradients(const ConsumerCtx& c, const float (&dk)[DKV_REGS],
                                                const float (&dv)[DKV_REGS], const AttnParams& p, const TmaDesc* tm_dk,
                                                const TmaDesc* tm_dv, const Sequence& seq, int kv_head, int batch) {
    if (IS_VARLEN) {
        store_rows(p.dk, dk, p.grad_scale, c, kv_head, seq.k_start, seq.seqlen_k, p.head_dim);
        store_rows(p.dv, dv, 1.f, c, kv_head, seq.k_start, seq.seqlen_k, p.head_dim);
        if (DQ_TMA && COMPUTE_DQ && c.t == 0) tma_store_wait_read();  // the last dQ reduce-add has read sdQ
        return;
    }
    const float grad_scale = p.grad_scale;
    named_barrier_sync(BAR_EPILOGUE, CONSUMER_THREADS);  // both consumers' last dQ = dS K is done
    stage_rows(c.smem + SMEM_K, dk, grad_scale, c);
    stage_rows(c.smem + SMEM_V, dv, 1.f, c);
    fence_proxy_async();  // the copy engine reads what these ordinary stores wrote
    named_barrier_sync(BAR_STORE + c.consumer, WARPGROUP_THREADS);  // every row of the consumer is staged
    if (c.t == 0) {
        const u32 rows = c.key_row * SWIZZLE_BYTES;
#pragma unroll
        for (int b = 0; b < KV_COLS / SWIZZLE_ELEMS; ++b) {
            const int box = c.kv_col0 / SWIZZLE_ELEMS + b;
            tma_store_4d(tm_dk, c.smem + SMEM_K + box * KV_BOX_BYTES + rows, box * SWIZZLE_ELEMS, c.key_start,
                         kv_head, batch);
            tma_store_4d(tm_dv, c.smem + SMEM_V + box * KV_BOX_BYTES + rows, box * SWIZZLE_ELEMS, c.key_start,
                         kv_head, batch);
        }
        tma_store_commit();
        tma_store_wait_read();  // shared memory stays allocated until the stores (and the last
                                // dQ reduce-add, committed earlier by this thread) have read it
    }
}

// ---- entry point ------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
flash_bwd_sm90(const __grid_constant__ TmaDesc tm_q, const __grid_constant__ TmaDesc tm_k,
               const __grid_constant__ TmaDesc tm_v, const __grid_constant__ TmaDesc tm_do,
               const __grid_constant__ TmaDesc tm_dk, const __grid_constant__ TmaDesc tm_dv,
#if COMPUTE_DQ
               const __grid_constant__ TmaDesc tm_dq,
#endif
               const AttnParams p) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The 128-byte swizzle repeats every 1024 bytes and the descriptors assume atoms start there.
    const u32 smem = (smem_addr(smem_raw) + SWIZZLE_ATOM_BYTES - 1) / SWIZZLE_ATOM_BYTES * SWIZZLE_ATOM_BYTES;
    unsigned char* smem_generic = smem_raw + (smem - smem_addr(smem_raw));
    const Barriers bars = barriers(smem + SMEM_BARS);

    const int n_block = blockIdx.x, kv_head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int n_start = n_block * BLOCK_N;
    // A packed batch (IS_VARLEN): blockIdx.z is the sequence, whose rows start at seq.q_start and
    // seq.k_start of the batch's one entry (the maps' batch coordinate 0); the grid covers the
    // longest sequence.
    const Sequence seq = sequence(batch, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
    if (IS_VARLEN && n_start >= seq.seqlen_k) return;  // the whole CTA, before any barrier
    const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
    const int map_batch = IS_VARLEN ? 0 : batch;
    const int first_head = kv_head * p.heads_per_kv;
    const ScoreMods mods0 = make_score_mods(seqlen_q, seqlen_k, p.window_left, p.window_right, p.softcap_scale,
                                            p.alibi_slopes + batch * p.alibi_batch_stride + first_head, p.scale);
    const Steps steps = steps_of(n_start, seqlen_q, seqlen_k, mods0.band, kv_head, p.heads_per_kv);

    if (threadIdx.x == 0) {
        mbar_init(bars.kv_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bars.full + 8 * s, 1 + WARP_SIZE);  // the TMA thread's expect_tx and the row warp
            mbar_init(bars.empty + 8 * s, CONSUMER_THREADS);
        }
        mbar_fence_init();
    }
    __syncthreads();  // barriers initialized before anyone waits on them; the last CTA-wide sync

    const int warpgroup = threadIdx.x / WARPGROUP_THREADS;
    if (warpgroup == 0) {
        // ---- producer ----
        setmaxnreg_dec<PRODUCER_REGS>();
        const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
        if (threadIdx.x == 0) {
            // The copy engine: K and V once, then each step's Q and dO.
            tma_prefetch(&tm_q);
            tma_prefetch(&tm_k);
            tma_prefetch(&tm_v);
            tma_prefetch(&tm_do);
            mbar_arrive_expect_tx(bars.kv_full, 2 * KV_BYTES);
            for (int box = 0; box < D_BOXES; ++box) {
                tma_load_4d(smem + SMEM_K + box * KV_BOX_BYTES, &tm_k, bars.kv_full, box * SWIZZLE_ELEMS,
                            seq.k_start + n_start, kv_head, map_batch);
                tma_load_4d(smem + SMEM_V + box * KV_BOX_BYTES, &tm_v, bars.kv_full, box * SWIZZLE_ELEMS,
                            seq.k_start + n_start, kv_head, map_batch);
            }
            StepCursor step = first_step(steps);
            for (int i = 0; i < steps.count; ++i, step.advance(steps)) {
                const int st = stage_of(i), head = step.head, m_start = step.m_start();
                const u32 full = bars.full + 8 * st;
                mbar_wait(bars.empty + 8 * st, phase_of(i) ^ 1);  // the consumers are done with this stage
                mbar_arrive_expect_tx(full, 2 * Q_BYTES);
                for (int box = 0; box < D_BOXES; ++box)
                    tma_load_4d(smem + SMEM_Q + st * Q_BYTES + box * Q_BOX_BYTES, &tm_q, full, box * SWIZZLE_ELEMS,
                                seq.q_start + m_start, head, map_batch);
                for (int box = 0; box < D_BOXES; ++box)
                    tma_load_4d(smem + SMEM_DO + st * Q_BYTES + box * Q_BOX_BYTES, &tm_do, full,
                                box * SWIZZLE_ELEMS, seq.q_start + m_start, head, map_batch);
            }
        } else if (warp == ROW_WARP) {
            // The row warp: each step's lse (base 2, +inf past the end and for rows that saw no
            // key) and delta (0 past the end), one arrival per lane after its stores.
            StepCursor step = first_step(steps);
            for (int i = 0; i < steps.count; ++i, step.advance(steps)) {
                const int st = stage_of(i), head = step.head, m_start = step.m_start();
                const float* lse =
                    (const float*)p.lse.ptr + batch * p.lse.batch_stride + head * p.lse.head_stride + seq.q_start;
                const float* delta = (const float*)p.delta.ptr + batch * p.delta.batch_stride +
                                     head * p.delta.head_stride + seq.q_start;
                float* s_lse = (float*)(smem_generic + SMEM_LSE) + st * BLOCK_M;
                float* s_delta = (float*)(smem_generic + SMEM_DELTA) + st * BLOCK_M;
                mbar_wait(bars.empty + 8 * st, phase_of(i) ^ 1);
                for (int r = lane; r < BLOCK_M; r += WARP_SIZE) {
                    const int row = m_start + r;
                    s_lse[r] = backward_lse2(lse, row, seqlen_q);
                    s_delta[r] = row < seqlen_q ? delta[row] : 0.f;
                }
                mbar_arrive(bars.full + 8 * st);  // release: the stores above are visible to the waiters
            }
        }
    } else {
        // ---- consumers ----
        setmaxnreg_inc<CONSUMER_REGS>();
        ConsumerCtx c;
        c.consumer = warpgroup - 1;
        c.t = threadIdx.x % WARPGROUP_THREADS;
        c.key_row = SHARED_KEYS ? 0 : c.consumer * WGMMA_M;
        c.key_start = n_start + c.key_row;
        c.q0 = SHARED_KEYS ? c.consumer * ST_COLS : 0;
        c.kv_col0 = SHARED_KEYS ? c.consumer * KV_COLS : 0;
        c.k_rows = smem + SMEM_K + c.key_row * SWIZZLE_BYTES;
        c.v_rows = smem + SMEM_V + c.key_row * SWIZZLE_BYTES;
        c.smem = smem;
        c.smem_generic = smem_generic;
        c.mods = mods0;
        c.scale_log2 = p.scale_log2;
        // This consumer's share of each step's dQ tile: its rows and its first column of K.
        const int dq_row0 = DQ_SPLIT_ROWS > 1 ? c.consumer * WGMMA_M : 0;
        const int dq_col0 = DQ_SPLIT_ROWS > 1 ? 0 : c.consumer * DQ_COLS;
        const u32 dq_ds_box = (dq_row0 / SWIZZLE_ELEMS) * DS_BOX_BYTES;
        const u32 dq_k_cols = smem + SMEM_K + (dq_col0 / SWIZZLE_ELEMS) * KV_BOX_BYTES;
        const u32 sdq = smem + SMEM_DQ + c.consumer * DQ_TILE_BYTES;
#if COMPUTE_DQ
        if (DQ_TMA && c.t == 0) tma_prefetch(&tm_dq);
#endif

        float dk[DKV_REGS], dv[DKV_REGS];
#pragma unroll
        for (int i = 0; i < DKV_REGS; ++i) dk[i] = dv[i] = 0.f;

        mbar_wait(bars.kv_full, 0);  // also before the epilogue reuses sK and sV when there is no step
        StepCursor step = first_step(steps);
#if ISSUE_S_EARLY
        float s[ST_REGS];  // S^T of the step about to run, issued during the one before
        if (steps.count > 0) issue_step_s(s, c, bars, 0);
#endif
        for (int i = 0; i < steps.count; ++i, step.advance(steps)) {
            const int st = stage_of(i), head = step.head, m_start = step.m_start();
            const u32 q_tile = smem + SMEM_Q + st * Q_BYTES, do_tile = smem + SMEM_DO + st * Q_BYTES;
            const u32 ds_buf = smem + SMEM_DS + (i % PDS_BUFFERS) * DS_BYTES;
            if (HAS_ALIBI) c.mods.alibi_coef = -p.alibi_slopes[batch * p.alibi_batch_stride + head] / p.scale;
#if !ISSUE_S_EARLY
            float s[ST_REGS];
#endif
            float dp[ST_REGS];
            u32 p_frag[ST_STEPS][4], ds_frag[ST_STEPS][4];

#if ISSUE_S_EARLY
            wgmma_wait<0>();                                 // S^T (issued during the last step) is ready
            pin_registers(s);
            issue_transposed_scores(dp, c.v_rows, do_tile + c.q0 * SWIZZLE_BYTES);  // dP^T = V dO^T
#else
            mbar_wait(bars.full + 8 * st, phase_of(i));
            const u32 q_rows = q_tile + c.q0 * SWIZZLE_BYTES, do_rows = do_tile + c.q0 * SWIZZLE_BYTES;
            issue_transposed_scores(s, c.k_rows, q_rows);    // S^T = K Q^T
            issue_transposed_scores(dp, c.v_rows, do_rows);  // dP^T = V dO^T
            wgmma_wait<1>();                                 // S^T is ready, dP^T may run on
            pin_registers(s);
#endif
            score_tile(s, c, m_start);                       // mask, softcap, ALiBi
            wgmma_wait<0>();
            pin_registers(dp);
            softmax_backward(s, dp, (const float*)(smem_generic + SMEM_LSE) + st * BLOCK_M + c.q0,
                             (const float*)(smem_generic + SMEM_DELTA) + st * BLOCK_M + c.q0, c.scale_log2, c.t);
            acc_to_a_operand<ST_COLS>(p_frag, s);             // P^T, 16-bit
            acc_to_a_operand<ST_COLS>(ds_frag, dp);           // dS^T, 16-bit
#if SHARED_KEYS
            // This consumer has P^T and dS^T of half the step's queries, and its half of dK and
            // dV needs them all: both halves meet in sP and sdS. With two buffers, these were
            // last read by the products of step i - 2, which both consumers waited for before the
            // barrier of i - 1; with one, by those of step i - 1: a barrier after both waited.
            const u32 p_buf = smem + SMEM_P + (i % PDS_BUFFERS) * DS_BYTES;
            if (PDS_BUFFERS == 1 && i > 0) named_barrier_sync(BAR_PDS_FREE, CONSUMER_THREADS);
            stage_transposed(p_buf, p_frag, c);
            stage_transposed(ds_buf, ds_frag, c);
            fence_proxy_async();                             // wgmma reads what these stores wrote
            named_barrier_sync(BAR_DS, CONSUMER_THREADS);
            const u32 kv_cols = (c.kv_col0 / SWIZZLE_ELEMS) * Q_BOX_BYTES;
            wgmma_fence();
            issue_key_gradient_ss(dv, p_buf, do_tile + kv_cols);   // dV += P^T dO
            issue_key_gradient_ss(dk, ds_buf, q_tile + kv_cols);   // dK += dS^T Q (scale at the end)
            wgmma_commit();
#if COMPUTE_DQ
            float dq[DQ_REGS];
            issue_dq(dq, ds_buf + dq_ds_box, dq_k_cols);     // dQ = dS K
#endif
#else
            wgmma_fence();
            issue_key_gradient(dv, p_frag, do_tile);         // dV += P^T dO
            issue_key_gradient(dk, ds_frag, q_tile);         // dK += dS^T Q (scale at the end)
            wgmma_commit();
#if COMPUTE_DQ
            stage_transposed(ds_buf, ds_frag, c);            // under the dV, dK wgmmas
            fence_proxy_async();                             // wgmma reads what these stores wrote
            // sdQ: the reduce-add of the previous step has read it (its issuing thread waits here,
            // a step after issuing it; the barrier below tells the others).
            if (DQ_TMA && c.t == 0) tma_store_wait_read();
            static_assert(!DQ_BY_BOX, "the box-by-box dQ path is the shared keys' only");
            // Both consumers' keys of dS^T are in this buffer. It was last read by the dQ
            // products of step i - 2, which both consumers waited for before the barrier of i - 1.
            named_barrier_sync(BAR_DS, CONSUMER_THREADS);
            float dq[DQ_REGS];
            issue_dq(dq, ds_buf + dq_ds_box, dq_k_cols);     // dQ = dS K
#endif
#endif  // SHARED_KEYS
            wgmma_wait<COMPUTE_DQ>();                        // dV, dK done: the stage is free
            pin_registers(dv);
            pin_registers(dk);
            pin_registers(p_frag);
            pin_registers(ds_frag);
            release(bars.empty + 8 * st);
#if COMPUTE_DQ
            wgmma_wait<0>();
            pin_registers(dq);
            // The next step's S^T goes to the tensor cores before this step's dQ leaves the
            // registers (ISSUE_S_EARLY). After the last step, this step's again, discarded: an
            // issue under a condition makes ptxas serialize every wgmma of the kernel (the
            // registers then merge at the loop's head by moves), and this stage, though released,
            // is loaded no more.
            if (ISSUE_S_EARLY) issue_step_s(s, c, bars, min(i + 1, steps.count - 1));
#if DQ_BY_BOX
            // dq_accum += dQ, each warp its 16 rows one 32-column box at a time through its 2 KB of
            // sdQ: its lane 0 waits until the warp's last reduce-add has read them, the warp
            // writes the box, and lane 0 issues its reduce-add.
            const int warp_row = (c.t / WARP_SIZE) * WARP_ROWS;
            const u32 sdq_warp = sdq + (c.t / WARP_SIZE) * DQ_WARP_BOX_BYTES;
#pragma unroll
            for (int box = 0; box < DQ_COLS / DQ_BOX_COLS; ++box) {
                if (c.t % WARP_SIZE == 0) tma_store_wait_read();
                __syncwarp();
                stage_dq(sdq, dq, box, 1, c.t);  // the warp's rows are its 2 KB of the 64-row box
                fence_proxy_async();  // the copy engine reads what these ordinary stores wrote
                __syncwarp();
                if (c.t % WARP_SIZE == 0) {
                    tma_reduce_add_4d(&tm_dq, sdq_warp, dq_col0 + box * DQ_BOX_COLS,
                                      seq.q_start + m_start + dq_row0 + warp_row, head, map_batch);
                    tma_store_commit();
                }
            }
#elif DQ_TMA
            // dq_accum += dQ: the tile through sdQ, one reduce-add per 32-column box.
            stage_dq(sdq, dq, 0, DQ_COLS / DQ_BOX_COLS, c.t);
            fence_proxy_async();  // the copy engine reads what these ordinary stores wrote
            named_barrier_sync(BAR_DQ + c.consumer, WARPGROUP_THREADS);
            if (c.t == 0) {
#pragma unroll
                for (int box = 0; box < DQ_COLS / DQ_BOX_COLS; ++box)
                    tma_reduce_add_4d(&tm_dq, sdq + box * DQ_BOX_BYTES, dq_col0 + box * DQ_BOX_COLS,
                                      seq.q_start + m_start + dq_row0, head, map_batch);
                tma_store_commit();
            }
#else
            add_dq(dq_accum_rows(p, batch, head, seq.q_start), p.dq_accum.row_stride, dq, m_start + dq_row0, dq_col0,
                   seqlen_q, p.head_dim, c.t);
#endif  // DQ_TMA
#endif  // COMPUTE_DQ
        }
        // The last step's discarded S^T (ISSUE_S_EARLY) still reads this consumer's rows of sK:
        // done before write_gradients stages dK there.
        if (ISSUE_S_EARLY) wgmma_wait<0>();
        // Shared memory stays allocated until each warp's last dQ reduce-add has read it.
        if (DQ_BY_BOX && c.t % WARP_SIZE == 0) tma_store_wait_read();
        write_gradients(c, dk, dv, p, &tm_dk, &tm_dv, seq, kv_head, batch);
    }
}
