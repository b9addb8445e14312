// The forward without matrix instructions on AMD: the body both vendors share,
// kernels_common/flash_fwd_simt.h (read it), entered with this platform's names. Serves float32
// exactly on every AMD GPU, and float16/bfloat16 where no MFMA/WMMA row does (RDNA before RDNA3,
// gfx9 before gfx908, head dims past the matrix-core rows); xattn/hip.py sends paged calls here
// too (the MFMA/WMMA forwards have no paged variant). Runs in wave64 (CDNA, GCN), wave32 (RDNA)
// and, through the test-only tests/hip_on_cuda.h, on NVIDIA GPUs.
//
// compile time: ELEM_TYPE (0 float16, 1 bfloat16, 2 float32), WAVE_SIZE (32 or 64), HEAD_DIM,
// BLOCK_M, BLOCK_N, NUM_WAVES, and the body's flags.

#include "platform.h"
#include "../kernels_common/flash_fwd_simt.h"

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
flash_fwd_portable(const AttnParams p) {
    flash_fwd_simt(p);
}
