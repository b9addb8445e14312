// Tile movement and fragment helpers shared by the tensor-core kernels (forward and backward).
// Tiles of HEAD_DIM 16-bit elements per row live in shared memory with rows padded by 16 bytes;
// global rows are head_dim <= HEAD_DIM elements, row_stride elements apart.
// The including kernel defines NUM_THREADS, HEAD_DIM and VEC_LOADS (see flash_fwd.cu).
#pragma once

#include "platform.h"

#define CHUNK 8  // elements per 16-byte copy
#define CHUNKS_PER_ROW (HEAD_DIM / CHUNK)
// Rows padded by 16 bytes: the 8 rows one ldmatrix reads then start in 8 different 16-byte bank
// groups for every HEAD_DIM that is a multiple of 32, so ldmatrix is free of bank conflicts.
#define SMEM_STRIDE (HEAD_DIM + CHUNK)
// Byte offset of element (row, col) in a padded tile.
#define TILE_OFFSET(row, col) (((row) * SMEM_STRIDE + (col)) * 2)

// How NUM_THREADS threads share the copy of a ROWS x HEAD_DIM tile (load_tile, load_paged_tile).
// A copy moves COPY_ELEMS elements: 16 bytes with VEC_LOADS, else one element. Thread tid always
// copies the same columns, of rows tid / THREADS_PER_ROW + i * ROWS_PER_PASS, i < PASSES.
template <int ROWS>
struct TileCopy {
    static constexpr int COPY_ELEMS = VEC_LOADS ? CHUNK : 1;
    static constexpr int COPIES_PER_ROW = HEAD_DIM / COPY_ELEMS;
    static constexpr int THREADS_PER_ROW = COPIES_PER_ROW < NUM_THREADS ? COPIES_PER_ROW : NUM_THREADS;
    static constexpr int COPIES_PER_THREAD = (COPIES_PER_ROW + THREADS_PER_ROW - 1) / THREADS_PER_ROW;
    static constexpr int ROWS_PER_PASS = NUM_THREADS / THREADS_PER_ROW;
    static constexpr int PASSES = (ROWS + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
};

// Without VEC_LOADS: a thread's columns of one row, element by element (zeros where the row or
// the column is past the data).
template <int ROWS>
__device__ __forceinline__ void copy_row(u16* dst, const u16* src, bool row_valid, int col, int head_dim) {
    using G = TileCopy<ROWS>;
#pragma unroll
    for (int j = 0; j < G::COPIES_PER_THREAD; ++j) {
        const int c = col + j * G::THREADS_PER_ROW;
        if (G::COPIES_PER_ROW % G::THREADS_PER_ROW != 0 && c >= HEAD_DIM) break;
        dst[j * G::THREADS_PER_ROW] = row_valid && c < head_dim ? src[j * G::THREADS_PER_ROW] : (u16)0;
    }
}

// Copy a ROWS x HEAD_DIM tile from global memory (rows row_stride elements apart) into shared
// memory, writing zeros for rows >= valid_rows and columns >= head_dim. Zeros, not garbage: padded
// head-dim columns must add nothing to Q.K, and V rows past the last key meet P = 0, which would
// still turn a NaN bit pattern into NaN.
template <int ROWS>
__device__ __forceinline__ void load_tile(u16* smem, const u16* gmem, i64 row_stride,
                                          int valid_rows, int head_dim, int tid) {
    // Each thread walks one pointer down its rows (TileCopy): a single 64-bit address stays live
    // instead of one per row, which the register budget of the main loop cannot spare.
    using G = TileCopy<ROWS>;
    // Head dims like 96 leave a few threads idle (only when NUM_THREADS % G::THREADS_PER_ROW != 0).
    if (NUM_THREADS % G::THREADS_PER_ROW != 0 && tid >= G::ROWS_PER_PASS * G::THREADS_PER_ROW) return;
    const int row = tid / G::THREADS_PER_ROW, col = (tid % G::THREADS_PER_ROW) * G::COPY_ELEMS;
    const u16* src = gmem + row * row_stride + col;
#if VEC_LOADS
    static_assert(G::COPIES_PER_THREAD == 1, "16-byte copies: one column chunk per thread");
    const bool col_valid = col < head_dim;
    const u32 dst = smem_addr(smem + row * SMEM_STRIDE + col);
#pragma unroll
    for (int i = 0; i < G::PASSES; ++i) {
        if (ROWS % G::ROWS_PER_PASS != 0 && row + i * G::ROWS_PER_PASS >= ROWS) break;
        bool valid = col_valid && row + i * G::ROWS_PER_PASS < valid_rows;
        cp_async_16_zfill(dst + TILE_OFFSET(i * G::ROWS_PER_PASS, 0), src, valid);
        src += G::ROWS_PER_PASS * row_stride;
    }
#else
    u16* dst = smem + row * SMEM_STRIDE + col;
    for (int i = 0; i < G::PASSES; ++i) {
        if (ROWS % G::ROWS_PER_PASS != 0 && row + i * G::ROWS_PER_PASS >= ROWS) break;
        const bool row_valid = row + i * G::ROWS_PER_PASS < valid_rows;
        copy_row<ROWS>(dst + i * G::ROWS_PER_PASS * SMEM_STRIDE, src, row_valid, col, head_dim);
        src += G::ROWS_PER_PASS * row_stride;
    }
#endif
}

// load_tile for key/value rows found through a sequence's pages (attention_common.h:
// kv_row_offset). Pages hold a multiple of 16 rows and tiles start at a multiple of 16, so each
// aligned group of 16 rows of a tile lies in one page: a thread looks up a page only on the passes
// that start a group (known at compile time for each unrolled pass where a pass covers a divisor
// of 16 rows) and walks its pointer down the rows in between, as load_tile does. A row at or past
// valid_rows is zero-filled without a read, and no group that starts there is looked up (its
// table entry may lie past the sequence's row of the block table).
template <int ROWS>
__device__ __forceinline__ void load_paged_tile(u16* smem, const u16* base, const AttnParams& p,
                                                int batch, int first_row, i64 page_stride,
                                                i64 row_stride, int valid_rows, int head_dim,
                                                int tid) {
    using G = TileCopy<ROWS>;
    constexpr int PAGE_ROWS = 16;  // every page size is a multiple of this
    // A thread's rows of one group are consecutive passes; otherwise every pass looks its row up.
    constexpr bool GROUPED = G::ROWS_PER_PASS <= PAGE_ROWS && PAGE_ROWS % G::ROWS_PER_PASS == 0;
    if (NUM_THREADS % G::THREADS_PER_ROW != 0 && tid >= G::ROWS_PER_PASS * G::THREADS_PER_ROW) return;
    const int row = tid / G::THREADS_PER_ROW, col = (tid % G::THREADS_PER_ROW) * G::COPY_ELEMS;
    const u16* src = base + col;
#if VEC_LOADS
    static_assert(G::COPIES_PER_THREAD == 1, "16-byte copies: one column chunk per thread");
    const bool col_valid = col < head_dim;
    const u32 dst = smem_addr(smem + row * SMEM_STRIDE + col);
#pragma unroll
#else
    u16* dst = smem + row * SMEM_STRIDE + col;
#endif
    for (int i = 0; i < G::PASSES; ++i) {
        const int r = row + i * G::ROWS_PER_PASS;
        if (ROWS % G::ROWS_PER_PASS != 0 && r >= ROWS) break;
        const bool row_valid = r < valid_rows;
        if (!GROUPED || i * G::ROWS_PER_PASS % PAGE_ROWS == 0)
            src = base + (row_valid ? kv_row_offset(p, batch, first_row + r, page_stride, row_stride) : 0) + col;
        else
            src += G::ROWS_PER_PASS * row_stride;
#if VEC_LOADS
        cp_async_16_zfill(dst + TILE_OFFSET(i * G::ROWS_PER_PASS, 0), src, col_valid && row_valid);
#else
        copy_row<ROWS>(dst + i * G::ROWS_PER_PASS * SMEM_STRIDE, src, row_valid, col, head_dim);
#endif
    }
}

// A warp copies ROWS rows of a padded shared-memory tile out to global memory (rows < valid_rows,
// columns < head_dim), 16 bytes at a time where rows are aligned.
template <int ROWS>
__device__ __forceinline__ void store_rows(u16* gmem, i64 row_stride, const u16* smem,
                                           int valid_rows, int head_dim, int lane) {
#if VEC_LOADS
#pragma unroll
    for (int c = lane; c < ROWS * CHUNKS_PER_ROW; c += WARP_SIZE) {
        int row = c / CHUNKS_PER_ROW, col = (c % CHUNKS_PER_ROW) * CHUNK;
        if (row < valid_rows && col < head_dim)
            *(uint4*)(gmem + row * row_stride + col) = *(const uint4*)(smem + row * SMEM_STRIDE + col);
    }
#else
    for (int e = lane; e < ROWS * HEAD_DIM; e += WARP_SIZE) {
        int row = e / HEAD_DIM, col = e % HEAD_DIM;
        if (row < valid_rows && col < head_dim) gmem[row * row_stride + col] = smem[row * SMEM_STRIDE + col];
    }
#endif
}

// The accumulators of two adjacent n8 tiles (c_lo: columns 0-7, c_hi: columns 8-15 of a k16 step)
// hold, per thread, exactly the elements of the A operand of one m16n8k16 step: converting to
// 16 bits and packing in pairs turns an mma result into the next mma's input without any data
// leaving registers (P in P V, dS in dS Q, ...).
__device__ __forceinline__ void pack_a_fragment(u32 (&a)[4], const float (&c_lo)[4], const float (&c_hi)[4]) {
    a[0] = pack_float2(c_lo[0], c_lo[1]);
    a[1] = pack_float2(c_lo[2], c_lo[3]);
    a[2] = pack_float2(c_hi[0], c_hi[1]);
    a[3] = pack_float2(c_hi[2], c_hi[3]);
}

// ---- warp-level matrix products on m16n8k16 ------------------------------------------------------
// Operands in shared memory are row-major tiles of 16-bit elements, rows STRIDE elements apart.
// Each lane passes the address of its ldmatrix row for the first fragment; every other fragment
// is a compile-time offset from it. Two lane patterns cover every operand:
//   LANE_ROWS_X: row lane % 16, column (lane / 16) * 8 -- A from row-major A;
//                B from row-major B (k x n) with .trans
//   LANE_ROWS_Y: row lane % 8 + (lane / 16) * 8, column (lane / 8 % 2) * 8 -- B from the rows of
//                B^T (n x k); A from the rows of A^T (k x m) with .trans

template <int STRIDE>
__device__ __forceinline__ u32 tile_offset(int row, int col) { return (u32)((row * STRIDE + col) * 2); }

template <int STRIDE>
__device__ __forceinline__ u32 lane_address_x(u32 tile, int row0, int col0, int lane) {
    return tile + tile_offset<STRIDE>(row0 + lane % 16, col0 + (lane / 16) * 8);
}

template <int STRIDE>
__device__ __forceinline__ u32 lane_address_y(u32 tile, int row0, int col0, int lane) {
    return tile + tile_offset<STRIDE>(row0 + lane % 8 + (lane / 16) * 8, col0 + (lane / 8 % 2) * 8);
}

// A B operand's fragment addresses: at(row, col) is the lane's ldmatrix address in the fragment
// that starts `row` rows and `col` elements into the tile. Padded<STRIDE>: a tile of rows STRIDE
// elements apart, a compile-time offset from the lane's first address. flash_decode.cu's
// swizzled ring tiles bring their own.
template <int STRIDE>
struct Padded {
    u32 lane;
    __device__ __forceinline__ u32 operator()(int row, int col) const { return lane + tile_offset<STRIDE>(row, col); }
};

// C += A B^T, A (MT*16 x K_STEPS*16) and B^T (NT*8 x K_STEPS*16) both row-major in shared memory.
// a_lane: LANE_ROWS_X address of A; bt_at: LANE_ROWS_Y addresses of B^T.
template <int MT, int NT, int K_STEPS, int A_STRIDE, class BAt>
__device__ __forceinline__ void mma_a_bt_at(float (&c)[MT][NT][4], u32 a_lane, const BAt& bt_at) {
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], a_lane + tile_offset<A_STRIDE>(mt * 16, kk * 16));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            u32 b[4];  // matrices: n 0-7 k 0-7 | n 0-7 k 8-15 | n 8-15 k 0-7 | n 8-15 k 8-15
            ldmatrix_x4(b, bt_at(np * 16, kk * 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(c[mt][2 * np], a[mt], b[0], b[1]);
                mma_16816(c[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// The same with B^T a padded tile: bt_lane, its LANE_ROWS_Y address.
template <int MT, int NT, int K_STEPS, int A_STRIDE, int B_STRIDE>
__device__ __forceinline__ void mma_a_bt(float (&c)[MT][NT][4], u32 a_lane, u32 bt_lane) {
    mma_a_bt_at<MT, NT, K_STEPS, A_STRIDE>(c, a_lane, Padded<B_STRIDE>{bt_lane});
}

// C += A B, A in registers as K_STEPS k16 fragments per m16 tile, B (K_STEPS*16 x NT*8)
// row-major in shared memory; b_at: LANE_ROWS_X addresses of B.
template <int MT, int NT, int K_STEPS, class BAt>
__device__ __forceinline__ void mma_areg_b_at(float (&c)[MT][NT][4], const u32 (&a)[MT][K_STEPS][4], const BAt& b_at) {
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk)
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            u32 b[4];  // transposed matrices: k 0-7 n 0-7 | k 8-15 n 0-7 | k 0-7 n 8-15 | k 8-15 n 8-15
            ldmatrix_x4_trans(b, b_at(kk * 16, np * 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(c[mt][2 * np], a[mt][kk], b[0], b[1]);
                mma_16816(c[mt][2 * np + 1], a[mt][kk], b[2], b[3]);
            }
        }
}

// The same with B a padded tile: b_lane, its LANE_ROWS_X address.
template <int MT, int NT, int K_STEPS, int B_STRIDE>
__device__ __forceinline__ void mma_areg_b(float (&c)[MT][NT][4], const u32 (&a)[MT][K_STEPS][4], u32 b_lane) {
    mma_areg_b_at<MT, NT, K_STEPS>(c, a, Padded<B_STRIDE>{b_lane});
}

// C += A B, A given by the rows of A^T (K_STEPS*16 x MT*16) and B (K_STEPS*16 x NT*8), both
// row-major in shared memory; at_lane: LANE_ROWS_Y address of A^T, b_lane: LANE_ROWS_X of B.
template <int MT, int NT, int K_STEPS, int A_STRIDE, int B_STRIDE>
__device__ __forceinline__ void mma_at_b(float (&c)[MT][NT][4], u32 at_lane, u32 b_lane) {
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) {
        u32 a[MT][4];  // transposed matrices: m 0-7 k 0-7 | m 8-15 k 0-7 | m 0-7 k 8-15 | m 8-15 k 8-15
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4_trans(a[mt], at_lane + tile_offset<A_STRIDE>(kk * 16, mt * 16));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            u32 b[4];
            ldmatrix_x4_trans(b, b_lane + tile_offset<B_STRIDE>(kk * 16, np * 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(c[mt][2 * np], a[mt], b[0], b[1]);
                mma_16816(c[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// C += A B, A (MT*16 x K_STEPS*16) and B (K_STEPS*16 x NT*8) both row-major in shared memory;
// a_lane: LANE_ROWS_X address of A, b_lane: LANE_ROWS_X address of B.
template <int MT, int NT, int K_STEPS, int A_STRIDE, int B_STRIDE>
__device__ __forceinline__ void mma_a_b(float (&c)[MT][NT][4], u32 a_lane, u32 b_lane) {
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], a_lane + tile_offset<A_STRIDE>(mt * 16, kk * 16));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            u32 b[4];
            ldmatrix_x4_trans(b, b_lane + tile_offset<B_STRIDE>(kk * 16, np * 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(c[mt][2 * np], a[mt], b[0], b[1]);
                mma_16816(c[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// Write a warp's m16 x n8 accumulator tile, scaled, as 16-bit values into a tile with rows STRIDE
// elements apart, at (row0, col0): c[0], c[1] go to row g, columns 2t, 2t+1; c[2], c[3] to row g+8.
template <int STRIDE>
__device__ __forceinline__ void store_c_fragment(u16* smem, int row0, int col0, const float (&c)[4],
                                                 float scale, int lane) {
    u16* p = smem + (row0 + lane / 4) * STRIDE + col0 + (lane % 4) * 2;
    *(u32*)p = pack_float2(c[0] * scale, c[1] * scale);
    *(u32*)(p + 8 * STRIDE) = pack_float2(c[2] * scale, c[3] * scale);
}

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&c)[MT][NT][4]) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) c[i][j][e] = 0.f;
}
