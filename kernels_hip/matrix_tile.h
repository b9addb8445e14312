// Tile helpers shared by the matrix-core kernels (flash_fwd_mfma.hip, flash_bwd_mfma_dkdv.hip,
// flash_bwd_mfma_dq.hip): global -> LDS copies of 16-bit tiles (as stored, or transposed), fragment
// reads, the two product shapes every product of those kernels has, and the store of an
// accumulator whose column is an output row. Written against the matrix interface that mfma.h
// (CDNA, MATRIX_WMMA 0) and wmma.h (RDNA3/RDNA4, MATRIX_WMMA 1) both provide: blocks of
// MATRIX_M x MATRIX_N, ACC_ELEMS accumulator elements per lane, fragments frag_t.
// The including kernel defines HEAD_DIM, NUM_THREADS and VEC_LOADS first (as mma_tile.h on CUDA).
//
// VEC_LOADS 1: rows start 16-byte aligned and head_dim % 8 == 0, so global rows move in 16-byte
// loads and 8-byte stores; 0: element by element, masked.
#pragma once

#include "platform.h"
#ifndef MATRIX_WMMA
#define MATRIX_WMMA 0
#endif
#if MATRIX_WMMA
#include "wmma.h"
#else
#include "mfma.h"
#endif

#define CHUNK 8  // 16-bit elements per 16-byte global load
// LDS rows padded by LDS_PAD elements (mfma.h: 4, wmma.h: 8). MFMA: a fragment read is 8 bytes per
// lane, 16 lanes per LDS cycle, each lane its own row. With a row stride of 2 mod 4 dwords the 16
// rows start in 16 different even banks, so ds_read_b64 is conflict-free (row lengths are
// multiples of 32). wmma.h says why it pads by 8.
#define PAD LDS_PAD

// Copy a ROWS x HEAD_DIM tile from global memory into LDS: as stored into `rows` ([row][dim], row
// stride STRIDE) and/or transposed into `cols` ([dim][row], row stride T_STRIDE); a null destination
// is skipped (the calls pass literal nullptr, so the test folds away). Both from one global read
// when a kernel needs both forms. Zeros for rows >= valid_rows, rows < skip_rows (the decode's left
// padding) and columns >= head_dim: padded dims must add nothing, and rows outside the keys meet a
// zero factor, which would still turn a NaN bit pattern into NaN.
template <int ROWS, int STRIDE, int T_STRIDE>
__device__ __forceinline__ void load_tile(u16* rows, u16* cols, const u16* gmem, i64 row_stride,
                                          int valid_rows, int head_dim, int tid, int skip_rows = 0) {
#if VEC_LOADS
    constexpr int CHUNKS = ROWS * HEAD_DIM / CHUNK;
    for (int c = tid; c < CHUNKS; c += NUM_THREADS) {
        const int row = c / (HEAD_DIM / CHUNK), col = (c % (HEAD_DIM / CHUNK)) * CHUNK;
        uint4 chunk = make_uint4(0, 0, 0, 0);
        if (row >= skip_rows && row < valid_rows && col < head_dim) chunk = *(const uint4*)(gmem + row * row_stride + col);
        if (cols != nullptr) {
            const u16* e = (const u16*)&chunk;
#pragma unroll
            for (int i = 0; i < CHUNK; ++i) cols[(col + i) * T_STRIDE + row] = e[i];
        }
        if (rows != nullptr) {
            // 8-byte aligned (STRIDE is a multiple of 4): two 8-byte LDS stores.
            *(uint2*)(rows + row * STRIDE + col) = make_uint2(chunk.x, chunk.y);
            *(uint2*)(rows + row * STRIDE + col + 4) = make_uint2(chunk.z, chunk.w);
        }
    }
#else
    // Kept rolled: unrolled, its per-element address arithmetic exhausts the SGPRs of the
    // dK/dV kernel (spills, ci/hip_compile.py); this path serves only unaligned inputs anyway.
#pragma unroll 1
    for (int e = tid; e < ROWS * HEAD_DIM; e += NUM_THREADS) {
        const int row = e / HEAD_DIM, col = e % HEAD_DIM;
        const u16 x = row >= skip_rows && row < valid_rows && col < head_dim ? gmem[row * row_stride + col] : (u16)0;
        if (rows != nullptr) rows[row * STRIDE + col] = x;
        if (cols != nullptr) cols[col * T_STRIDE + row] = x;
    }
#endif
}

__device__ __forceinline__ frag_t lds_frag(const u16* smem, int offset) {
    return *(const frag_t*)(smem + offset);
}

// The fragments of rows [row0, row0 + MATRIX_M) of tile[row][k], all K_STEPS of them, into registers
// (operands that stay put for a whole loop: Q in the forward, K and V in dK/dV, Q and dO in dQ).
template <int K_STEPS, int STRIDE>
__device__ __forceinline__ void load_frags(frag_t (&frag)[K_STEPS], const u16* smem, int row0, int lane) {
#pragma unroll
    for (int ks = 0; ks < K_STEPS; ++ks) frag[ks] = lds_frag(smem, frag_offset(lane, row0, ks, STRIDE));
}

// An operand that stays put for a whole loop, as its K_STEPS fragments of rows [row0, row0 +
// MATRIX_N) of an LDS tile[row][k]. FRAGS_IN_LDS 0: copied into registers once (load_frags);
// 1: left in the tile, which then stays in LDS for the loop, and read at each use. The second is
// for the WMMA rows whose fixed operands and accumulators together do not fit wave32's 256 VGPRs
// (the frags_in_lds rows of xattn/configs.py, which has the arithmetic): one more LDS read per
// product step.
#ifndef FRAGS_IN_LDS
#define FRAGS_IN_LDS 0
#endif
// With FRAGS_IN_LDS, after each matrix instruction of a product: an empty asm statement that takes
// its accumulator and claims memory, so that the instruction is issued before it and no later
// LDS read after. Without it clang-19 issues every fragment read of a product ahead of the first
// WMMA (gfx11 dQ at D=128: 256 VGPRs of fragments in flight, 166 spills; with it, 126 VGPRs and
// none). __builtin_amdgcn_sched_barrier cannot do this: the WMMAs carry no memory dependence and
// were placed past every barrier before the scheduler ran. Costs the reads' latency, which the
// other waves of the SIMD must hide; not measured.
__device__ __forceinline__ void lds_read_fence(acc_t& acc) {
#if FRAGS_IN_LDS
    asm volatile("" : "+v"(acc) : : "memory");
#endif
}

template <int K_STEPS, int STRIDE>
struct FixedFrags {
#if FRAGS_IN_LDS
    const u16* tile;
    int row0;
    __device__ __forceinline__ void load(const u16* smem, int r0, int) { tile = smem, row0 = r0; }
    __device__ __forceinline__ frag_t at(int ks, int lane) const {
        return lds_frag(tile, frag_offset(lane, row0, ks, STRIDE));
    }
#else
    frag_t frag[K_STEPS];
    __device__ __forceinline__ void load(const u16* smem, int r0, int lane) {
        load_frags<K_STEPS, STRIDE>(frag, smem, r0, lane);
    }
    __device__ __forceinline__ frag_t at(int ks, int) const { return frag[ks]; }
#endif
};

// acc[b] = A_b B for the BLOCKS MATRIX_M-row blocks of A = tile[row][k] in LDS and B fixed
// (FixedFrags; with FRAGS_IN_LDS read from LDS once per block and step: those rows use one block).
template <int BLOCKS, int K_STEPS, int STRIDE, int B_STRIDE>
__device__ __forceinline__ void tile_times_frags(acc_t (&acc)[BLOCKS], const u16* sA,
                                                 const FixedFrags<K_STEPS, B_STRIDE>& b, int lane) {
#pragma unroll
    for (int blk = 0; blk < BLOCKS; ++blk) {
        acc[blk] = acc_t{};
#pragma unroll
        for (int ks = 0; ks < K_STEPS; ++ks) {
            mma(acc[blk], lds_frag(sA, frag_offset(lane, blk * MATRIX_M, ks, STRIDE)), b.at(ks, lane));
            lds_read_fence(acc[blk]);
        }
    }
}

// acc[b] += A_b C for the BLOCKS MATRIX_M-row blocks of A = tile[row][k] in LDS (a transposed tile)
// and C an accumulator set whose rows are the k positions (acc_as_b), rounded to 16 bits.
template <int BLOCKS, int K_STEPS, int STRIDE, int C_BLOCKS>
__device__ __forceinline__ void tile_times_acc(acc_t (&acc)[BLOCKS], const u16* sA,
                                               const acc_t (&c)[C_BLOCKS], int lane) {
    static_assert(K_STEPS * MATRIX_K == C_BLOCKS * MATRIX_M, "C holds MATRIX_M k positions per block");
#pragma unroll
    for (int ks = 0; ks < K_STEPS; ++ks) {
        const frag_t b = acc_as_b(c[acc_as_b_block(ks)], ks, lane);
#pragma unroll
        for (int blk = 0; blk < BLOCKS; ++blk) {
            mma(acc[blk], lds_frag(sA, frag_offset(lane, blk * MATRIX_M, ks, STRIDE)), b);
            lds_read_fence(acc[blk]);
        }
    }
}

// Store factor * acc, an accumulator set whose column (this lane's) is the output row at `row`
// and whose rows are its head dims, as 16-bit elements: 8-byte stores of runs of 4 consecutive
// dims where the layout has them (ACC_RUN % 4 == 0), else element by element.
template <int BLOCKS>
__device__ __forceinline__ void store_acc_row(u16* row, const acc_t (&acc)[BLOCKS], float factor,
                                              int head_dim, int lane) {
    constexpr int RUN = ACC_RUN % 4 == 0 ? 4 : 1;
#pragma unroll
    for (int blk = 0; blk < BLOCKS; ++blk)
#pragma unroll
        for (int j = 0; j < ACC_ELEMS; j += RUN) {
            const int col = acc_row(lane, blk, j);
            if (RUN == 1) {
                if (col < head_dim) row[col] = from_float(acc[blk][j] * factor);
                continue;
            }
#if VEC_LOADS  // head_dim % 8 == 0, so a run of 4 is entirely inside or entirely outside
            if (col < head_dim)
                *(uint2*)(row + col) = make_uint2(pack2(acc[blk][j] * factor, acc[blk][j + 1] * factor),
                                                  pack2(acc[blk][j + 2] * factor, acc[blk][j + 3] * factor));
#else
#pragma unroll
            for (int i = 0; i < 4; ++i)
                if (col + i < head_dim) row[col + i] = from_float(acc[blk][j + i] * factor);
#endif
        }
}

// The same accumulator set, factor * acc, into row `row` of an LDS tile [row][dim] (16-bit), on its
// way out through store_tile: 8-byte LDS stores of runs of 4 dims (STRIDE is a multiple of 4)
// where the layout has them, else element by element.
template <int BLOCKS, int STRIDE>
__device__ __forceinline__ void acc_to_lds(u16* smem, int row, const acc_t (&acc)[BLOCKS], float factor,
                                           int lane) {
    constexpr int RUN = ACC_RUN % 4 == 0 ? 4 : 1;
#pragma unroll
    for (int blk = 0; blk < BLOCKS; ++blk)
#pragma unroll
        for (int j = 0; j < ACC_ELEMS; j += RUN)
            if (RUN == 1)
                smem[row * STRIDE + acc_row(lane, blk, j)] = from_float(acc[blk][j] * factor);
            else
                *(uint2*)(smem + row * STRIDE + acc_row(lane, blk, j)) =
                make_uint2(pack2(acc[blk][j] * factor, acc[blk][j + 1] * factor),
                           pack2(acc[blk][j + 2] * factor, acc[blk][j + 3] * factor));
}

// Copy rows [0, valid_rows) x columns [0, min(head_dim, COLS)) of an LDS tile [row][dim] (COLS
// wide, of HEAD_DIM by default) to global memory, consecutive threads on consecutive columns
// (coalesced). The kernels with many accumulators store this way: storing element by element from
// the accumulators, masked per lane, costs a saved exec mask per store, and those run the dK/dV
// kernel out of scalar registers.
template <int ROWS, int STRIDE, int COLS = HEAD_DIM>
__device__ __forceinline__ void store_tile(u16* gmem, i64 row_stride, const u16* smem, int valid_rows,
                                           int head_dim, int tid) {
#if VEC_LOADS
    constexpr int CHUNKS = ROWS * COLS / CHUNK;
    for (int c = tid; c < CHUNKS; c += NUM_THREADS) {
        const int row = c / (COLS / CHUNK), col = (c % (COLS / CHUNK)) * CHUNK;
        if (row < valid_rows && col < head_dim) {
            const uint2 lo = *(const uint2*)(smem + row * STRIDE + col);
            const uint2 hi = *(const uint2*)(smem + row * STRIDE + col + 4);
            *(uint4*)(gmem + row * row_stride + col) = make_uint4(lo.x, lo.y, hi.x, hi.y);
        }
    }
#else
#pragma unroll 1
    for (int e = tid; e < ROWS * COLS; e += NUM_THREADS) {
        const int row = e / COLS, col = e % COLS;
        if (row < valid_rows && col < head_dim) gmem[row * row_stride + col] = smem[row * STRIDE + col];
    }
#endif
}
