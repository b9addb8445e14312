// Hopper (sm_90a) building blocks: the PTX of the copy engine (TMA), the asynchronous warpgroup
// matrix multiply (wgmma), transaction barriers (mbarrier), register reallocation (setmaxnreg)
// and named barriers, each behind a small typed function, plus the index helpers of wgmma's
// accumulator layout, so that the kernels of this folder read like the algorithm and no kernel
// writes a fragment layout by hand. Needs sm_90a (wgmma and setmaxnreg do not exist on sm_90).
#pragma once

#include "../platform.h"

typedef unsigned long long u64;

#define WARPGROUP_THREADS 128  // four consecutive warps issue one wgmma together
#define WGMMA_M 64             // rows of one wgmma: a warpgroup owns 64 rows of every product
#define WGMMA_K 16             // the k step of one 16-bit wgmma
#define SWIZZLE_BYTES 128      // shared-memory rows of 128 bytes, 16-byte chunks XOR-swizzled
#define SWIZZLE_ELEMS (SWIZZLE_BYTES / 2)  // 64 16-bit elements per swizzled row
#define SWIZZLE_ATOM_BYTES 1024            // 8 rows x 128 bytes: the pattern repeats after this

#include "wgmma_ops.h"

// ---- the wgmma accumulator layout -----------------------------------------------------------
// A warpgroup's m64nN f32 accumulator: thread t (0..127) of the warpgroup holds N / 2 values;
// warp t / 32 owns rows [16 (t / 32), 16 (t / 32) + 16), and value i of lane l sits at
//   row 16 (t / 32) + l / 4 + 8 ((i / 2) % 2),  column 8 (i / 4) + 2 (l % 4) + i % 2.
// So each thread holds two rows (half h = (i / 2) % 2) and the four lanes of a quad share a row.
__host__ __device__ __forceinline__ int acc_row(int i, int thread) {
    return 16 * (thread / WARP_SIZE) + (thread % WARP_SIZE) / 4 + 8 * ((i / 2) % 2);
}
__host__ __device__ __forceinline__ int acc_col(int i, int thread) {
    return 8 * (i / 4) + 2 * (thread % 4) + i % 2;
}
// Which of the thread's two rows value i is on (0: row l / 4, 1: row l / 4 + 8).
__host__ __device__ __forceinline__ int acc_half(int i) { return (i / 2) % 2; }
// The thread's row of half h (0 or 1), relative to the warpgroup's first row.
__host__ __device__ __forceinline__ int acc_row_of_half(int h, int thread) {
    return 16 * (thread / WARP_SIZE) + (thread % WARP_SIZE) / 4 + 8 * h;
}

// The A operand of an RS wgmma (m64k16, 16-bit, in registers) has the accumulator's layout at
// half the width: the four registers of k step kk are the accumulator values 8 kk .. 8 kk + 7 of
// a product whose columns are that k dimension, packed in pairs. So P = softmax(S) feeds O += P V
// with no data movement: k step kk of P is values [8 kk, 8 kk + 8) of S.
template <int N>
__device__ __forceinline__ void acc_to_a_operand(u32 (&a)[N / 16][4], const float (&acc)[N / 2]) {
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) a[kk][r] = pack_float2(acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]);
}

// ---- wgmma ordering ---------------------------------------------------------------------------
// fence: before the first wgmma that reads registers (accumulators, A) written by other
// instructions. commit: close a group of issued wgmmas. wait<N>: until at most N groups are in
// flight. All three are executed by the whole warpgroup.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// The compiler does not know that a wgmma in flight still reads or writes its registers: this
// empty asm pins each value (no copy, no reordering across it) between issue and wait.
template <int N>
__device__ __forceinline__ void pin_registers(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin_registers(u32 (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// ---- shared-memory matrix descriptors -----------------------------------------------------------
// 64 bits: start address >> 4 (bits 0-13), leading-dimension byte offset >> 4 (16-29), stride
// byte offset >> 4 (32-45), swizzle mode (62-63; 1 = 128-byte). Every tile of this folder is
// stored as the TMA writes it under 128-byte swizzle: rows of 128 bytes (64 elements), groups of
// 8 rows (1024 bytes) apart, so the stride byte offset is always one swizzle atom.
//  K-major operand (Q, K): a k16 step is 32 bytes inside a row: advance the start address.
//  N-major operand (V as the B of P V): 64 columns per 128-byte row; the leading byte offset is
//  the distance to the next 64 columns (the next TMA box); a k16 step is two atoms down.
#define DESC_SWIZZLE_128B (1ull << 62)

// The descriptor of the tile at smem_address + offset (a multiple of 16 bytes: the products pass
// a tile's base and each k step's constant offset). Every shared-memory address is below 2^18,
// so the start-address field needs no mask: 1 ULOP3 fewer per descriptor (ncu,
// ci/results/2026-12-01-session10/: 2 ULOP3 per HGMMA in the D128 backward, 68M against cuDNN's
// 2M). Adding the offset to a descriptor built once from the base needs fewer still, but the
// base descriptors then stay live across the backward's loop and spill there (ptxas, NVRTC 13.0).
__device__ __forceinline__ u64 smem_descriptor(u32 smem_address, u32 offset, u32 leading_bytes) {
    const u32 low = ((smem_address + offset) >> 4) | ((leading_bytes >> 4) << 16);
    const u32 high = (SWIZZLE_ATOM_BYTES >> 4) | (u32)(DESC_SWIZZLE_128B >> 32);
    return ((u64)high << 32) | low;
}

// Byte offset of element (row, col) in a 128-byte-swizzled tile of 64 columns whose base is
// 1024-byte aligned: the 16-byte chunk index is XORed with the row's position in its atom.
__device__ __forceinline__ u32 swizzled_offset(int row, int col) {
    return row * SWIZZLE_BYTES + ((((col * 2) / 16) ^ (row % 8)) * 16) + (col * 2) % 16;
}

// The same for 32-bit elements (32 per 128-byte row): the float32 tiles the copy engine reduces
// into global memory.
__device__ __forceinline__ u32 swizzled_offset_f32(int row, int col) {
    return row * SWIZZLE_BYTES + ((((col * 4) / 16) ^ (row % 8)) * 16) + (col * 4) % 16;
}

// ---- transaction barriers (mbarrier) ------------------------------------------------------------
__device__ __forceinline__ void mbar_init(u32 bar, int arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}
// Makes initialized barriers visible to the copy engine (the async proxy).
__device__ __forceinline__ void mbar_fence_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also tells the barrier to wait for `bytes` of copies (complete_tx) to land.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Wait until the phase of parity `phase` has completed. A fresh barrier is in phase 0, so waiting
// on parity 1 passes at once: that is how a producer's first pass over empty stages goes through.
// No suspend-time hint: without one the producer polls its empty barriers about every 14 cycles
// (6x cuDNN's SYNCS instructions in the forward, ncu), but with a 10 ms hint (ptxas then sleeps
// between polls, NANOSLEEP.SYNCS) most rows ran 2-6% slower, the D256 forward up to 3% faster
// (ci/results/2026-12-01-session10/, calls 3-4): the polling costs the consumers nothing measurable.
__device__ __forceinline__ void mbar_wait(u32 bar, int phase) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "LAB_WAIT:\n"  // a label local to this { } block
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra.uni LAB_WAIT;\n}\n" ::"r"(bar),
        "r"(phase)
        : "memory");
}

// ---- the copy engine (TMA) ----------------------------------------------------------------------
// A CUtensorMap (built on the host, xattn/tma.py), passed by value as a __grid_constant__
// parameter: its address is then a param-space address the copy engine can read.
struct alignas(64) TmaDesc {
    u64 opaque[16];
};

__device__ __forceinline__ void tma_prefetch(const TmaDesc* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(map) : "memory");
}

// Copy the box at coordinates (c0 innermost .. c3) of a 4-D map into shared memory; the bytes
// count towards `bar`'s transaction. Elements outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaDesc* map, u32 bar, int c0, int c1, int c2,
                                            int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// Copy a shared-memory box to global memory; elements outside the tensor are not written.
__device__ __forceinline__ void tma_store_4d(const TmaDesc* map, u32 src, int c0, int c1, int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(map),
                 "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
                 : "memory");
}
// Add a shared-memory box element-wise into global memory (the map's element type; float32 here),
// atomically per element; elements outside the tensor are skipped. Completes like a store.
__device__ __forceinline__ void tma_reduce_add_4d(const TmaDesc* map, u32 src, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(map),
        "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
        : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until the stores of every committed group have read their shared memory (it may be reused or
// released after this).
__device__ __forceinline__ void tma_store_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

// Ordinary stores to shared memory that the copy engine or wgmma reads next: each writing thread
// fences before the barrier that publishes them.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- register reallocation and named barriers ---------------------------------------------------
// setmaxnreg moves registers between warpgroups: the kernel must be compiled with a register cap
// (__launch_bounds__(threads, 1)) and each role must be one branch of an if/else.
template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads, whole warps: sync waits for the
// count, arrive counts without waiting.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
