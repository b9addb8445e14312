// Small kernels around the FlashAttention-2 backward (flash_bwd_dkdv.cu): both are memory-bound passes.
//
// flash_bwd_preprocess: delta_i = rowsum(dO_i * O_i) in float32, one value per query row; the
//   softmax backward dS = P * (dP - delta) needs it for every key tile, so it is computed once.
// flash_bwd_convert_dq: dQ = scale * dq_accum, cast to the input type and written with dq's
//   strides. dq_accum is the float32 (B, Hq, Sq, head_dim) buffer that flash_bwd_dkdv adds into.
//
// Grid: x = block of ROWS_PER_BLOCK query rows, y = query head, z = batch. Each warp owns
// ROWS_PER_WARP rows. 16-bit rows that start 16-byte aligned with a head dim of 8 * 2^k (<= 256)
// move in 16-byte vectors: head_dim / 8 lanes per row, 8 elements a lane, several rows per warp
// instruction (Nsight Compute on an H200, D128: the element-wise passes reached 2.5 and 3.4 TB/s
// where cuDNN's reached 3.7, ci/results/2026-11-30-session5/). Any other call (float32, other head
// dims, views not 16-byte aligned) takes the element-wise path: lanes stride along the head dim.
//
// compile time: ELEM_F32, ELEM_BF16 (the element type, see platform.h); NUM_WARPS and
// ROWS_PER_WARP (xattn/kernels.py, which computes the grid from them).

#include "platform.h"
#include "../kernels_common/params.h"

#if !defined(NUM_WARPS) || !defined(ROWS_PER_WARP)
#error "NUM_WARPS, ROWS_PER_WARP: set with -D by xattn/kernels.py"
#endif
#define ROWS_PER_BLOCK (NUM_WARPS * ROWS_PER_WARP)

// ---- the 16-byte vector path ------------------------------------------------------------------
// Lanes per row, or 0 where the element-wise path must serve: the head dim is not 8 * 2^k <= 256,
// or one of the 16-bit row arrays does not start every row on 16 bytes.
__device__ __forceinline__ int vector_lanes(int head_dim, const void* a, i64 a_rows, const void* b, i64 b_rows) {
    const int lanes = head_dim / 8;
    const bool shape = !ELEM_F32 && head_dim % 8 == 0 && lanes <= WARP_SIZE && (lanes & (lanes - 1)) == 0;
    const bool aligned = (((unsigned long long)a | (unsigned long long)b) % 16 == 0) && a_rows % 8 == 0 && b_rows % 8 == 0;
    return shape && aligned ? lanes : 0;
}

// The 8 elements of a 16-byte vector as floats.
__device__ __forceinline__ void unpack8(const uint4& v, float (&x)[8]) {
    const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        x[2 * i] = to_float((elem_t)(words[i] & 0xffffu));
        x[2 * i + 1] = to_float((elem_t)(words[i] >> 16));
    }
}

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
    const int row0 = blockIdx.x * ROWS_PER_BLOCK + warp * ROWS_PER_WARP;
#if !ELEM_F32
    const int lanes = (unsigned long long)dq_accum % 16 ? 0
                      : vector_lanes(p.head_dim, o, p.o.row_stride, dout, p.dout.row_stride);
    if (lanes) {
        // Every lane runs every pass (the shuffles need the whole warp); a lane past the warp's
        // rows or the sequence adds zeros and writes nothing.
        const int rows_per_pass = WARP_SIZE / lanes, col = (lane % lanes) * 8;
        for (int r0 = 0; r0 < ROWS_PER_WARP; r0 += rows_per_pass) {
            const int r = r0 + lane / lanes, row = row0 + r;
            const bool valid = r < ROWS_PER_WARP && row < p.seqlen_q;
            float sum = 0.f;
            if (valid) {
                float x[8], y[8];
                unpack8(*(const uint4*)(o + row * p.o.row_stride + col), x);
                unpack8(*(const uint4*)(dout + row * p.dout.row_stride + col), y);
#pragma unroll
                for (int i = 0; i < 8; ++i) sum += x[i] * y[i];
                if (dq_accum) {
                    float4* z = (float4*)(dq_accum + (i64)row * p.head_dim + col);
                    z[0] = z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
                }
            }
            for (int lane_mask = lanes / 2; lane_mask > 0; lane_mask /= 2) sum += shfl_xor(sum, lane_mask);
            if (valid && lane % lanes == 0) delta[row] = sum;
        }
        return;
    }
#endif
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = row0 + r;
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
    const int row0 = blockIdx.x * ROWS_PER_BLOCK + warp * ROWS_PER_WARP;
#if !ELEM_F32
    const int lanes = vector_lanes(p.head_dim, dq, p.dq.row_stride, dq_accum, p.head_dim);
    if (lanes) {
        const int rows_per_pass = WARP_SIZE / lanes, col = (lane % lanes) * 8;
        for (int r = lane / lanes; r < ROWS_PER_WARP; r += rows_per_pass) {
            const int row = row0 + r;
            if (row >= p.seqlen_q) break;
            const float4* a = (const float4*)(dq_accum + (i64)row * p.head_dim + col);
            const float4 lo = a[0], hi = a[1];
            const float g = p.grad_scale;
            *(uint4*)(dq + row * p.dq.row_stride + col) =
                make_uint4(pack_float2(lo.x * g, lo.y * g), pack_float2(lo.z * g, lo.w * g),
                           pack_float2(hi.x * g, hi.y * g), pack_float2(hi.z * g, hi.w * g));
        }
        return;
    }
#endif
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = row0 + r;
        if (row >= p.seqlen_q) break;
        for (int d = lane; d < p.head_dim; d += WARP_SIZE)
            dq[row * p.dq.row_stride + d] = from_float(dq_accum[(i64)row * p.head_dim + d] * p.grad_scale);
    }
}
