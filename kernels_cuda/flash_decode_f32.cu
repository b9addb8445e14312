// Flash-decoding on CUDA cores: float32 queries against a float32 or FP8 KV cache (contiguous or
// paged), exact (no tf32). The body both vendors share, kernels_common/flash_decode_simt.h (read
// it, and decode_common.h), entered with this platform's names: cp.async rings STAGES deep, one
// row group (WARP_N = 32: lane = key), and the append fused into the decode.
//
// compile time: HEAD_DIM, BLOCK_M, NUM_WARPS, WARP_N (= 32), STAGES, VEC_LOADS, SOFTCAP,
// PAGE_SIZE, KV_FP8, L2_PREFETCH, MIN_BLOCKS (xattn/kernels.py, _decode_defines).

#define ELEM_F32 1
#include "platform.h"
#include "../kernels_common/flash_decode_simt.h"

static_assert(WARP_N == WARP_SIZE, "float32 on NVIDIA: lane = key");

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
flash_decode_f32(const __grid_constant__ DecodeParams p) {
    flash_decode_simt(p);
}
