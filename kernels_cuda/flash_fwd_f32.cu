// The float32 forward on NVIDIA: the CUDA-core body both vendors share,
// kernels_common/flash_fwd_simt.h (read it), entered with this platform's names. Exact float32
// arithmetic: tensor cores would need tf32, 10 of float32's 23 mantissa bits.
//
// compile time: ELEM_F32 = 1, HEAD_DIM (multiple of 32), BLOCK_M, BLOCK_N (= 32, a warp: one row
// group), NUM_WAVES (warps), MIN_BLOCKS, and the body's flags.

#include "platform.h"
#include "../kernels_common/flash_fwd_simt.h"

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_fwd_f32(const AttnParams p) {
    flash_fwd_simt(p);
}
