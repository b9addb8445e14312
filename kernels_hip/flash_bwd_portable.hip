// The backward without matrix instructions on AMD: the body both vendors share,
// kernels_common/flash_bwd_simt.h (read it), entered with this platform's names. Serves float32
// exactly on every AMD GPU, float16/bfloat16 on GPUs without MFMA/WMMA and, on CDNA, at head dims
// past the MFMA kernels' rows (their registers cannot hold dK and dV there). Runs in wave64 (CDNA,
// GCN), wave32 (RDNA) and, through the test-only tests/hip_on_cuda.h, on NVIDIA GPUs in both.
//
// compile time: ELEM_TYPE (0 float16, 1 bfloat16, 2 float32), WAVE_SIZE (32 or 64), HEAD_DIM,
// BLOCK_ROWS, TILE, NUM_WAVES, and the body's flags.

#include "platform.h"
#include "../kernels_common/flash_bwd_simt.h"

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_bwd_portable_dq(const AttnParams p) {
    flash_bwd_simt_dq_body(p);
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_bwd_portable_dkdv(const AttnParams p) {
    flash_bwd_simt_dkdv_body(p);
}
