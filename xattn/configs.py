"""The one flat table that drives kernel specialization.

Each row picks the tile configuration of one kernel for one GPU family and one padded head dim.
A head dim that has no row of its own runs on the row with the next larger head dim: the kernel
loads and stores only the real columns and fills the padding with zeros in shared memory, so the
caller's arrays are never copied or padded.

Columns:
  kernel      the entry point in kernels_cuda/; xattn/kernels.py describes it (source, the -D
              defines a row and a call's variant give, shared memory, threads, grid)
  arch        smallest compute capability (major * 10 + minor) the row applies to; a device
              uses the rows of the largest arch <= its own. sm_86/sm_89 have 99 KB of shared
              memory per block against 163 KB on sm_80 and 227 KB on sm_90.
  head_dim    padded head dim the variant is compiled for
  causal      the row serves only causal (True) or only non-causal (False) calls; None: both.
              The causal mask costs registers, so a row's tile may not fit with it.
  block_m     query rows per thread block
  block_n     keys per tile
  warps       warps per thread block (tensor-core kernel: block_m / warps rows per warp, a
              multiple of 16; float32 kernel: block_m / warps rows per warp)
  min_blocks  thread blocks per SM the register allocation must leave room for
"""

from __future__ import annotations

import functools
from typing import NamedTuple


class TileConfig(NamedTuple):
    kernel: str
    arch: int
    head_dim: int
    causal: bool | None
    block_m: int
    block_n: int
    warps: int
    min_blocks: int
    stages: int = 1  # cp.async pipeline depth; only flash_decode rows set it (see below)
    fp8_stages: int = 0  # the same for FP8 caches (flash_decode rows; 0: stages)
    frags_in_lds: bool = False  # HIP WMMA rows: fixed operands read from LDS (FRAGS_IN_LDS, below)
    dim_split: int = 1  # HIP WMMA dK/dV rows: blocks per key block, each a slice of D (DIM_SPLIT)


_ROWS = [
    # kernel          arch  head_dim causal  block_m  block_n  warps  min_blocks
    ("flash_fwd",      80,   32,      None,   128,     128,     4,     1),
    ("flash_fwd",      80,   64,      None,   128,     128,     4,     1),
    ("flash_fwd",      80,   96,      None,   128,     64,      4,     1),
    ("flash_fwd",      80,   128,     None,   128,     64,      4,     1),
    ("flash_fwd",      80,   160,     None,   64,      64,      4,     1),
    ("flash_fwd",      80,   192,     None,   64,      64,      4,     1),
    ("flash_fwd",      80,   256,     None,   64,      64,      4,     1),
    ("flash_fwd",      86,   32,      None,   128,     128,     4,     1),
    ("flash_fwd",      86,   64,      None,   128,     128,     4,     1),
    ("flash_fwd",      86,   96,      None,   128,     64,      4,     1),
    ("flash_fwd",      86,   128,     None,   128,     32,      4,     1),
    ("flash_fwd",      86,   160,     None,   64,      64,      4,     1),
    ("flash_fwd",      86,   192,     None,   64,      64,      4,     1),
    ("flash_fwd",      86,   256,     None,   64,      32,      4,     1),
    ("flash_fwd",      90,   32,      None,   128,     128,     4,     1),
    ("flash_fwd",      90,   64,      None,   128,     128,     4,     1),
    ("flash_fwd",      90,   96,      None,   128,     64,      4,     1),
    ("flash_fwd",      90,   128,     None,   128,     64,      4,     1),
    ("flash_fwd",      90,   160,     None,   64,      64,      4,     1),
    ("flash_fwd",      90,   192,     None,   64,      64,      4,     1),
    ("flash_fwd",      90,   256,     None,   64,      64,      4,     1),
    # backward, key-block parallel: block_n keys per block (split over the warps, 16 or 32
    # each), block_m query rows per step; dQ by atomics unless deterministic. Past head dim 128 a
    # key group of kernels.dkdv_warps_d(head_dim) warps splits dK/dV's head dim (16 keys per
    # group, block_m a multiple of 16 per warp of the group), and P^T, dS^T go through shared
    # memory.
    ("flash_bwd_dkdv", 80,   32,      None,   128,     128,     8,     1),
    ("flash_bwd_dkdv", 80,   64,      False,  128,     128,     8,     1),
    # sm_80 causal D64: 128-row steps spill 8 bytes (255 registers) in the deterministic variant
    ("flash_bwd_dkdv", 80,   64,      True,   64,      128,     8,     1),
    ("flash_bwd_dkdv", 80,   96,      None,   64,      128,     8,     1),
    ("flash_bwd_dkdv", 80,   128,     None,   64,      128,     8,     1),
    ("flash_bwd_dkdv", 80,   160,     None,   64,      64,      8,     1),
    ("flash_bwd_dkdv", 80,   192,     None,   32,      64,      8,     1),
    ("flash_bwd_dkdv", 80,   256,     None,   32,      64,      8,     1),
    ("flash_bwd_dkdv", 86,   32,      None,   64,      128,     8,     1),
    ("flash_bwd_dkdv", 86,   64,      None,   64,      128,     8,     1),
    ("flash_bwd_dkdv", 86,   96,      None,   32,      64,      4,     1),
    ("flash_bwd_dkdv", 86,   128,     None,   32,      64,      4,     1),
    # sm_86 D256: 99 KB leaves room for one key group (16 keys, 2 warps) beside 32-query double
    # buffers (32 x 32 with 4 warps needs 104.5 KB)
    ("flash_bwd_dkdv", 86,   160,     None,   32,      32,      4,     1),
    ("flash_bwd_dkdv", 86,   192,     None,   32,      32,      4,     1),
    ("flash_bwd_dkdv", 86,   256,     None,   32,      16,      2,     1),
    ("flash_bwd_dkdv", 90,   32,      None,   128,     128,     8,     1),
    ("flash_bwd_dkdv", 90,   64,      None,   128,     128,     8,     1),
    ("flash_bwd_dkdv", 90,   96,      None,   64,      128,     8,     1),
    ("flash_bwd_dkdv", 90,   128,     None,   64,      128,     8,     1),
    ("flash_bwd_dkdv", 90,   160,     None,   64,      64,      8,     1),
    ("flash_bwd_dkdv", 90,   192,     None,   64,      64,      8,     1),
    ("flash_bwd_dkdv", 90,   256,     None,   64,      64,      8,     1),
    # backward, dQ alone (deterministic=True), query-block parallel like the forward
    ("flash_bwd_dq",   80,   32,      None,   64,      64,      4,     1),
    ("flash_bwd_dq",   80,   64,      None,   64,      64,      4,     1),
    ("flash_bwd_dq",   80,   96,      None,   64,      64,      4,     1),
    ("flash_bwd_dq",   80,   128,     None,   64,      64,      4,     1),
    ("flash_bwd_dq",   80,   160,     None,   64,      32,      4,     1),
    ("flash_bwd_dq",   80,   192,     None,   64,      32,      4,     1),
    ("flash_bwd_dq",   80,   256,     None,   64,      32,      4,     1),
    ("flash_bwd_dq",   86,   32,      None,   64,      64,      4,     1),
    ("flash_bwd_dq",   86,   64,      None,   64,      64,      4,     1),
    ("flash_bwd_dq",   86,   96,      None,   64,      32,      4,     1),
    ("flash_bwd_dq",   86,   128,     None,   64,      32,      4,     1),
    ("flash_bwd_dq",   86,   160,     None,   64,      32,      4,     1),
    ("flash_bwd_dq",   86,   192,     None,   64,      16,      4,     1),
    ("flash_bwd_dq",   86,   256,     None,   64,      16,      4,     1),
    ("flash_bwd_dq",   90,   32,      None,   64,      64,      4,     1),
    ("flash_bwd_dq",   90,   64,      None,   64,      64,      4,     1),
    ("flash_bwd_dq",   90,   96,      None,   64,      64,      4,     1),
    ("flash_bwd_dq",   90,   128,     None,   64,      64,      4,     1),
    ("flash_bwd_dq",   90,   160,     None,   64,      32,      4,     1),
    ("flash_bwd_dq",   90,   192,     None,   64,      32,      4,     1),
    ("flash_bwd_dq",   90,   256,     None,   64,      32,      4,     1),
    # float32: exact CUDA-core arithmetic (kernels_common/flash_fwd_simt.h); block_n is the warp
    # size: one row group, whose rescale factors stay in registers
    ("flash_fwd_f32",  80,   32,      None,   32,      32,      4,     1),
    ("flash_fwd_f32",  80,   64,      None,   32,      32,      4,     1),
    ("flash_fwd_f32",  80,   128,     None,   32,      32,      4,     1),
    ("flash_fwd_f32",  80,   256,     None,   16,      32,      4,     1),
    # backward on CUDA cores in float32, any element type: float32 at every head dim, fp16/bf16
    # past the tensor-core rows. _dq: block_m query rows per block, 32-key tiles (lane = key).
    # _dkdv: block_n keys per block, 32-query tiles (lane = query). Rows per warp: block / warps.
    # Every row fits sm_86's 99 KB; D256 _dkdv takes 12 keys, as 16 would need 100.25 KB.
    ("flash_bwd_simt_dq",   80, 32,   None,   32,      32,      4,     1),
    ("flash_bwd_simt_dq",   80, 64,   None,   32,      32,      4,     1),
    ("flash_bwd_simt_dq",   80, 128,  None,   32,      32,      4,     1),
    ("flash_bwd_simt_dq",   80, 256,  None,   16,      32,      4,     1),
    ("flash_bwd_simt_dkdv", 80, 32,   None,   32,      32,      4,     1),
    ("flash_bwd_simt_dkdv", 80, 64,   None,   32,      32,      4,     1),
    ("flash_bwd_simt_dkdv", 80, 128,  None,   32,      32,      4,     1),
    ("flash_bwd_simt_dkdv", 80, 256,  None,   32,      12,      4,     1),
    # KV-cache decoding (flash_decode.cu): block_m = most query rows (GQA group x tokens) per tile,
    # block_n = keys per pipeline step of the block (warps x keys per warp; float32: 32 per warp),
    # stages = each warp's cp.async ring depth. Sized so that min_blocks blocks fit one SM's
    # shared memory (228 KB sm_90, 164 KB sm_80, 100 KB sm_86) with 2-3 steps in flight per warp.
    # fp8_stages: the ring depth for FP8 caches, whose steps are half the bytes: about twice
    # stages, as far as the same shared memory allows (sm_90 D128: 5, not 6).
    # kernel          arch  head_dim causal  block_m  block_n  warps  min_blocks stages fp8_stages
    ("flash_decode",   80,   32,      None,   64,      64,      4,     2,         4,          8),
    ("flash_decode",   80,   64,      None,   64,      64,      4,     2,         3,          6),
    ("flash_decode",   80,   128,     None,   32,      64,      4,     2,         2,          4),
    ("flash_decode",   80,   256,     None,   16,      64,      4,     1,         2,          4),
    ("flash_decode",   86,   32,      None,   64,      64,      4,     1,         4,          8),
    ("flash_decode",   86,   64,      None,   64,      64,      4,     1,         3,          6),
    ("flash_decode",   86,   128,     None,   32,      64,      4,     1,         2,          4),
    ("flash_decode",   86,   256,     None,   16,      32,      2,     1,         2,          4),
    ("flash_decode",   90,   32,      None,   64,      64,      4,     2,         6,         12),
    ("flash_decode",   90,   64,      None,   64,      64,      4,     2,         5,         10),
    ("flash_decode",   90,   128,     None,   32,      64,      4,     2,         3,          5),
    ("flash_decode",   90,   256,     None,   16,      64,      4,     1,         3,          6),
    ("flash_decode_f32", 80, 32,      None,   16,      128,     4,     1,         4),
    ("flash_decode_f32", 80, 64,      None,   16,      128,     4,     1,         2),
    ("flash_decode_f32", 80, 128,     None,   8,       64,      2,     1,         2),
    ("flash_decode_f32", 80, 256,     None,   8,       32,      1,     1,         2),
    ("flash_decode_f32", 86, 32,      None,   16,      128,     4,     1,         2),
    ("flash_decode_f32", 86, 64,      None,   16,      64,      2,     1,         2),
    ("flash_decode_f32", 86, 128,     None,   8,       32,      1,     1,         2),
    ("flash_decode_f32", 86, 256,     None,   8,       32,      1,     1,         1),
    ("flash_decode_f32", 90, 32,      None,   16,      128,     4,     1,         4),
    ("flash_decode_f32", 90, 64,      None,   16,      128,     4,     1,         3),
    ("flash_decode_f32", 90, 128,     None,   8,       64,      2,     1,         3),
    ("flash_decode_f32", 90, 256,     None,   8,       32,      1,     1,         3),
]

TABLE = [TileConfig(*row) for row in _ROWS]

# Which forward kernel serves which dtype.
KERNEL_FOR_DTYPE = {"float16": "flash_fwd", "bfloat16": "flash_fwd", "float32": "flash_fwd_f32"}

# Paged keys and values (attention_varlen's block_table, IS_PAGED) in flash_fwd: each 16-row group
# of a K/V tile is looked up in the block table, which costs registers that the 4-warp, 128-row
# tiles (32 query rows a warp, 254-255 registers) do not have: ptxas spilled 8-264 bytes there
# (2026-11-30, ci/compile_kernels.py). With 16 query rows a warp the same tiles take 146-210
# registers and spill nothing, so a paged call runs its row with that many warps.
PAGED_WARP_ROWS = 16


def paged_forward_row(cfg: TileConfig) -> TileConfig:
    """The row a paged call runs: flash_fwd's row with at most PAGED_WARP_ROWS query rows a
    warp (more warps, the same tile and shared memory); other kernels' rows as they are."""
    if cfg.kernel != "flash_fwd" or cfg.block_m // cfg.warps <= PAGED_WARP_ROWS:
        return cfg
    return cfg._replace(warps=cfg.block_m // PAGED_WARP_ROWS)


# Kernels on tensor cores, fed by 16-bit tiles (mma_tile.h).
TENSOR_CORE_KERNELS = ("flash_fwd", "flash_bwd_dkdv", "flash_bwd_dq")

MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)  # on every call's path; the table is fixed at import
def select(kernel: str, arch: int, head_dim: int, causal: bool) -> TileConfig:
    """The row for `kernel` on a device of compute capability `arch` at this head dim."""
    family = max((r.arch for r in TABLE if r.kernel == kernel and r.arch <= arch), default=None)
    if family is None:
        raise ValueError(f"{kernel} needs compute capability 8.0 or newer, got {arch / 10:.1f}")
    rows = [r for r in TABLE if r.kernel == kernel and r.arch == family and r.head_dim >= head_dim
            and r.causal in (None, causal)]
    if not rows:
        raise ValueError(f"q: expected head dim D in 1..{MAX_HEAD_DIM}, got {head_dim}")
    return min(rows, key=lambda r: r.head_dim)


# ---- KV-cache decoding (flash_decode.cu, flash_decode_f32.cu, flash_decode_merge.cu; launched by
# xattn/kvcache.py). The table rows are above (kernel "flash_decode" / "flash_decode_f32").
DECODE_KERNELS = ("flash_decode", "flash_decode_f32")
DECODE_KERNEL_FOR_DTYPE = {"float16": "flash_decode", "bfloat16": "flash_decode",
                           "float32": "flash_decode_f32"}
# Page sizes of paged caches: any multiple of 16 rows (a compile-time constant of the kernels).
DECODE_PAGE_MULTIPLE = 16
# FP8 caches: the KV_FP8 value of each torch float8 dtype (kernels_common/fp8.h). The FP8 variants
# use their row's tiles and stages unchanged: the ring then holds half the bytes (still several
# times what keeps HBM busy), and the conversion tiles fit beside it in every row's shared memory
# (tests/test_kvcache.py, test_decode_rows_fit_shared_memory).
DECODE_FP8_FORMATS = {"float8_e4m3fn": 1, "float8_e5m2": 2}


# ---- HIP (AMD) ----------------------------------------------------------------------------------
# The HIP kernels' rows, in their own small flat table: AMD targets are named by gfx strings, not
# compute capabilities. `select` above is for CUDA only; `select_hip` and `select_hip_backward`
# read this table.
#
# Columns as above, except:
#   kernel  entry point in kernels_hip/ (its description, source included: xattn/kernels.py)
#   arch    a family of gfx targets (HIP_FAMILIES). A device uses, per kernel, the rows of the family
#           with the longest gfx prefix of its gcnArchName ("gfx90a:sramecc+:xnack-" -> "gfx90a");
#           so gfx90a takes "cdna" rows for MFMA and "gfx9" rows for the portable kernels.
#   warps   waves per block; the wave size comes from the family
# flash_fwd_mfma, flash_bwd_mfma_dq (and their _wmma forms): HEAD_DIM, block_n multiples of the
#   matrix block (32 for MFMA, 16 for WMMA), block_m = block * waves.
# flash_bwd_mfma_dkdv (and _wmma_dkdv): HEAD_DIM, block_m (queries per step) multiples of the
#   matrix block, block_n = block * waves.
# The _wmma kernels are the same sources as the _mfma ones, built on wmma.h instead of mfma.h
#   (MATRIX_WMMA=1; WMMA_GFX12 picks the RDNA4 layout): HIP_MATRIX_KERNELS below.
# flash_fwd_portable (kernels_common/flash_fwd_simt.h, the body of CUDA's flash_fwd_f32 too):
#   HEAD_DIM a multiple of the wave size, block_n dividing it, and (block_m / waves) a multiple of
#   (wave size / block_n). block_n below the wave size splits a wave into row groups, whose
#   rescale factors and 1 / l go through LDS; with block_n = wave size they stay in registers.
# flash_bwd_portable_dq (block_m owned queries, block_n keys per step) and _dkdv (block_n owned keys,
#   block_m queries per step): HEAD_DIM a multiple of the wave size, the step dividing the wave
#   size, (owned / waves) a multiple of (wave size / step).
# flash_bwd_preprocess: block_m rows per block; serves every head dim (its head_dim is the maximum).
# Every row fits 64 KB of LDS per block. MI200 and MI300 have 64 KB of LDS per CU, so rows above
# 32 KB run one block (4 waves) per CU. The MFMA rows keep the long-lived accumulators (dK and dV,
# or dQ) and the operands that stay in registers within gfx90a's 512 VGPRs+AGPRs per lane, and
# within gfx908's 256 + 256 (ci/hip_compile.py checks both: no scratch, no spills). The MFMA
# backward stops at head dim 128, as the CUDA tensor-core backward does: past it dK and dV (256
# fp32 registers at D=256) and the transposed tiles no longer fit; the portable kernels serve it.
#
# MI300 (gfx940-942, "cdna3" forward rows). Sources, and what was taken from each:
# - AMD Instinct MI300X data sheet and the "AMD CDNA 3 Architecture" white paper (published
#   figures): 304 CUs of 4 SIMDs, 64 KB LDS per CU, 512 VGPRs+AGPRs per lane, 1307 dense fp16/bf16
#   TFLOP/s at 2.1 GHz, i.e. 2048 flop per CU per clock; MI250X: 383 over 220 CUs at 1.7 GHz, 1024.
# - "AMD Instinct MI300 Instruction Set Architecture Reference Guide" (CDNA3 ISA), chapter "Matrix
#   Arithmetic Instructions" (the MFMA opcodes and their pass counts), as AMD's Matrix Instruction
#   Calculator encodes it (github.com/ROCm/amd_matrix_instruction_calculator, matrix_calculator.py,
#   commit 2ef9189, the 'cdna3' and 'cdna2' tables): v_mfma_f32_32x32x8_f16 and _bf16 take 32
#   cycles on CDNA3 where CDNA2's v_mfma_f32_32x32x8f16 and _bf16_1k take 64 -- the same product at
#   twice the rate, which is the 2048 vs 1024 above; CDNA3's dense 16-bit forms are 32x32x8 and
#   16x16x16 (and the older multi-block x4 ones), nothing wider in k.
# - LLVM's AMDGPU builtins (clang's BuiltinsAMDGPU.def as clang-19 implements it), checked by compile
#   probes here (2026-11-30, measured: what clang-19 accepts and emits, nothing run): on gfx942
#   __builtin_amdgcn_mfma_f32_32x32x8f16 and ..._32x32x8bf16_1k emit v_mfma_f32_32x32x8_f16 and
#   v_mfma_f32_32x32x8_bf16, the CDNA3 names of the same operations; the gfx942-only builtins are
#   xf32 (..._32x32x4_xf32), fp8/bf8 (..._32x32x16_fp8_fp8, target feature fp8-insts) and the
#   structured-sparse smfmac ones, none of them a dense 16-bit product. So mfma.h deliberately uses
#   gfx90a's instructions on MI300 too; the 32x32x16 f16/bf16 forms are gfx950's, and clang-19 has no
#   builtin for them.
# Derived from those figures, not measured: with the matrix work twice as fast, the softmax, exp2
# and LDS traffic of one wave must hide behind another wave's MFMAs, so the rows aim at more waves
# per CU than gfx90a's: block_n 32 at D=128 (smaller K/V^T tiles), and two-wave blocks of 64
# queries at D=160/192 (two blocks per CU, and twice as many blocks for 304 CUs at short
# sequences). Measured by compiling only (clang-19, ci/results/hip_compile_clang19.log): at D=128
# the Q staging tile (33 KB) still sets the LDS; the rows take 176 (D=32) to 308 (D=192)
# VGPRs+AGPRs per lane and 414 at D=256, two waves per SIMD up to D=128. Nothing has run on an
# MI300. The backward keeps the "cdna" rows: dK/dV holds 232-344 registers per lane there.
#
# RDNA3 (gfx11) and RDNA4 (gfx12): WMMA (wave32, 16x16x16) for float16/bfloat16 forward and
# backward at every head dim to 256; the portable FMA kernels for float32, and on RDNA2 (gfx10,
# "rdna" rows). Register arithmetic, per lane, of 256 VGPRs in wave32: an operand fragment of one
# 16-wide k step is 8 VGPRs on gfx11 (16 values, the wave's halves repeating each other) and 4 on
# gfx12; an accumulator block (16x16 fp32) is 8 on both. So the operands a kernel keeps for its
# whole loop take, at head dim D: forward Q D/2 (gfx11) or D/4 (gfx12) plus O D/2; dQ Q and dO D
# or D/2 plus dQ D/2; dK/dV K and V D or D/2 plus dK and dV D. On top come S (and dP), the
# fragments clang-19 reads ahead of the WMMAs, addresses and the softmax: about 110 VGPRs in the
# register-held rows that compiled (gfx11 forward D=128: 128 held, 238 in all). Past that, a row
# keeps its fixed operands in LDS (options _LDS: FRAGS_IN_LDS, matrix_tile.h's FixedFrags) and
# reads a fragment at each use, which leaves the accumulators: D/2 in the forward and dQ, D in dK/dV.
# dK and dV alone are 256 VGPRs at D=256, the whole register file, so the dK/dV rows past D=128
# (gfx11; D=160 held 248-256 with the variant flags, no margin) or D=160 (gfx12) also split D
# (_LDS_SPLIT2: DIM_SPLIT=2, two blocks per key block, each summing half of dK and dV and
# recomputing S and dP for it: 6 instead of 4 products' work in that kernel). LDS bounds the
# rest: the Q tile stays beside K and V^T (forward D=256: 33.8 + 8.4 + 12.3 KB with four waves);
# dQ at D=192/256 takes two waves, dK/dV at D=256 one (62.9 and 58.5 KB of 64). Both forms are
# slower per product than registers (an LDS read per step, and the fence that keeps clang-19
# from issuing every read at once, matrix_tile.h); none of it is measured. The rows before them
# are the register-held ones that compiled: gfx11 forward to D=128 (block_n 16 there; 32
# spilled) and backward at D=32 (dK/dV at D=64 spilled with 16-query steps and with 2 waves);
# gfx12 forward to D=192 and backward to D=96. ci/hip_compile.py (scratch and spills fail it)
# decides every row, with every variant flag at D=128 and at D=256; the register counts are in
# ci/results/hip_compile_clang19.log. The first clang-19 gate (2026-11-30) linked no device
# library, so every threadIdx, barrier and math call stayed a function call whose calling
# convention took registers: it reported spills in rows that fit (the MI300 D=256 forward,
# MI300's dK/dV), and the table had dropped those rows; ci/hip_compile.py now links the libraries
# as hiprtc does. Not tuned on hardware: no AMD GPU has run these (README, AMD status).

HIP_FAMILIES = {  # family: (gfx prefixes, wave size); the longest matching prefix wins
    "cdna": (("gfx908", "gfx90a", "gfx94", "gfx95"), 64),  # MFMA: MI100, MI200, MI300, MI350
    "cdna3": (("gfx940", "gfx941", "gfx942"), 64),         # MI300: its own forward rows
    "gfx9": (("gfx9",), 64),                                # every gfx9 (GCN, CDNA), no MFMA used
    "rdna": (("gfx10", "gfx11", "gfx12"), 32),              # hiprtc compiles RDNA in wave32
    "rdna3": (("gfx11",), 32),                              # WMMA, gfx11 layout
    "rdna4": (("gfx12",), 32),                              # WMMA, gfx12 layout
}

# The options column of a row (TileConfig's frags_in_lds and dim_split; see the RDNA paragraph above).
_LDS = {"frags_in_lds": True}
_LDS_SPLIT2 = {"frags_in_lds": True, "dim_split": 2}

_HIP_ROWS = [
    # kernel                    arch    head_dim causal  block_m  block_n  waves  min_blocks options
    ("flash_fwd_mfma",          "cdna",  32,     None,   128,     64,      4,     1),
    ("flash_fwd_mfma",          "cdna",  64,     None,   128,     64,      4,     1),
    ("flash_fwd_mfma",          "cdna",  96,     None,   128,     64,      4,     1),
    ("flash_fwd_mfma",          "cdna",  128,    None,   128,     64,      4,     1),
    ("flash_fwd_mfma",          "cdna",  160,    None,   128,     32,      4,     1),
    ("flash_fwd_mfma",          "cdna",  192,    None,   128,     32,      4,     1),
    ("flash_fwd_mfma",          "cdna",  256,    None,   64,      32,      2,     1),
    ("flash_fwd_mfma",          "cdna3", 32,     None,   128,     64,      4,     1),
    ("flash_fwd_mfma",          "cdna3", 64,     None,   128,     64,      4,     1),
    ("flash_fwd_mfma",          "cdna3", 96,     None,   128,     64,      4,     1),
    ("flash_fwd_mfma",          "cdna3", 128,    None,   128,     32,      4,     1),
    ("flash_fwd_mfma",          "cdna3", 160,    None,   64,      32,      2,     1),
    ("flash_fwd_mfma",          "cdna3", 192,    None,   64,      32,      2,     1),
    ("flash_fwd_mfma",          "cdna3", 256,    None,   64,      32,      2,     1),
    ("flash_fwd_wmma",          "rdna3", 32,     None,   64,      32,      4,     1),
    ("flash_fwd_wmma",          "rdna3", 64,     None,   64,      32,      4,     1),
    ("flash_fwd_wmma",          "rdna3", 96,     None,   64,      32,      4,     1),
    ("flash_fwd_wmma",          "rdna3", 128,    None,   64,      16,      4,     1),
    ("flash_fwd_wmma",          "rdna3", 160,    None,   64,      16,      4,     1,     _LDS),
    ("flash_fwd_wmma",          "rdna3", 192,    None,   64,      16,      4,     1,     _LDS),
    ("flash_fwd_wmma",          "rdna3", 256,    None,   64,      16,      4,     1,     _LDS),
    ("flash_fwd_wmma",          "rdna4", 32,     None,   64,      64,      4,     1),
    ("flash_fwd_wmma",          "rdna4", 64,     None,   64,      64,      4,     1),
    ("flash_fwd_wmma",          "rdna4", 96,     None,   64,      32,      4,     1),
    ("flash_fwd_wmma",          "rdna4", 128,    None,   64,      32,      4,     1),
    ("flash_fwd_wmma",          "rdna4", 160,    None,   64,      16,      4,     1),
    ("flash_fwd_wmma",          "rdna4", 192,    None,   64,      16,      4,     1),
    ("flash_fwd_wmma",          "rdna4", 256,    None,   64,      16,      4,     1,     _LDS),
    ("flash_fwd_portable",      "gfx9",  64,     None,   64,      32,      4,     1),
    ("flash_fwd_portable",      "gfx9",  128,    None,   32,      32,      4,     1),
    ("flash_fwd_portable",      "gfx9",  256,    None,   16,      16,      4,     1),
    ("flash_fwd_portable",      "rdna",  32,     None,   32,      32,      4,     1),
    ("flash_fwd_portable",      "rdna",  64,     None,   32,      32,      4,     1),
    ("flash_fwd_portable",      "rdna",  128,    None,   32,      16,      4,     1),
    ("flash_fwd_portable",      "rdna",  256,    None,   16,      8,       4,     1),
    # backward: delta = rowsum(dO * O) first, then dK/dV (key blocks) and dQ (query blocks), two
    # kernels with no atomics: deterministic whatever `deterministic` says.
    ("flash_bwd_preprocess",    "gfx9",  256,    None,   32,      0,       4,     1),
    ("flash_bwd_preprocess",    "rdna",  256,    None,   32,      0,       8,     1),
    ("flash_bwd_mfma_dkdv",     "cdna",  32,     None,   64,      128,     4,     1),
    ("flash_bwd_mfma_dkdv",     "cdna",  64,     None,   32,      128,     4,     1),
    ("flash_bwd_mfma_dkdv",     "cdna",  96,     None,   32,      128,     4,     1),
    ("flash_bwd_mfma_dkdv",     "cdna",  128,    None,   32,      128,     4,     1),
    ("flash_bwd_mfma_dq",       "cdna",  32,     None,   128,     64,      4,     1),
    ("flash_bwd_mfma_dq",       "cdna",  64,     None,   128,     64,      4,     1),
    ("flash_bwd_mfma_dq",       "cdna",  96,     None,   128,     32,      4,     1),
    ("flash_bwd_mfma_dq",       "cdna",  128,    None,   128,     32,      4,     1),
    ("flash_bwd_wmma_dkdv",     "rdna3", 32,     None,   32,      64,      4,     1),
    ("flash_bwd_wmma_dq",       "rdna3", 32,     None,   64,      32,      4,     1),
    ("flash_bwd_wmma_dkdv",     "rdna3", 64,     None,   16,      64,      4,     1,     _LDS),
    ("flash_bwd_wmma_dq",       "rdna3", 64,     None,   64,      16,      4,     1,     _LDS),
    ("flash_bwd_wmma_dkdv",     "rdna3", 96,     None,   16,      64,      4,     1,     _LDS),
    ("flash_bwd_wmma_dq",       "rdna3", 96,     None,   64,      16,      4,     1,     _LDS),
    ("flash_bwd_wmma_dkdv",     "rdna3", 128,    None,   16,      64,      4,     1,     _LDS),
    ("flash_bwd_wmma_dq",       "rdna3", 128,    None,   64,      16,      4,     1,     _LDS),
    ("flash_bwd_wmma_dkdv",     "rdna3", 160,    None,   16,      32,      2,     1,     _LDS_SPLIT2),
    ("flash_bwd_wmma_dq",       "rdna3", 160,    None,   64,      16,      4,     1,     _LDS),
    ("flash_bwd_wmma_dkdv",     "rdna3", 192,    None,   16,      32,      2,     1,     _LDS_SPLIT2),
    ("flash_bwd_wmma_dq",       "rdna3", 192,    None,   32,      16,      2,     1,     _LDS),
    ("flash_bwd_wmma_dkdv",     "rdna3", 256,    None,   16,      16,      1,     1,     _LDS_SPLIT2),
    ("flash_bwd_wmma_dq",       "rdna3", 256,    None,   32,      16,      2,     1,     _LDS),
    ("flash_bwd_wmma_dkdv",     "rdna4", 32,     None,   32,      64,      4,     1),
    ("flash_bwd_wmma_dq",       "rdna4", 32,     None,   64,      32,      4,     1),
    ("flash_bwd_wmma_dkdv",     "rdna4", 64,     None,   16,      64,      4,     1),
    ("flash_bwd_wmma_dq",       "rdna4", 64,     None,   64,      32,      4,     1),
    ("flash_bwd_wmma_dkdv",     "rdna4", 96,     None,   16,      64,      4,     1),
    ("flash_bwd_wmma_dq",       "rdna4", 96,     None,   64,      32,      4,     1),
    ("flash_bwd_wmma_dkdv",     "rdna4", 128,    None,   16,      64,      4,     1,     _LDS),
    ("flash_bwd_wmma_dq",       "rdna4", 128,    None,   64,      16,      4,     1,     _LDS),
    ("flash_bwd_wmma_dkdv",     "rdna4", 160,    None,   16,      32,      2,     1,     _LDS),
    ("flash_bwd_wmma_dq",       "rdna4", 160,    None,   64,      16,      4,     1,     _LDS),
    ("flash_bwd_wmma_dkdv",     "rdna4", 192,    None,   16,      32,      2,     1,     _LDS_SPLIT2),
    ("flash_bwd_wmma_dq",       "rdna4", 192,    None,   32,      16,      2,     1,     _LDS),
    ("flash_bwd_wmma_dkdv",     "rdna4", 256,    None,   16,      16,      1,     1,     _LDS_SPLIT2),
    ("flash_bwd_wmma_dq",       "rdna4", 256,    None,   32,      16,      2,     1,     _LDS),
    ("flash_bwd_portable_dq",   "gfx9",  64,     None,   32,      16,      4,     1),
    ("flash_bwd_portable_dq",   "gfx9",  128,    None,   16,      16,      4,     1),
    ("flash_bwd_portable_dq",   "gfx9",  256,    None,   16,      8,       2,     1),
    ("flash_bwd_portable_dkdv", "gfx9",  64,     None,   16,      32,      4,     1),
    ("flash_bwd_portable_dkdv", "gfx9",  128,    None,   16,      16,      4,     1),
    ("flash_bwd_portable_dkdv", "gfx9",  256,    None,   8,       16,      2,     1),
    ("flash_bwd_portable_dq",   "rdna",  32,     None,   32,      32,      4,     1),
    ("flash_bwd_portable_dq",   "rdna",  64,     None,   32,      16,      4,     1),
    ("flash_bwd_portable_dq",   "rdna",  128,    None,   16,      16,      4,     1),
    ("flash_bwd_portable_dq",   "rdna",  256,    None,   16,      8,       2,     1),
    ("flash_bwd_portable_dkdv", "rdna",  32,     None,   32,      32,      4,     1),
    ("flash_bwd_portable_dkdv", "rdna",  64,     None,   16,      32,      4,     1),
    ("flash_bwd_portable_dkdv", "rdna",  128,    None,   16,      16,      4,     1),
    ("flash_bwd_portable_dkdv", "rdna",  256,    None,   8,       16,      4,     1),
    # KV-cache decode (xattn.hip.decode): split-KV, GQA group x tokens as the rows of a tile; the
    # merge and the append are entry points of the same source and take the same defines. The body
    # is the CUDA float32 decode's (kernels_common/flash_decode_simt.h): block_n keys per step,
    # block_n / warps of them per wave in the wave's own float32 ring of K and V, which with 16 keys
    # a wave keeps the block in 64 KB of LDS up to D256 (wave64: four row groups of 16 lanes).
    ("flash_decode_portable",   "gfx9",  64,     None,   16,      64,      4,     1),
    ("flash_decode_portable",   "gfx9",  128,    None,   16,      32,      2,     1),
    ("flash_decode_portable",   "gfx9",  256,    None,   16,      16,      1,     1),
    ("flash_decode_portable",   "rdna",  32,     None,   16,      128,     4,     1),
    ("flash_decode_portable",   "rdna",  64,     None,   16,      64,      4,     1),
    ("flash_decode_portable",   "rdna",  128,    None,   16,      32,      2,     1),
    ("flash_decode_portable",   "rdna",  256,    None,   16,      16,      1,     1),
    # The decode on the matrix cores (16-bit only): flash_decode_mfma.hip, one wave per block, whose
    # MATRIX_N columns (32 on MFMA, 16 on WMMA) hold the GQA group x tokens, padded (block_m); the
    # merge and the append are the portable row's of the same head dim (hip_decode_aux_row), so the
    # head dims are the portable rows' (the partials' row length is the merge's HEAD_DIM too).
    # Chosen from LDS and register arithmetic, not measured: a decode step is bound by reading
    # K and V once per group, so one wave per block (no idle waves when the group has <= 32 rows)
    # and small key tiles (17.7 KB of LDS at D=128, 35 KB at D=256) leave room for several blocks
    # per CU, whose loads overlap each other's MFMAs; split-KV (kvcache.num_splits) fills the GPU.
    # What the compilers made of them (ci/hip_compile.py, every dtype, causal, vec, and the band
    # and softcap flags at D=128; no scratch, no spills), the most per lane at D=64/128/256:
    # gfx908 109/144/240 VGPRs + 32/65/129 AGPRs (hiprtc); gfx90a 152/220/368 VGPRs+AGPRs in
    # its one file (hiprtc); gfx942 200/232/389 (clang-19); WMMA at D=32/64/128 gfx1100
    # 133/192/239, gfx1201 134/181/186 (of 256). The WMMA rows stop at D=128: the FMA decode
    # above serves D=256 on RDNA.
    ("flash_decode_mfma",       "cdna",  64,     None,   32,      64,      1,     1),
    ("flash_decode_mfma",       "cdna",  128,    None,   32,      32,      1,     1),
    ("flash_decode_mfma",       "cdna",  256,    None,   32,      32,      1,     1),
    ("flash_decode_wmma",       "rdna3", 32,     None,   16,      32,      1,     1),
    ("flash_decode_wmma",       "rdna3", 64,     None,   16,      32,      1,     1),
    ("flash_decode_wmma",       "rdna3", 128,    None,   16,      16,      1,     1),
    ("flash_decode_wmma",       "rdna4", 32,     None,   16,      64,      1,     1),
    ("flash_decode_wmma",       "rdna4", 64,     None,   16,      64,      1,     1),
    ("flash_decode_wmma",       "rdna4", 128,    None,   16,      32,      1,     1),
]

HIP_TABLE = [TileConfig(*row[:8], **(row[8] if len(row) > 8 else {})) for row in _HIP_ROWS]

# Kernels built on WMMA: the matrix-core sources with wmma.h (MATRIX_WMMA=1).
HIP_WMMA_KERNELS = ("flash_fwd_wmma", "flash_bwd_wmma_dkdv", "flash_bwd_wmma_dq", "flash_decode_wmma")
# Kernels built on matrix instructions (16-bit tiles, matrix_tile.h; VEC_LOADS variants).
HIP_MFMA_KERNELS = ("flash_fwd_mfma", "flash_bwd_mfma_dkdv", "flash_bwd_mfma_dq", "flash_decode_mfma",
                    *HIP_WMMA_KERNELS)

# Kernels that can serve each dtype, in order of preference (MFMA where the device has it).
HIP_KERNELS_FOR_DTYPE = {
    "float16": ("flash_fwd_mfma", "flash_fwd_wmma", "flash_fwd_portable"),
    "bfloat16": ("flash_fwd_mfma", "flash_fwd_wmma", "flash_fwd_portable"),
    "float32": ("flash_fwd_portable",),
}
# The backward's (dK/dV, dQ) kernel pairs for each dtype, in order of preference. A pair without a
# row for the head dim gives way to the next (the MFMA pair stops at 128).
_MFMA_BWD = ("flash_bwd_mfma_dkdv", "flash_bwd_mfma_dq")
_WMMA_BWD = ("flash_bwd_wmma_dkdv", "flash_bwd_wmma_dq")
_PORTABLE_BWD = ("flash_bwd_portable_dkdv", "flash_bwd_portable_dq")
HIP_BACKWARD_KERNELS_FOR_DTYPE = {
    "float16": (_MFMA_BWD, _WMMA_BWD, _PORTABLE_BWD),
    "bfloat16": (_MFMA_BWD, _WMMA_BWD, _PORTABLE_BWD),
    "float32": (_PORTABLE_BWD,),
}

HIP_LDS_BYTES = 64 * 1024  # LDS one block may use on every family above


HIP_DECODE_KERNEL = "flash_decode_portable"  # its source holds the merge and the append too
# The decode kernels that can serve each dtype, in order of preference (as HIP_KERNELS_FOR_DTYPE).
HIP_DECODE_KERNELS_FOR_DTYPE = {
    "float16": ("flash_decode_mfma", "flash_decode_wmma", HIP_DECODE_KERNEL),
    "bfloat16": ("flash_decode_mfma", "flash_decode_wmma", HIP_DECODE_KERNEL),
    "float32": (HIP_DECODE_KERNEL,),
}
HIP_DECODE_KERNELS = HIP_DECODE_KERNELS_FOR_DTYPE["float16"]


@functools.lru_cache(maxsize=None)
def select_hip_decode(dtype: str, gcn_arch: str, head_dim: int, paged: bool = False,
                      fp8: bool = False) -> TileConfig:
    """The HIP decode row (xattn.hip.decode) for a device of this gcnArchName and head dim: the
    matrix-core decode where the device's family has a row that large, else the portable one.
    paged: caches in pages (block_table); fp8: float8 caches (KV_FP8): the portable decode, the
    only HIP decode with paged loads (IS_PAGED) and FP8 codes, as select_hip does for the
    forward's pages."""
    kernels = (HIP_DECODE_KERNEL,) if paged or fp8 else HIP_DECODE_KERNELS_FOR_DTYPE[dtype]
    return _first_row(kernels, gcn_arch, head_dim, False)


@functools.lru_cache(maxsize=None)
def hip_decode_aux_row(gcn_arch: str, head_dim: int) -> TileConfig:
    """The portable decode row whose source's merge and append entry points (xattn/kernels.py) serve a
    decode row of padded head dim `head_dim` on this device: the partials it merges are rows of
    HEAD_DIM floats, so its head dim is the decode row's, exactly."""
    row = _hip_row(HIP_DECODE_KERNEL, gcn_arch, head_dim, False)
    if row is None or row.head_dim != head_dim:
        raise ValueError(f"q: no portable decode row of head dim {head_dim} for {gcn_arch!r} "
                         f"(the matrix-core decode rows take the portable rows' head dims)")
    return row


def hip_family(kernel: str, gcn_arch: str) -> str | None:
    """The family whose rows of `kernel` a device of this gcnArchName uses, or None."""
    base = gcn_arch.split(":")[0]
    families = {r.arch for r in HIP_TABLE if r.kernel == kernel}
    matches = [(len(prefix), family) for family in families
               for prefix in HIP_FAMILIES[family][0] if base.startswith(prefix)]
    return max(matches)[1] if matches else None


def hip_wave_size(cfg: TileConfig) -> int:
    return HIP_FAMILIES[cfg.arch][1]


def _hip_row(kernel: str, gcn_arch: str, head_dim: int, causal: bool) -> TileConfig | None:
    """The row of `kernel` for this device and head dim; None where the device's family has none
    that is large enough. Raises ValueError when the device has no family for `kernel`."""
    family = hip_family(kernel, gcn_arch)
    if family is None:
        known = ", ".join(p for prefixes, _ in HIP_FAMILIES.values() for p in prefixes)
        raise ValueError(f"no HIP kernel for {gcn_arch!r}; the hip backend serves {known}")
    rows = [r for r in HIP_TABLE if r.kernel == kernel and r.arch == family
            and r.head_dim >= head_dim and r.causal in (None, causal)]
    return min(rows, key=lambda r: r.head_dim) if rows else None


def _hip_kernel_usable(kernel: str, gcn_arch: str) -> bool:
    return hip_family(kernel, gcn_arch) is not None


@functools.lru_cache(maxsize=None)
def select_hip(dtype: str, gcn_arch: str, head_dim: int, causal: bool,
               paged: bool = False) -> TileConfig:
    """The HIP forward row for a call in `dtype` on a device with this gcnArchName at this head dim.
    paged: keys and values in pages (attention_varlen's block_table): the portable kernel, the
    only HIP forward with paged loads (IS_PAGED)."""
    # A kernel without a row for the head dim would give way to the next; today the matrix-core
    # forward rows of every family reach 256.
    kernels = HIP_KERNELS_FOR_DTYPE[dtype][-1:] if paged else HIP_KERNELS_FOR_DTYPE[dtype]
    return _first_row(kernels, gcn_arch, head_dim, causal)


def _first_row(kernels, gcn_arch: str, head_dim: int, causal: bool) -> TileConfig:
    """The row of the first of `kernels` (in preference order, the last one the portable kernel
    that every family has) that this device's family has at this head dim."""
    for kernel in kernels:
        if not _hip_kernel_usable(kernel, gcn_arch):
            continue
        row = _hip_row(kernel, gcn_arch, head_dim, causal)
        if row is not None:
            return row
    if _hip_row(kernels[-1], gcn_arch, head_dim, causal) is None:  # may raise (no family)
        raise ValueError(f"q: expected head dim D in 1..{MAX_HEAD_DIM}, got {head_dim}")
    raise AssertionError("unreachable: the portable kernel serves every head dim")


@functools.lru_cache(maxsize=None)
def select_hip_backward(dtype: str, gcn_arch: str, head_dim: int,
                        causal: bool) -> tuple[TileConfig, TileConfig, TileConfig]:
    """The HIP backward rows (preprocess, dK/dV, dQ) for a call in `dtype` on this device."""
    prep = _hip_row("flash_bwd_preprocess", gcn_arch, MAX_HEAD_DIM, causal)
    for pair in HIP_BACKWARD_KERNELS_FOR_DTYPE[dtype]:
        if not all(_hip_kernel_usable(kernel, gcn_arch) for kernel in pair):
            continue
        rows = tuple(_hip_row(kernel, gcn_arch, head_dim, causal) for kernel in pair)
        if None not in rows:
            return (prep, *rows)
    raise ValueError(f"q: expected head dim D in 1..{MAX_HEAD_DIM}, got {head_dim}")
