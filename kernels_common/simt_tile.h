// Helpers of the kernels that compute on plain FMA units, without matrix instructions (the
// CUDA-core / "portable" kernels, both vendors): tiles kept as float32 in shared memory (LDS),
// and reductions across groups of lanes. Needs the vendor's platform.h (elem_t, to_float,
// shfl_xor, WAVE_SIZE) and ../kernels_common/attention_common.h included first; the including
// kernel defines NUM_THREADS and HEAD_DIM.
#pragma once

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

// The rows [first_row, first_row + rows) of a sequence's K or V into shared memory as load_rows
// does: consecutive rows, or with IS_PAGED each through its page (attention_common.h:
// kv_row_offset; page_stride is the tensor's batch stride there). Rows past valid_rows are zeros
// and their addresses are never formed.
__device__ __forceinline__ void load_kv_rows(float* smem, int smem_stride, const elem_t* kv,
                                             const AttnParams& p, int batch, i64 page_stride,
                                             i64 row_stride, int first_row, int rows,
                                             int valid_rows, int head_dim, int tid) {
#if IS_PAGED
    for (int e = tid; e < rows * HEAD_DIM; e += NUM_THREADS) {
        int row = e / HEAD_DIM, col = e % HEAD_DIM;
        bool valid = row < valid_rows && col < head_dim;
        smem[row * smem_stride + col] =
            valid ? to_float(kv[kv_row_offset(p, batch, first_row + row, page_stride, row_stride) + col]) : 0.f;
    }
#else
    load_rows(smem, smem_stride, kv + first_row * row_stride, row_stride, rows, valid_rows, head_dim, tid);
#endif
}

// Max and sum over each group of WIDTH consecutive lanes (a power of two, at most the wave's and,
// for tests/hip_on_cuda.h's waves of 64, at most 32), left in every lane of the group.
template <int WIDTH = WAVE_SIZE>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
    for (int lane_mask = WIDTH / 2; lane_mask > 0; lane_mask /= 2) x = fmaxf(x, shfl_xor(x, lane_mask, WIDTH));
    return x;
}

template <int WIDTH = WAVE_SIZE>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int lane_mask = WIDTH / 2; lane_mask > 0; lane_mask /= 2) x += shfl_xor(x, lane_mask, WIDTH);
    return x;
}
