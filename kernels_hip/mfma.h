// CDNA matrix cores: the MFMA instruction the MFMA kernels (flash_fwd_mfma.hip, flash_bwd_mfma.hip)
// are built on, and the index mapping of its operand and accumulator fragments. Vendor- and
// generation-specific; included only by the MFMA kernels (through mfma_tile.h).
//
// The instruction is v_mfma_f32_32x32x8f16 (float16) or v_mfma_f32_32x32x8bf16_1k (bfloat16,
// gfx90a and newer): D (32x32, fp32) = A (32x8) * B (8x32) + C, one wave of 64 lanes. Register
// layouts (AMD CDNA2/CDNA3 ISA, matrix instruction layouts), lane l, element i = 0..3, j = 0..15:
//   A: lane l holds A[l % 32][4 * (l / 32) + i]          (4 consecutive k of one row)
//   B: lane l holds B[4 * (l / 32) + i][l % 32]          (4 consecutive k of one column)
//   C, D: lane l holds D[8 * (j / 4) + 4 * (l / 32) + j % 4][l % 32]
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
