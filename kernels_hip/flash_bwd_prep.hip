// delta_i = rowsum(dO_i * O_i) in float32, one value per query row, before the HIP backward
// kernels: the softmax backward dS = P * (dP - delta) needs it for every key tile, so it is
// computed once. A memory-bound pass; the mirror of flash_bwd_preprocess in
// kernels_cuda/flash_bwd_prep.cu, on HIP's device API.
//
// Grid: x = block of BLOCK_M query rows, y = query head, z = batch. The block's threads form groups
// of ROW_LANES lanes; each group owns rows and its lanes stride along the head dim (coalesced), so
// any head dim and any stride work. Groups of 32 lanes lie inside one wave whether the wave has 32
// or 64 lanes, so the reduction is the same shuffle code in both (and on NVIDIA in the tests).
//
// compile time: ELEM_TYPE (platform.h), WAVE_SIZE, NUM_WAVES, BLOCK_M (rows per block)
// Takes the backward's AttnParams (kernels_common/params.h) and reads o, dout, delta, seqlen_q (every
// query row of the entry: a packed batch is one entry of all its rows) and head_dim.

#include "platform.h"
#include "../kernels_common/params.h"

#define NUM_THREADS (NUM_WAVES * WAVE_SIZE)
#define ROW_LANES 32
#define ROW_GROUPS (NUM_THREADS / ROW_LANES)
static_assert(BLOCK_M % ROW_GROUPS == 0, "rows split evenly over the groups");

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_bwd_preprocess(const AttnParams p) {
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int group = threadIdx.x / ROW_LANES, lane = threadIdx.x % ROW_LANES;
    const int seqlen_q = p.seqlen_q, head_dim = p.head_dim;
    const i64 o_row_stride = p.o.row_stride, dout_row_stride = p.dout.row_stride;
    const elem_t* o = (const elem_t*)p.o.ptr + batch * p.o.batch_stride + head * p.o.head_stride;
    const elem_t* dout = (const elem_t*)p.dout.ptr + batch * p.dout.batch_stride + head * p.dout.head_stride;
    float* delta = (float*)p.delta.ptr + batch * p.delta.batch_stride + head * p.delta.head_stride;
    for (int row = blockIdx.x * BLOCK_M + group; row < min(seqlen_q, (blockIdx.x + 1) * BLOCK_M); row += ROW_GROUPS) {
        float sum = 0.f;
        for (int d = lane; d < head_dim; d += ROW_LANES)
            sum = fmaf(to_float(o[row * o_row_stride + d]), to_float(dout[row * dout_row_stride + d]), sum);
#pragma unroll
        for (int lane_mask = ROW_LANES / 2; lane_mask > 0; lane_mask /= 2) sum += shfl_xor(sum, lane_mask, ROW_LANES);
        if (lane == 0) delta[row] = sum;
    }
}
