// Helpers shared by the CUDA-core (SIMT) kernels, flash_fwd_f32.cu and flash_bwd_simt.cu: tiles
// kept as float32 in shared memory, and warp-wide reductions. The including kernel defines
// NUM_THREADS and HEAD_DIM; elem_t comes from platform.h (ELEM_F32 / ELEM_BF16).
#pragma once

#include "platform.h"

// Copy rows x HEAD_DIM elements into shared memory as float32, zeros outside valid_rows x head_dim.
// Consecutive threads take consecutive columns, so the global reads coalesce.
__device__ __forceinline__ void load_rows(float* smem, int smem_stride, const elem_t* gmem,
                                          i64 row_stride, int rows, int valid_rows, int head_dim,
                                          int tid) {
    for (int e = tid; e < rows * HEAD_DIM; e += NUM_THREADS) {
        int row = e / HEAD_DIM, col = e % HEAD_DIM;
        bool valid = row < valid_rows && col < head_dim;
        smem[row * smem_stride + col] = valid ? to_float(gmem[row * row_stride + col]) : 0.f;
    }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int lane_mask = WARP_SIZE / 2; lane_mask > 0; lane_mask /= 2) x = fmaxf(x, shfl_xor(x, lane_mask));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int lane_mask = WARP_SIZE / 2; lane_mask > 0; lane_mask /= 2) x += shfl_xor(x, lane_mask);
    return x;
}
