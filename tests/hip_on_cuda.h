// Test-only: the HIP device API that kernels_hip/platform.h and the portable kernels use, mapped
// onto CUDA, so that the portable HIP kernels compile with NVRTC and run on an NVIDIA GPU
// (tests/test_hip_portable.py). Prepended to the preprocessed HIP source; never shipped.
// Everything else the portable kernel uses (__syncthreads, threadIdx, exp2f, fmaf, logf, min,
// __int_as_float, __float_as_uint, __launch_bounds__, extern __shared__) is spelled the same in
// both APIs. NVRTC has no cuda_fp16.h here, so __half is a 16-bit word converted with PTX.
#pragma once

struct __half {
    unsigned short bits;
};

__device__ __forceinline__ __half __ushort_as_half(unsigned short x) {
    __half h;
    h.bits = x;
    return h;
}

__device__ __forceinline__ unsigned short __half_as_ushort(__half h) { return h.bits; }

__device__ __forceinline__ float __half2float(__half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
    return f;
}

__device__ __forceinline__ __half __float2half(float f) {  // round to nearest even, as HIP's
    __half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}

// HIP's __shfl_xor(var, lane_mask, width) has no mask argument: the whole wave takes part.
__device__ __forceinline__ float __shfl_xor(float x, int lane_mask, int width) {
    return __shfl_xor_sync(0xffffffffu, x, lane_mask, width);
}

__device__ __forceinline__ float __shfl(float x, int src_lane, int width) {
    return __shfl_sync(0xffffffffu, x, src_lane, width);
}

// kernels_hip/platform.h's wave barrier (its AMD form needs AMD builtins). A wave of 32 is a
// warp. A wave of 64 is two warps: they meet at a named barrier of their own (1 + wave; barrier
// 0 is __syncthreads), 64 threads, so a block may have up to 15 waves.
__device__ __forceinline__ void wave_barrier() {
#if WAVE_SIZE == 32
    __syncwarp();
#else
    static_assert(WAVE_SIZE == 64, "a wave is one or two NVIDIA warps");
    asm volatile("bar.sync %0, 64;" ::"r"(1 + (int)threadIdx.x / 64) : "memory");
#endif
}
