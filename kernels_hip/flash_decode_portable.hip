// Flash-decoding on AMD without matrix instructions: the CUDA-core decode body both vendors share,
// kernels_common/flash_decode_simt.h (read it, and decode_common.h), entered with this platform's
// names, plus the split-KV merge and the append of new rows, which the matrix-core decode
// (flash_decode_mfma.hip) uses too. Serves float32 on every AMD GPU, float16/bfloat16 where no
// MFMA/WMMA row does, FP8 caches (KV_FP8: the matrix-core decode has no FP8 variant) and paged
// caches (IS_PAGED, with the run-time p.page_size). Runs in wave64 (CDNA, GCN), wave32 (RDNA) and,
// through the test-only tests/hip_on_cuda.h, on NVIDIA GPUs (tests/test_hip_decode.py).
//
// xattn/hip.py launches, on one DecodeParams block (kernels_common/params.h): the append (when
// there are new rows), then the decode, then (with several splits) the merge: the decode reads all
// its keys from the caches (FUSED_APPEND 0).
//
// compile time (xattn/kernels.py, _hip_portable_defines; the variant's flags from xattn/hip.py):
// ELEM_TYPE (0 float16, 1 bfloat16, 2 float32), WAVE_SIZE (32 or 64), HEAD_DIM (multiple of
// WAVE_SIZE), BLOCK_M (query rows per tile), BLOCK_N (keys per pipeline step of the block),
// NUM_WAVES, HAS_SOFTCAP, IS_PAGED, KV_FP8 (IS_CAUSAL, IS_LOCAL: the band is run-time here).

#include "platform.h"

// The body's names for this build's configuration (decode_common.h lists them).
#define NUM_WARPS NUM_WAVES
#define WARP_N (BLOCK_N / NUM_WAVES)  // keys of each wave per step
#define STAGES 1                      // synchronous copies: one ring slot (platform.h)
#define VEC_LOADS 0                   // the copies convert element by element
#define SOFTCAP HAS_SOFTCAP
#define FUSED_APPEND 0                // kvcache_append_portable runs first
#include "../kernels_common/flash_decode_simt.h"

// ---- entry points -----------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_decode_portable(const DecodeParams p) {
    flash_decode_simt(p);
}

// Combine the num_splits partials of each query row, one wave per row:
// LSE2 = log2(sum_s 2^LSE2_s), O = sum_s 2^(LSE2_s - LSE2) O_s; splits with LSE2_s = -inf add
// nothing; the row's sink (if any) is one more partial of LSE2 sinks[h] * log2(e) and O 0. Grid: x over the (B, Hq, Sq) rows of a batch entry in groups of NUM_WAVES, z = batch.
extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_decode_merge_portable(const DecodeParams p) {
    TENSOR_FROM_PARAMS(elem_t, o, p.o);
    TENSOR_FROM_PARAMS(float, lse, p.lse);
    const float* __restrict__ o_part = p.o_part;
    const float* __restrict__ lse_part = p.lse_part;
    const int heads_q = p.heads_q, seqlen_q = p.seqlen_q, head_dim = p.head_dim, num_splits = p.num_splits;
    const int wave = threadIdx.x / WAVE_SIZE, lane = threadIdx.x % WAVE_SIZE;
    const int row = blockIdx.x * NUM_WAVES + wave, batch = blockIdx.z + p.batch_offset;
    if (row >= heads_q * seqlen_q) return;  // the whole wave leaves together
    const int head = row / seqlen_q, token = row % seqlen_q;
    const i64 part_row = ((i64)batch * heads_q * seqlen_q + row) * num_splits;
    const float* lp = lse_part + part_row;
    const float* op = o_part + part_row * HEAD_DIM;
    const float sink2 = p.sinks != nullptr ? p.sinks[head] * LOG2_E : NEG_INF;

    float m = sink2;
    for (int s = lane; s < num_splits; s += WAVE_SIZE) m = fmaxf(m, lp[s]);
    for (int lane_mask = WAVE_SIZE / 2; lane_mask > 0; lane_mask /= 2) m = fmaxf(m, shfl_xor(m, lane_mask));
    float sum = 0.f;
    for (int s = lane; s < num_splits; s += WAVE_SIZE)
        if (lp[s] != NEG_INF) sum += fast_exp2(lp[s] - m);  // a NaN LSE_s makes the sum NaN
    for (int lane_mask = WAVE_SIZE / 2; lane_mask > 0; lane_mask /= 2) sum += shfl_xor(sum, lane_mask);
    if (sink2 != NEG_INF) sum += fast_exp2(sink2 - m);  // the sink: weight, no value (every lane)
    const float lse2 = sum != 0.f ? m + log2f(sum) : NEG_INF;

    o += batch * o_batch_stride + head * o_head_stride + token * o_row_stride;
    for (int col = lane; col < head_dim; col += WAVE_SIZE) {
        float acc = 0.f;
        for (int s = 0; s < num_splits; ++s)
            if (lp[s] != NEG_INF) acc += fast_exp2(lp[s] - lse2) * op[(i64)s * HEAD_DIM + col];
        o[col] = from_float(acc);
    }
    if (lane == 0 && lse != nullptr) lse[batch * lse_batch_stride + head * lse_head_stride + token] = lse2 * LN_2;
}

// Write k_new / v_new (B, Hk, Snew, D) into the caches at rows clamp(cache_seqlens[b], 0, Smax) + t
// (in their pages under IS_PAGED: only the pages those rows land in are written); rows that would
// land at or past Smax are dropped; FP8 caches get the codes of x / scale (decode_common.h,
// quantize_unit: the codes the decode reads for these rows too). One thread per element. Grid: x
// over the Hk * Snew * head_dim elements of a batch entry, z = batch.
extern "C" __global__ void __launch_bounds__(NUM_THREADS)
kvcache_append_portable(const DecodeParams p) {
    const int heads_k = p.heads_q / p.heads_per_kv, seqlen_new = p.seqlen_new, head_dim = p.head_dim;
    const i64 e = (i64)blockIdx.x * NUM_THREADS + threadIdx.x;
    if (e >= (i64)heads_k * seqlen_new * head_dim) return;
    const int row = (int)(e / head_dim), col = (int)(e % head_dim);
    const int t = row % seqlen_new;
    DecodeBlock b;  // the fields key_source reads
    b.batch = blockIdx.z + p.batch_offset;
    b.kv_head = row / seqlen_new;
    const int cached = p.cache_seqlens ? p.cache_seqlens[b.batch * p.seqlens_stride] : p.uniform_seqlen;
    b.cached = min(max(cached, 0), p.seqlen_max);
    const KeySource s = key_source(p, b);
    const int pos = s.cached + t;
    if (pos >= p.seqlen_max) return;
    cache_t* k = (cache_t*)s.k.cache + cache_row_offset(s, s.k, pos) + col;
    cache_t* v = (cache_t*)s.v.cache + cache_row_offset(s, s.v, pos) + col;
#if KV_FP8
    quantize_unit(k, fresh_row(s.k, t) + col, s.k.scale);
    quantize_unit(v, fresh_row(s.v, t) + col, s.v.scale);
#else
    *k = fresh_row(s.k, t)[col];  // the element as it is: no float round trip
    *v = fresh_row(s.v, t)[col];
#endif
}
