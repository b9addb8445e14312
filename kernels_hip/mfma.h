// CDNA matrix cores: the MFMA instruction flash_fwd_mfma.hip is built on, and the index mapping
// of its operand and accumulator fragments. Vendor- and generation-specific; included only by
// the MFMA kernel.
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

// ---- fragment index mapping of flash_fwd_mfma.hip --------------------------------------------
// The kernel computes S^T = K Q^T and O^T = V^T P^T, so that a lane's accumulator column is one
// query: row max, row sum and the rescale of O stay inside a lane (plus lane l ^ 32).
// Element offsets are in 16-bit elements within a padded LDS tile of `stride` elements per row.

// A fragment of K (rows: keys, k: head dims), read from sK[key][dim]: 4 consecutive dims.
__device__ __forceinline__ int k_frag_offset(int lane, int key_block, int k_step, int stride) { return (key_block * 32 + lane % 32) * stride + k_step * 8 + (lane / 32) * 4; }
// B fragment of Q^T (k: head dims, columns: queries), read from sQ[query][dim].
__device__ __forceinline__ int q_frag_offset(int lane, int query0, int k_step, int stride) { return (query0 + lane % 32) * stride + k_step * 8 + (lane / 32) * 4; }
// A fragment of V^T (rows: head dims, k: keys), read from the transposed tile sVt[dim][key].
__device__ __forceinline__ int vt_frag_offset(int lane, int dim_block, int k_step, int stride) { return (dim_block * 32 + lane % 32) * stride + k_step * 8 + (lane / 32) * 4; }
// Accumulator element j of S^T block key_block holds the score of this key ...
__device__ __forceinline__ int score_key(int lane, int key_block, int j) { return key_block * 32 + (j / 4) * 8 + (lane / 32) * 4 + j % 4; }
// ... for this query (a column of S^T; the same for O^T).
__device__ __forceinline__ int acc_query(int lane) { return lane % 32; }
// Accumulator element j of O^T block dim_block holds this head dim of the lane's query.
__device__ __forceinline__ int out_dim(int lane, int dim_block, int j) { return dim_block * 32 + (j / 4) * 8 + (lane / 32) * 4 + j % 4; }
// P^T as the B operand of key step k_step: element i is accumulator element p_acc_reg of block
// p_acc_block -- the accumulator rows 4 (j / 4) .. +3 of a lane are the k positions of one step.
__device__ __forceinline__ int p_acc_block(int k_step) { return k_step / 4; }
__device__ __forceinline__ int p_acc_reg(int k_step, int i) { return (k_step % 4) * 4 + i; }
