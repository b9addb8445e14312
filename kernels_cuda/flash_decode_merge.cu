// The merge of flash-decoding's splits (decode_common.h): one warp per query row combines the
// num_splits partials of the row, LSE = log2 sum_s 2^LSE_s and O = sum_s 2^(LSE_s - LSE) O_s, with
// the row's sink (if any) as one more partial of LSE sink_h * log2(e) and O 0.
// Splits with LSE_s = -inf saw no key and are skipped (their O_s is zero); a NaN LSE_s makes the
// row NaN. Launched only when a call has more than one split.
//
// Reads o_part (B, Hq, Sq, num_splits, HEAD_DIM) and lse_part (B, Hq, Sq, num_splits), float32,
// base 2, and sinks; writes o (B, Hq, Sq, D) in the element type and lse (B, Hq, Sq), natural log.
// Grid: x = ceil(Hq * Sq / MERGE_WARPS), z = batch - batch_offset.
//
// Compile-time configuration: ELEM_F32 / ELEM_BF16 (the output type), HEAD_DIM (the partials'
// padded row), MERGE_WARPS (warps per block, from xattn/kernels.py).

#include "platform.h"
#include "../kernels_common/params.h"
#include "../kernels_common/attention_common.h"

#define NUM_THREADS (MERGE_WARPS * WARP_SIZE)
#include "../kernels_common/simt_tile.h"

#define LN_2 0.6931471805599453f

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_decode_merge(const __grid_constant__ DecodeParams p) {
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * MERGE_WARPS + warp, batch = blockIdx.z + p.batch_offset;
    if (row >= p.heads_q * p.seqlen_q) return;  // the whole warp leaves together
    const int head = row / p.seqlen_q, token = row % p.seqlen_q;
    const int num_splits = p.num_splits;
    const i64 part_row = ((i64)batch * p.heads_q * p.seqlen_q + row) * num_splits;
    const float* lp = p.lse_part + part_row;
    const float* op = p.o_part + part_row * HEAD_DIM;
    const float sink2 = p.sinks != nullptr ? p.sinks[head] * LOG2_E : NEG_INF;

    float m = sink2;
    for (int s = lane; s < num_splits; s += WARP_SIZE) m = fmaxf(m, lp[s]);
    m = group_max(m);
    float sum = 0.f;
    for (int s = lane; s < num_splits; s += WARP_SIZE)
        if (lp[s] != NEG_INF) sum += fast_exp2(lp[s] - m);  // a NaN LSE_s makes the sum NaN
    sum = group_sum(sum);
    if (sink2 != NEG_INF) sum += fast_exp2(sink2 - m);     // the sink: weight, no value
    const float lse2 = sum != 0.f ? m + __log2f(sum) : NEG_INF;

    elem_t* o = (elem_t*)p.o.ptr + (i64)batch * p.o.batch_stride + (i64)head * p.o.head_stride +
                (i64)token * p.o.row_stride;
    for (int col = lane * 4; col < HEAD_DIM; col += WARP_SIZE * 4) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < num_splits; ++s) {
            const float ls = lp[s];
            if (ls == NEG_INF) continue;
            const float weight = fast_exp2(ls - lse2);
            const float4 x = *(const float4*)(op + (i64)s * HEAD_DIM + col);
            acc.x += weight * x.x;
            acc.y += weight * x.y;
            acc.z += weight * x.z;
            acc.w += weight * x.w;
        }
        const float out[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (col + e < p.head_dim) o[col + e] = from_float(out[e]);
    }
    if (p.lse.ptr != nullptr && lane == 0)
        ((float*)p.lse.ptr)[(i64)batch * p.lse.batch_stride + (i64)head * p.lse.head_stride + token] = lse2 * LN_2;
}
