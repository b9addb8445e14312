// AMD-specific building blocks shared by the HIP attention kernels: element types, the wave
// size, cross-lane shuffles, exp2 and barriers. Written against HIP's device API only (hiprtc
// provides it without any #include), so that tests/hip_on_cuda.h can map the same names onto
// CUDA and the portable kernel runs on an NVIDIA GPU. The CDNA matrix-core wrappers are in
// mfma.h; nothing here is specific to one GPU generation.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// ---- wave size -----------------------------------------------------------------------------
// WAVE_SIZE is a compile-time parameter set by xattn/kernels.py from the target: 64 on CDNA and
// GCN (gfx9), 32 on RDNA (gfx10, gfx11: hiprtc's default there), 32 on NVIDIA for the tests.
// The compiler knows the real one on AMD: a mismatch is a compile error, not a wrong result.
#if defined(__AMDGCN_WAVEFRONT_SIZE)
static_assert(WAVE_SIZE == __AMDGCN_WAVEFRONT_SIZE, "WAVE_SIZE must match the target's wave size");
#endif

// ---- element type --------------------------------------------------------------------------
// ELEM_TYPE 0: float16, 1: bfloat16 (both carried as raw 16-bit words), 2: float32.
#if ELEM_TYPE == 2
typedef float elem_t;
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float from_float(float x) { return x; }
#else
typedef u16 elem_t;
#if ELEM_TYPE == 1
__device__ __forceinline__ float to_float(u16 x) { return __uint_as_float(((u32)x) << 16); }
// Round to nearest even; NaN stays a (quiet) NaN instead of rounding into infinity.
__device__ __forceinline__ u16 from_float(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (u16)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (u16)(bits >> 16);
}
#else
__device__ __forceinline__ float to_float(u16 x) { return __half2float(__ushort_as_half(x)); }
__device__ __forceinline__ u16 from_float(float x) { return __half_as_ushort(__float2half(x)); }
#endif
#endif

// ---- math and cross-lane operations --------------------------------------------------------
// v_exp_f32 on AMD: exp2(-inf) = 0, as the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }

// tanhf here: the exp2 form that serves CUDA (kernels_cuda/platform.h) pushes the gfx90a MFMA
// forward's softcap variant into register spills with ROCm 5.2's compiler, and no AMD GPU has
// measured which is faster.
__device__ __forceinline__ float fast_tanh(float y) { return tanhf(y); }

// Butterfly exchange inside groups of `width` lanes (width a power of two, <= WAVE_SIZE).
__device__ __forceinline__ float shfl_xor(float x, int lane_mask, int width = WAVE_SIZE) {
    return __shfl_xor(x, lane_mask, width);
}

// Lane src_lane's x, in every lane of the wave.
__device__ __forceinline__ float shfl(float x, int src_lane) { return __shfl(x, src_lane, WAVE_SIZE); }

// A barrier among the lanes of one wave that also orders their LDS accesses: what one lane
// wrote before it, every lane of the wave reads after it. The lanes of a wave already run in
// step; the wavefront-scope fences keep the compiler from moving LDS accesses across it and make
// it wait for the wave's outstanding LDS writes. On NVIDIA (tests/hip_on_cuda.h) a wave of 64 is
// two warps, and the test header defines it there.
#if defined(__AMDGCN__)
__device__ __forceinline__ void wave_barrier() {
    __builtin_amdgcn_fence(__ATOMIC_RELEASE, "wavefront");
    __builtin_amdgcn_wave_barrier();
    __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "wavefront");
}
#endif

// ---- copies global -> LDS ------------------------------------------------------------------
// Synchronous: a load and an LDS store, done when the lane moves on (no cp.async here). The
// decode's ring (kernels_common/decode_common.h) is then one slot deep, and its copies convert
// each element to float32 on the way; the commit and wait of CUDA's asynchronous copies
// (kernels_cuda/platform.h) have nothing to do.
#define ASYNC_COPIES 0
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
