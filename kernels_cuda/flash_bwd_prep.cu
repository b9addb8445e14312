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
// compile time: ELEM_F32, ELEM_BF16 (the element type, see platform.h); NUM_WARPS and
// ROWS_PER_WARP (xattn/kernels.py, which computes the grid from them).

#include "platform.h"
#include "../kernels_common/params.h"

#if !defined(NUM_WARPS) || !defined(ROWS_PER_WARP)
#error "NUM_WARPS, ROWS_PER_WARP: set with -D by xattn/kernels.py"
#endif
#define ROWS_PER_BLOCK (NUM_WARPS * ROWS_PER_WARP)

extern "C" __global__ void __launch_bounds__(NUM_WARPS * WARP_SIZE)
flash_bwd_preprocess(const AttnParams p) {
    // Reads p.o and p.dout, writes p.delta; p.seqlen_q rows per (batch, head) (a packed batch is one
    // entry of all its rows). When dQ is summed by atomics (p.dq_accum.ptr not null) it also zeroes
    // those rows of the accumulator, which the dK/dV kernel launched after it adds into: one pass
    // instead of a separate memset.
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const elem_t* o = (const elem_t*)p.o.ptr + batch * p.o.batch_stride + head * p.o.head_stride;
    const elem_t* dout = (const elem_t*)p.dout.ptr + batch * p.dout.batch_stride + head * p.dout.head_stride;
    float* delta = (float*)p.delta.ptr + batch * p.delta.batch_stride + head * p.delta.head_stride;
    float* dq_accum = p.dq_accum.ptr ? (float*)p.dq_accum.ptr + batch * p.dq_accum.batch_stride
                                           + head * p.dq_accum.head_stride
                                     : nullptr;
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = blockIdx.x * ROWS_PER_BLOCK + warp * ROWS_PER_WARP + r;
        if (row >= p.seqlen_q) break;
        float sum = 0.f;
        for (int d = lane; d < p.head_dim; d += WARP_SIZE) {
            sum += to_float(o[row * p.o.row_stride + d]) * to_float(dout[row * p.dout.row_stride + d]);
            if (dq_accum) dq_accum[(i64)row * p.head_dim + d] = 0.f;
        }
#pragma unroll
        for (int lane_mask = WARP_SIZE / 2; lane_mask > 0; lane_mask /= 2) sum += shfl_xor(sum, lane_mask);
        if (lane == 0) delta[row] = sum;
    }
}

extern "C" __global__ void __launch_bounds__(NUM_WARPS * WARP_SIZE)
flash_bwd_convert_dq(const AttnParams p) {
    // Reads p.dq_accum (contiguous float32 rows of p.head_dim), writes p.dq scaled by p.grad_scale.
    const int head = blockIdx.y, batch = blockIdx.z + p.batch_offset;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const float* dq_accum = (const float*)p.dq_accum.ptr + batch * p.dq_accum.batch_stride
                            + head * p.dq_accum.head_stride;
    elem_t* dq = (elem_t*)p.dq.ptr + batch * p.dq.batch_stride + head * p.dq.head_stride;
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = blockIdx.x * ROWS_PER_BLOCK + warp * ROWS_PER_WARP + r;
        if (row >= p.seqlen_q) break;
        for (int d = lane; d < p.head_dim; d += WARP_SIZE)
            dq[row * p.dq.row_stride + d] = from_float(dq_accum[(i64)row * p.head_dim + d] * p.grad_scale);
    }
}
