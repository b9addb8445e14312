// Small kernels around the FlashAttention-2 backward (flash_bwd_dkdv.cu): both are memory-bound passes.
//
// flash_bwd_preprocess: delta_i = rowsum(dO_i * O_i) in float32, one value per query row; the
//   softmax backward dS = P * (dP - delta) needs it for every key tile, so it is computed once.
// flash_bwd_convert_dq: dQ = scale * dq_accum, cast to the input type and written with dq's
//   strides. dq_accum is the float32 (B, Hq, Sq, head_dim) buffer that flash_bwd_dkdv adds into.
//
// Grid: x = block of ROWS_PER_BLOCK query rows, y = query head, z = batch. Each warp owns rows and
// its lanes stride along the head dim (coalesced), so any head dim and any stride work.
//
// compile time: ELEM_F32, ELEM_BF16 (the element type, see platform.h)

#include "platform.h"

#define NUM_WARPS 4
#define ROWS_PER_WARP 8
#define ROWS_PER_BLOCK (NUM_WARPS * ROWS_PER_WARP)

extern "C" __global__ void __launch_bounds__(NUM_WARPS * WARP_SIZE)
flash_bwd_preprocess(const elem_t* __restrict__ o, const elem_t* __restrict__ dout, float* __restrict__ delta,
                     i64 o_batch_stride, i64 o_head_stride, i64 o_row_stride,
                     i64 do_batch_stride, i64 do_head_stride, i64 do_row_stride,
                     i64 delta_batch_stride, i64 delta_head_stride,
                     int seqlen_q, int head_dim) {
    const int head = blockIdx.y, batch = blockIdx.z;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    o += batch * o_batch_stride + head * o_head_stride;
    dout += batch * do_batch_stride + head * do_head_stride;
    delta += batch * delta_batch_stride + head * delta_head_stride;
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = blockIdx.x * ROWS_PER_BLOCK + warp * ROWS_PER_WARP + r;
        if (row >= seqlen_q) break;
        float sum = 0.f;
        for (int d = lane; d < head_dim; d += WARP_SIZE)
            sum += to_float(o[row * o_row_stride + d]) * to_float(dout[row * do_row_stride + d]);
#pragma unroll
        for (int lane_mask = WARP_SIZE / 2; lane_mask > 0; lane_mask /= 2) sum += shfl_xor(sum, lane_mask);
        if (lane == 0) delta[row] = sum;
    }
}

extern "C" __global__ void __launch_bounds__(NUM_WARPS * WARP_SIZE)
flash_bwd_convert_dq(const float* __restrict__ dq_accum, elem_t* __restrict__ dq,
                     i64 dq_batch_stride, i64 dq_head_stride, i64 dq_row_stride,
                     int heads_q, int seqlen_q, int head_dim, float scale) {
    const int head = blockIdx.y, batch = blockIdx.z;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    dq_accum += ((i64)batch * heads_q + head) * seqlen_q * head_dim;
    dq += batch * dq_batch_stride + head * dq_head_stride;
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = blockIdx.x * ROWS_PER_BLOCK + warp * ROWS_PER_WARP + r;
        if (row >= seqlen_q) break;
        for (int d = lane; d < head_dim; d += WARP_SIZE) {
            dq[row * dq_row_stride + d] = from_float(dq_accum[(i64)row * head_dim + d] * scale);
        }
    }
}
