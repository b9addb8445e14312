// NVIDIA-specific building blocks for the attention kernels: element types, warp shuffles,
// exp2, and the tensor-core instructions (ldmatrix, mma.sync m16n8k16, cp.async).
// Everything vendor-specific lives here so that the kernels read like the algorithm.
// No CUDA headers are included: NVRTC compiles this without cuda_fp16.h / cuda_bf16.h,
// so 16-bit values are carried as raw bits and converted with PTX.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu
// The kernels both vendors compile (kernels_common/) say wave, AMD's word: on NVIDIA, a warp.
#define WAVE_SIZE WARP_SIZE

// ---- element type ------------------------------------------------------------------------
// ELEM_BF16 = 1 selects bfloat16, 0 selects float16. Both are stored as raw 16-bit words.
#if ELEM_BF16
#define MMA_TYPE "bf16"
#else
#define MMA_TYPE "f16"
#endif

// Two floats -> one register of two 16-bit values, lo in the low half (round to nearest).
__device__ __forceinline__ u32 pack_float2(float lo, float hi) {
    u32 r;
#if ELEM_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ float elem_to_float(u16 x) {
#if ELEM_BF16
    return __uint_as_float(((u32)x) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}

// elem_t: the element type of a kernel's inputs and outputs, for kernels that serve all three
// dtypes with one source (ELEM_F32 = 1: float32, else the 16-bit type chosen by ELEM_BF16).
#if ELEM_F32
typedef float elem_t;
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float from_float(float x) { return x; }
#else
typedef u16 elem_t;
__device__ __forceinline__ float to_float(u16 x) { return elem_to_float(x); }
__device__ __forceinline__ u16 from_float(float x) { return (u16)(pack_float2(x, 0.f) & 0xffffu); }
#endif

// ---- math ----------------------------------------------------------------------------------
// ex2.approx: one MUFU op, relative error ~2^-22, and exp2(-inf) = 0 as the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// tanh from one ex2 and one fast division (rcp.approx), 1 - 2 / (1 + 2^{2y log2 e}): saturates
// exactly to +-1 (2 / inf = 0); near 0 the absolute error is a few float32 ulps of 1. An IEEE
// division here made softcap calls slower than tanhf (H100, `python -m xattn bench --variants`).
// Not tanh.approx: its 2^-11 error times c = 50 would move scores by 0.02.
__device__ __forceinline__ float fast_tanh(float y) {
    return 1.f - __fdividef(2.f, 1.f + fast_exp2(y * 2.8853900817779268f));  // 2 * log2(e)
}

// Butterfly exchange inside groups of `width` lanes (width a power of two, <= WARP_SIZE).
__device__ __forceinline__ float shfl_xor(float x, int lane_mask, int width = WARP_SIZE) {
    return __shfl_xor_sync(FULL_MASK, x, lane_mask, width);
}

// Lane src_lane's x, in every lane of the warp.
__device__ __forceinline__ float shfl(float x, int src_lane) { return __shfl_sync(FULL_MASK, x, src_lane); }

__device__ __forceinline__ bool warp_any(bool p) { return __any_sync(FULL_MASK, p); }

// A barrier among the lanes of one warp that also orders their shared-memory accesses.
__device__ __forceinline__ void wave_barrier() { __syncwarp(); }

// p[0] += a, p[1] += b in global memory, without a return value. Hopper adds both in one
// instruction (p must be 8-byte aligned); older GPUs take two.
__device__ __forceinline__ void atomic_add_pair(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// The same where `add` holds: on sm_90 one predicated instruction rather than a branch around it
// (a BSSY/BSYNC pair each).
__device__ __forceinline__ void atomic_add_pair_if(bool add, float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n @q red.global.add.v2.f32 [%0], {%1, %2};\n}"
                 ::"l"(p), "f"(a), "f"(b), "r"((int)add) : "memory");
#else  // two 4-byte adds: predicating them spilled the D128 causal backward on sm_80
    if (add) atomic_add_pair(p, a, b);
#endif
}

// ---- shared memory and async copies --------------------------------------------------------
// Copies global -> shared run asynchronously (cp.async): issued, grouped by cp_async_commit and
// waited for by cp_async_wait. kernels_hip/platform.h has synchronous copies instead.
#define ASYNC_COPIES 1

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// Shared-memory addresses below are 32-bit offsets in the shared window (u32), not generic
// pointers: they cost one register instead of two, and fold constant offsets into the instruction.

// 16-byte global->shared copy that bypasses L1, completed by cp_async_wait. With !valid the source
// size is 0: nothing is read and 16 zero bytes are written.
__device__ __forceinline__ void cp_async_16_zfill(u32 smem_dst, const void* gmem_src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src),
                 "r"(valid ? 16 : 0));
}

// The same with an L2 prefetch hint (PTX 7.4, sm_80+): the L2 fetches the 128- or 256-byte block
// around src along with it. For kernels that stream whole rows (the decode), where the neighbours
// are read next anyway; L2_BYTES 0 is the plain copy.
template <int L2_BYTES>
__device__ __forceinline__ void cp_async_16_zfill_l2(u32 smem_dst, const void* gmem_src, bool valid) {
    if (L2_BYTES == 256)
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(smem_dst),
                     "l"(gmem_src), "r"(valid ? 16 : 0));
    else if (L2_BYTES == 128)
        asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(smem_dst),
                     "l"(gmem_src), "r"(valid ? 16 : 0));
    else
        cp_async_16_zfill(smem_dst, gmem_src, valid);
}

// The same for 4 bytes, through L1 (cp.async.cg takes 16-byte copies only).
__device__ __forceinline__ void cp_async_4_zfill(u32 smem_dst, const void* gmem_src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_dst), "l"(gmem_src),
                 "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- tensor cores ----------------------------------------------------------------------------
// Four 8x8 matrices of 16-bit values; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_row));
}

// The same, transposed: turns row-major V (keys x dims) into the B operand of P.V.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_row));
}

// D (16x8, fp32) += A (16x16, row) * B (16x8, col). Fragment layout, with g = lane / 4 and
// t = lane % 4: c[0], c[1] hold row g, columns 2t and 2t+1; c[2], c[3] the same for row g+8.
__device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- FP8 (float8_e4m3fn / float8_e5m2 KV caches, KV_FP8 = 1 / 2; formats in fp8.h) -----------
// Two FP8 codes (the low byte is the first value) -> their two values, exactly: every value of both
// formats is a float16, bfloat16 and float32 value, so the caches' scales are applied afterwards,
// in float32. sm_89 and later convert a pair in one instruction (cvt.rn.f16x2.e4m3x2 / .e5m2x2,
// which also keeps NaN and, for e5m2, infinities); sm_80 and sm_86, the table's older rows, have no
// FP8 conversion and decode each code with fp8.h's integer decoder (~10 instructions a value: the
// one tests/test_fp8_codec.py checks bit for bit against torch). Chosen by instruction count, not
// measured: the conversion only costs time where the decode stops being memory-bound.
#if KV_FP8
#include "../kernels_common/fp8.h"
#if KV_FP8 == FP8_E4M3FN
#define FP8_PTX "e4m3x2"
#else
#define FP8_PTX "e5m2x2"
#endif

__device__ __forceinline__ void fp8x2_to_float2(u16 pair, float& lo, float& hi) {
#if __CUDA_ARCH__ >= 890
    u32 h2;
    asm("cvt.rn.f16x2." FP8_PTX " %0, %1;" : "=r"(h2) : "h"(pair));
    asm("{\n.reg .f16 l, h;\nmov.b32 {l, h}, %2;\ncvt.f32.f16 %0, l;\ncvt.f32.f16 %1, h;\n}"
        : "=f"(lo), "=f"(hi) : "r"(h2));
#elif KV_FP8 == FP8_E4M3FN
    lo = e4m3fn_to_float(pair & 0xffu);
    hi = e4m3fn_to_float(pair >> 8);
#else
    lo = e5m2_to_float(pair & 0xffu);
    hi = e5m2_to_float(pair >> 8);
#endif
}

#if !ELEM_F32
// The tensor-core decode multiplies FP8 codes in float16 whatever the query type: every FP8 value
// is a float16 value, and sm_89+ converts a pair to float16 in one instruction (to bfloat16 it
// took four: via float16 and two float32). These three are that product's float16 operands.

// The pair as two float16 values, packed (lo in the low half).
__device__ __forceinline__ u32 fp8x2_to_half2(u16 pair) {
    u32 h2;
#if __CUDA_ARCH__ >= 890
    asm("cvt.rn.f16x2." FP8_PTX " %0, %1;" : "=r"(h2) : "h"(pair));
#else
    float lo, hi;
    fp8x2_to_float2(pair, lo, hi);
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(h2) : "f"(hi), "f"(lo));
#endif
    return h2;
}

// Two floats -> two float16 values, packed (lo in the low half), round to nearest.
__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// mma_16816 on float16 operands.
__device__ __forceinline__ void mma_16816_f16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Bytes of x rearranged: byte i of the result is byte (selector >> 4i) & 3 of x (prmt).
template <u32 SELECTOR>
__device__ __forceinline__ u32 byte_perm(u32 x) {
    u32 r;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(x), "n"(SELECTOR));
    return r;
}

#endif
