// The backward on NVIDIA's CUDA cores, in exact float32 arithmetic for any element type: the body
// both vendors share, kernels_common/flash_bwd_simt.h (read it), entered with this platform's
// names. It serves float32 (tensor cores would need tf32, 10 mantissa bits) and fp16/bf16 past the
// tensor-core backward's head dims.
//
// compile time: ELEM_F32, ELEM_BF16 (platform.h), HEAD_DIM (multiple of 32), BLOCK_ROWS, TILE
// (= 32, a warp: one row group), NUM_WAVES (warps), MIN_BLOCKS, and the body's flags.

#include "platform.h"
#include "../kernels_common/flash_bwd_simt.h"

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_bwd_simt_dq(const AttnParams p) {
    flash_bwd_simt_dq_body(p);
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_bwd_simt_dkdv(const AttnParams p) {
    flash_bwd_simt_dkdv_body(p);
}
