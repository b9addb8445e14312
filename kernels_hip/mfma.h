// CDNA matrix cores: the MFMA instruction the matrix-core kernels (flash_fwd_mfma.hip,
// flash_bwd_mfma_dkdv.hip, flash_bwd_mfma_dq.hip) are built on when MATRIX_WMMA is 0, and the index
// mapping of its operand and accumulator fragments. Generation-specific; included only through
// matrix_tile.h. wmma.h is the RDNA3/RDNA4 counterpart, with the same interface (the "matrix
// interface" block at the end of this file).
//
// The instruction is v_mfma_f32_32x32x8f16 (float16) or v_mfma_f32_32x32x8bf16_1k (bfloat16,
// gfx90a and newer): D (32x32, fp32) = A (32x8) * B (8x32) + C, one wave of 64 lanes. Register
// layouts (AMD CDNA2/CDNA3 ISA, matrix instruction layouts), lane l, element i = 0..3, j = 0..15:
//   A: lane l holds A[l % 32][4 * (l / 32) + i]          (4 consecutive k of one row)
//   B: lane l holds B[4 * (l / 32) + i][l % 32]          (4 consecutive k of one column)
//   C, D: lane l holds D[8 * (j / 4) + 4 * (l / 32) + j % 4][l % 32]
// gfx94x (MI300) runs the same two instructions at twice gfx90a's rate per CU (the instruction
// names are unchanged in the builtins); it has no faster 16-bit form with these operand shapes
// (the 32x32x16 f16/bf16 forms are gfx950's, a target clang-19 does not know).
// gfx908 has no bf16_1k: there a k8 step is two v_mfma_f32_32x32x4bf16 (A: lane l holds
// A[l % 32][2 * (l / 32) + i], i = 0..1), fed the low and the high halves of the same fragments.
// The first sums the k positions {0,1,4,5} of the k8 step, the second {2,3,6,7}: the same
// products in a different order, because A and B are split identically.
//
// tests/test_hip_mfma_layout.py reads the one-line index functions below from this file and
// checks them against a NumPy model of the instruction built from the layouts above.
#pragma once

typedef float floatx16 __attribute__((ext_vector_type(16)));
typedef u32 u32x2 __attribute__((ext_vector_type(2)));  // 4 16-bit values: one A or B fragment
typedef _Float16 halfx4 __attribute__((ext_vector_type(4)));
typedef short shortx4 __attribute__((ext_vector_type(4)));
typedef short shortx2 __attribute__((ext_vector_type(2)));

#define MFMA_M 32  // rows of A and D
#define MFMA_N 32  // columns of B and D
#define MFMA_K 8   // k per instruction (per pair of instructions on gfx908 bf16)

// D += A B for one 32x32x8 step.
__device__ __forceinline__ void mfma_32x32x8(floatx16& acc, u32x2 a, u32x2 b) {
#if !ELEM_BF16
    acc = __builtin_amdgcn_mfma_f32_32x32x8f16(__builtin_bit_cast(halfx4, a),
                                               __builtin_bit_cast(halfx4, b), acc, 0, 0, 0);
#elif defined(__gfx908__)
    acc = __builtin_amdgcn_mfma_f32_32x32x4bf16(__builtin_bit_cast(shortx2, a.x),
                                                __builtin_bit_cast(shortx2, b.x), acc, 0, 0, 0);
    acc = __builtin_amdgcn_mfma_f32_32x32x4bf16(__builtin_bit_cast(shortx2, a.y),
                                                __builtin_bit_cast(shortx2, b.y), acc, 0, 0, 0);
#else
    acc = __builtin_amdgcn_mfma_f32_32x32x8bf16_1k(__builtin_bit_cast(shortx4, a),
                                                   __builtin_bit_cast(shortx4, b), acc, 0, 0, 0);
#endif
}

// ---- fragment index mapping ---------------------------------------------------------------------
// Shared by flash_fwd_mfma.hip and flash_bwd_mfma.hip. A and B fragments have the same layout (a
// B fragment of columns c is an A fragment of rows c of B^T), so one function reads either from an
// LDS tile stored [row][k] (B: [column][k]). Offsets are in 16-bit elements within a padded LDS tile
// of `stride` elements per row.
//
// Every product in the kernels is arranged so that the accumulator column -- the lane -- is the
// row the kernel owns (a query in the forward and dQ, a key in dK/dV), and the accumulator's 16
// rows per 32-block run along the dimension that is summed next: then an accumulator is, element
// for element, the B operand of the next product (acc_as_b_*), and never goes through LDS.

// Fragment for k step k_step of rows (A) or columns (B) [row0, row0 + 32), from tile[row][k].
__device__ __forceinline__ int frag_offset(int lane, int row0, int k_step, int stride) { return (row0 + lane % 32) * stride + k_step * 8 + (lane / 32) * 4; }
// Accumulator element j of 32-row block `block` lies in this row ...
__device__ __forceinline__ int acc_row(int lane, int block, int j) { return block * 32 + (j / 4) * 8 + (lane / 32) * 4 + j % 4; }
// ... and this column (the same for every j).
__device__ __forceinline__ int acc_col(int lane) { return lane % 32; }
// An accumulator C (rows: the k of the next product) as the B operand of k step k_step: element i
// is element acc_as_b_reg of block acc_as_b_block -- the rows 8 (j / 4) + 4 (lane / 32) + 0..3 of a
// lane are exactly the k positions it holds in step j / 4.
__device__ __forceinline__ int acc_as_b_block(int k_step) { return k_step / 4; }
__device__ __forceinline__ int acc_as_b_reg(int k_step, int i) { return (k_step % 4) * 4 + i; }

// ---- matrix interface (the same names in wmma.h) --------------------------------------------------
// The kernels see one 32x32 block per instruction group, ACC_ELEMS accumulator elements per lane,
// and lanes l and l ^ MATRIX_N holding the same accumulator column (two lane halves of a wave).
#define MATRIX_WAVE 64        // the wave size the instructions need
#define MATRIX_M MFMA_M
#define MATRIX_N MFMA_N
#define MATRIX_K MFMA_K
#define ACC_ELEMS 16          // accumulator elements per lane of one block
#define ACC_RUN 4             // elements j..j+3 (j % 4 == 0) lie in consecutive rows
#define LDS_PAD 4             // LDS row padding, in 16-bit elements (matrix_tile.h says why)
// Entry point names: MATRIX_KERNEL(flash_fwd, ) is flash_fwd_mfma, MATRIX_KERNEL(flash_bwd, _dq)
// flash_bwd_mfma_dq.
#define MATRIX_KERNEL(prefix, suffix) prefix##_mfma##suffix
typedef floatx16 acc_t;
typedef u32x2 frag_t;

__device__ __forceinline__ void mma(acc_t& acc, frag_t a, frag_t b) { mfma_32x32x8(acc, a, b); }

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)from_float(lo) | ((u32)from_float(hi) << 16);
}

// The B fragment of k step k_step (within its block) from accumulator block c, rounded to 16 bits:
// the lane's own elements (acc_as_b_reg), no exchange between lanes.
__device__ __forceinline__ frag_t acc_as_b(const acc_t& c, int k_step, int lane) {
    return frag_t{pack2(c[acc_as_b_reg(k_step, 0)], c[acc_as_b_reg(k_step, 1)]),
                  pack2(c[acc_as_b_reg(k_step, 2)], c[acc_as_b_reg(k_step, 3)])};
}
