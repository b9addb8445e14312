// RDNA3 and RDNA4 matrix cores: the WMMA instruction the matrix-core kernels (flash_fwd_mfma.hip,
// flash_bwd_mfma_dkdv.hip, flash_bwd_mfma_dq.hip) are built on when MATRIX_WMMA is 1, and the
// index mapping of its operand and accumulator fragments; the interface of mfma.h, for wave32.
// Included only through matrix_tile.h.
//
// The instruction is v_wmma_f32_16x16x16_{f16,bf16}: D (16x16, fp32) = A (16x16) * B (16x16) + C,
// one wave of 32 lanes. The register layouts differ between the two generations (RDNA3 and RDNA4
// ISA guides, "Wave Matrix Multiply Accumulate"; AMD GPUOpen's WMMA articles), lane l, h = l / 16:
//   gfx11 (RDNA3), builtins ..._w32 with 16-element operands:
//     A: lane l holds A[l % 16][i], i = 0..15 (all of k; lanes 16..31 repeat lanes 0..15)
//     B: lane l holds B[i][l % 16], i = 0..15
//     C, D: lane l holds D[2 j + h][l % 16], j = 0..7 (the two lane halves take even / odd rows)
//   gfx12 (RDNA4), builtins ..._w32_gfx12 with 8-element operands:
//     A: lane l holds A[l % 16][8 h + i], i = 0..7 (each half of the wave holds half of k)
//     B: lane l holds B[8 h + i][l % 16]
//     C, D: lane l holds D[8 h + j][l % 16], j = 0..7
// Which k an operand element carries matters only in that A and B must agree, as they do in both
// (B is laid out as A transposed). The accumulator layout matters exactly: an accumulator turned
// into the B operand of the next product (acc_as_b) must put each row at the k that A's column
// of the same index meets. On gfx12 the accumulator of a lane is exactly its B fragment; on
// gfx11 a lane holds every other row and B needs all 16 of its column, so half of each fragment
// comes from the partner lane l ^ 16 (one cross-lane exchange per accumulator element).
//
// WMMA_GFX12 (set by xattn/kernels.py from the table's family) picks the layout; the compiler's
// own __GFX11__ / __GFX12__ must agree.
//
// tests/test_hip_wmma_layout.py reads the one-line index functions below from this file and
// checks them against a NumPy model of both layouts built from the tables above.
#pragma once

#if defined(__GFX12__)
static_assert(WMMA_GFX12 == 1, "gfx12 targets take the gfx12 WMMA layout (WMMA_GFX12=1)");
#elif defined(__GFX11__)
static_assert(WMMA_GFX12 == 0, "gfx11 targets take the gfx11 WMMA layout (WMMA_GFX12=0)");
#endif

#define WMMA_M 16  // rows of A and D
#define WMMA_N 16  // columns of B and D
#define WMMA_K 16  // k per instruction
#define FRAG_ELEMS (WMMA_GFX12 ? 8 : 16)  // 16-bit operand elements per lane

typedef float floatx8 __attribute__((ext_vector_type(8)));
typedef u32 u32x4 __attribute__((ext_vector_type(4)));
typedef u32 u32x8 __attribute__((ext_vector_type(8)));
#if WMMA_GFX12
typedef u32x4 wmma_frag_t;  // 8 16-bit values
typedef _Float16 halfx_t __attribute__((ext_vector_type(8)));
typedef short shortx_t __attribute__((ext_vector_type(8)));
#else
typedef u32x8 wmma_frag_t;  // 16 16-bit values
typedef _Float16 halfx_t __attribute__((ext_vector_type(16)));
typedef short shortx_t __attribute__((ext_vector_type(16)));
#endif

// D += A B for one 16x16x16 step.
__device__ __forceinline__ void wmma_16x16x16(floatx8& acc, wmma_frag_t a, wmma_frag_t b) {
#if WMMA_GFX12 && !ELEM_BF16
    acc = __builtin_amdgcn_wmma_f32_16x16x16_f16_w32_gfx12(__builtin_bit_cast(halfx_t, a),
                                                           __builtin_bit_cast(halfx_t, b), acc);
#elif WMMA_GFX12
    acc = __builtin_amdgcn_wmma_f32_16x16x16_bf16_w32_gfx12(__builtin_bit_cast(shortx_t, a),
                                                            __builtin_bit_cast(shortx_t, b), acc);
#elif !ELEM_BF16
    acc = __builtin_amdgcn_wmma_f32_16x16x16_f16_w32(__builtin_bit_cast(halfx_t, a),
                                                     __builtin_bit_cast(halfx_t, b), acc);
#else
    acc = __builtin_amdgcn_wmma_f32_16x16x16_bf16_w32(__builtin_bit_cast(shortx_t, a),
                                                      __builtin_bit_cast(shortx_t, b), acc);
#endif
}

// ---- fragment index mapping ---------------------------------------------------------------------
// As in mfma.h: one function reads an A or a B fragment from an LDS tile stored [row][k] (B:
// [column][k]); offsets in 16-bit elements within a padded tile of `stride` elements per row. The
// lane's accumulator column is the row the kernel owns; the accumulator's rows run along the
// dimension summed next.

// Fragment for k step k_step of rows (A) or columns (B) [row0, row0 + 16), from tile[row][k].
__device__ __forceinline__ int frag_offset(int lane, int row0, int k_step, int stride) { return (row0 + lane % 16) * stride + k_step * 16 + (WMMA_GFX12 ? (lane / 16) * 8 : 0); }
// Accumulator element j of 16-row block `block` lies in this row ...
__device__ __forceinline__ int acc_row(int lane, int block, int j) { return block * 16 + (WMMA_GFX12 ? (lane / 16) * 8 + j : 2 * j + lane / 16); }
// ... and this column (the same for every j).
__device__ __forceinline__ int acc_col(int lane) { return lane % 16; }
// An accumulator C (rows: the k of the next product) as the B operand of k step k_step: element i
// is element acc_as_b_reg of block acc_as_b_block, held by this lane or, where acc_as_b_partner
// is 1, by lane ^ 16 (gfx11: row i lies in lane half i % 2).
__device__ __forceinline__ int acc_as_b_block(int k_step) { return k_step; }
__device__ __forceinline__ int acc_as_b_reg(int k_step, int i) { return WMMA_GFX12 ? i : i / 2; }
__device__ __forceinline__ int acc_as_b_partner(int lane, int i) { return WMMA_GFX12 ? 0 : (i % 2 != lane / 16); }

// ---- matrix interface (the same names in mfma.h) -------------------------------------------------
#define MATRIX_WAVE 32        // WMMA here is the wave32 form
#define MATRIX_M WMMA_M
#define MATRIX_N WMMA_N
#define MATRIX_K WMMA_K
#define ACC_ELEMS 8           // accumulator elements per lane of one block
#define ACC_RUN (WMMA_GFX12 ? 8 : 1)  // elements j.. j + ACC_RUN - 1 lie in consecutive rows
// Fragment reads are 16 (gfx12) or 32 (gfx11) bytes per lane from one row: a 16-byte pad keeps
// every row 16-byte aligned for 128-bit LDS reads and starts consecutive rows 4 banks apart (row
// lengths are multiples of 32 elements). Chosen for alignment; bank conflicts not measured.
#define LDS_PAD 8
// Entry point names: MATRIX_KERNEL(flash_fwd, ) is flash_fwd_wmma, MATRIX_KERNEL(flash_bwd, _dq)
// flash_bwd_wmma_dq.
#define MATRIX_KERNEL(prefix, suffix) prefix##_wmma##suffix
typedef floatx8 acc_t;
typedef wmma_frag_t frag_t;

__device__ __forceinline__ void mma(acc_t& acc, frag_t a, frag_t b) { wmma_16x16x16(acc, a, b); }

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)from_float(lo) | ((u32)from_float(hi) << 16);
}

// The B fragment of k step k_step from accumulator block c, rounded to 16 bits. Every lane takes
// part in the exchange (shuffles are wave-wide), then keeps its own or its partner's element.
__device__ __forceinline__ frag_t acc_as_b(const acc_t& c, int k_step, int lane) {
    float partner[ACC_ELEMS];
#pragma unroll
    for (int j = 0; j < ACC_ELEMS; ++j) partner[j] = WMMA_GFX12 ? c[j] : shfl_xor(c[j], WMMA_N);
    frag_t b;
#pragma unroll
    for (int w = 0; w < FRAG_ELEMS / 2; ++w) {
        float e[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int i = 2 * w + h, reg = acc_as_b_reg(k_step, i);
            e[h] = acc_as_b_partner(lane, i) ? partner[reg] : c[reg];
        }
        b[w] = pack2(e[0], e[1]);
    }
    return b;
}
