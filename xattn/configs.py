"""The one flat table that drives kernel specialization.

Each row picks the tile configuration of one kernel for one GPU family and one padded head dim.
A head dim that has no row of its own runs on the row with the next larger head dim: the kernel
loads and stores only the real columns and fills the padding with zeros in shared memory, so the
caller's arrays are never copied or padded.

Columns:
  kernel      source file stem in kernels_cuda/ (its entry point has the same name)
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
import math
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
    # key group of dkdv_warps_d(head_dim) warps splits dK/dV's head dim (16 keys per group, block_m
    # a multiple of 16 per warp of the group), and P^T, dS^T go through shared memory.
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
    # float32: exact CUDA-core arithmetic, block_n is the warp size
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
# Kernels whose entry point lives in a source file of another name.
SOURCES = {"flash_bwd_simt_dq": "flash_bwd_simt.cu", "flash_bwd_simt_dkdv": "flash_bwd_simt.cu"}
# The two halves of the CUDA-core backward, and the size of the tile each streams (warp size).
SIMT_BACKWARD_KERNELS = ("flash_bwd_simt_dq", "flash_bwd_simt_dkdv")
SIMT_TILE = 32
# Kernels on tensor cores, fed by 16-bit tiles (mma_tile.h).
TENSOR_CORE_KERNELS = ("flash_fwd", "flash_bwd_dkdv", "flash_bwd_dq")

MAX_HEAD_DIM = 256
# The widest dK/dV slice one warp of flash_bwd_dkdv keeps in registers: 2 x 16 keys x 128 columns
# = 128 floats per thread. Past it the warps of a key group split the head dim.
DKDV_WARP_COLS = 128


def dkdv_warps_d(head_dim: int) -> int:
    """Warps that split the head dim of one key group's dK/dV in flash_bwd_dkdv (DKV_WARPS_D)."""
    return -(-head_dim // DKDV_WARP_COLS)


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


def shared_memory_bytes(cfg: TileConfig) -> int:
    """Dynamic shared memory of one thread block, from the layout in the kernel's header."""
    padded_row = cfg.head_dim + 8  # 16-bit elements, rows padded by 16 bytes (SMEM_STRIDE)
    if cfg.kernel == "flash_fwd":
        return (cfg.block_m + 2 * cfg.block_n) * padded_row * 2  # Q, K, V tiles
    if cfg.kernel == "flash_bwd_dkdv":
        tiles = (2 * cfg.block_n + 4 * cfg.block_m) * padded_row * 2  # K, V, Q x2, dO x2
        # dS^T (used when dQ is accumulated here), and P^T beside it when the head dim is split
        ds = cfg.block_n * (cfg.block_m + 8) * 2 * (2 if dkdv_warps_d(cfg.head_dim) > 1 else 1)
        return tiles + ds + 4 * cfg.block_m * 4  # LSE x2, delta x2
    if cfg.kernel == "flash_bwd_dq":
        return (2 * cfg.block_m + 4 * cfg.block_n) * padded_row * 2  # Q, dO, K x2, V x2
    if cfg.kernel == "flash_fwd_f32":
        q = cfg.block_m * cfg.head_dim
        k = cfg.block_n * (cfg.head_dim + 1)
        v = cfg.block_n * cfg.head_dim
        p = cfg.block_m * cfg.block_n
        return (q + k + v + p) * 4
    if cfg.kernel in SIMT_BACKWARD_KERNELS:  # float32; the owned rows and the streamed tile
        owned = cfg.block_m if cfg.kernel == "flash_bwd_simt_dq" else cfg.block_n
        rows = 2 * owned * cfg.head_dim  # Q, dO (_dq) or K, V (_dkdv), broadcast reads
        tiles = 2 * SIMT_TILE * (cfg.head_dim + 1)  # K, V (_dq) or Q, dO (_dkdv), odd stride
        slices = owned * SIMT_TILE * (1 if cfg.kernel == "flash_bwd_simt_dq" else 2)  # dS or (P, dS)
        return (rows + tiles + slices) * 4
    if cfg.kernel in DECODE_KERNELS:  # the variant with the most rows per tile
        return decode_shared_memory_bytes(cfg, cfg.block_m)
    raise KeyError(f"{cfg.kernel}: not a kernel of this table (no shared-memory layout known "
                   f"for it)")


def defines(cfg: TileConfig, dtype: str, causal: bool, vec_loads: bool) -> dict[str, int]:
    """The -D macros that specialize the kernel source for one variant."""
    common = {
        "HEAD_DIM": cfg.head_dim,
        "NUM_WARPS": cfg.warps,
        "IS_CAUSAL": int(causal),
        "MIN_BLOCKS": cfg.min_blocks,
    }
    if cfg.kernel in TENSOR_CORE_KERNELS:
        split = {"DKV_WARPS_D": dkdv_warps_d(cfg.head_dim)} if cfg.kernel == "flash_bwd_dkdv" else {}
        return common | split | {
            "ELEM_BF16": int(dtype == "bfloat16"),
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "VEC_LOADS": int(vec_loads),
        }
    if cfg.kernel in SIMT_BACKWARD_KERNELS:
        owned = cfg.block_m if cfg.kernel == "flash_bwd_simt_dq" else cfg.block_n
        return common | {
            "ELEM_F32": int(dtype == "float32"),
            "ELEM_BF16": int(dtype == "bfloat16"),
            "ROWS_PER_WARP": owned // cfg.warps,
        }
    if cfg.kernel in DECODE_KERNELS:  # BLOCK_M and SOFTCAP are the launch's (xattn/kvcache.py)
        return common | decode_defines(cfg, dtype, cfg.block_m, vec_loads, softcap=False)
    return common | {"ELEM_F32": 1, "ROWS_PER_WARP": cfg.block_m // cfg.warps}  # flash_fwd_f32


def grid(cfg: TileConfig, seqlen_q: int, heads: int, batch: int) -> tuple[int, int, int]:
    return (math.ceil(seqlen_q / cfg.block_m), heads, batch)


# ---- KV-cache decoding (flash_decode.cu, flash_decode_f32.cu, flash_decode_merge.cu; launched by
# xattn/kvcache.py). The table rows are above (kernel "flash_decode" / "flash_decode_f32").
DECODE_KERNELS = ("flash_decode", "flash_decode_f32")
DECODE_KERNEL_FOR_DTYPE = {"float16": "flash_decode", "bfloat16": "flash_decode",
                           "float32": "flash_decode_f32"}
DECODE_MERGE_KERNEL = "flash_decode_merge"
DECODE_MERGE_WARPS = 4  # query rows per merge block (one warp each)
# Page sizes of paged caches: any multiple of 16 rows (a compile-time constant of the kernels).
DECODE_PAGE_MULTIPLE = 16
# FP8 caches: the KV_FP8 value of each torch float8 dtype (kernels_common/fp8.h). The FP8 variants
# use their row's tiles and stages unchanged: the ring then holds half the bytes (still several
# times what keeps HBM busy), and the conversion tiles fit beside it in every row's shared memory
# (tests/test_kvcache.py, test_decode_rows_fit_shared_memory).
DECODE_FP8_FORMATS = {"float8_e4m3fn": 1, "float8_e5m2": 2}


def decode_stages(cfg: TileConfig, fp8: bool) -> int:
    """The cp.async ring depth of a decode variant: the row's stages, or for FP8 caches its
    fp8_stages where it has them (the tensor-core rows: a stage of codes is half the bytes, so
    about twice the stages keep as many bytes in flight in the same shared memory)."""
    return cfg.fp8_stages if fp8 and cfg.fp8_stages else cfg.stages


def decode_shared_memory_bytes(cfg: TileConfig, rows: int, fp8: bool = False) -> int:
    """Dynamic shared memory of a decode block with `rows` query rows per tile (the layout in
    decode_common.h): Q tile, row limits, then the warps' K/V rings (FP8 caches: rings of 1-byte
    codes, fp8_stages deep; the float32 kernel adds each warp's K and V conversion tiles) or,
    reusing them, the merge scratch."""
    size = 4 if cfg.kernel == "flash_decode_f32" else 2
    stride = cfg.head_dim + 16 // size  # rows padded by 16 bytes
    q, limits = rows * stride * size, 2 * rows * 4
    cache_size = 1 if fp8 else size
    stages = decode_stages(cfg, fp8)
    rings = stages * 2 * cfg.block_n * (cfg.head_dim + 16 // cache_size) * cache_size
    if fp8 and cfg.kernel == "flash_decode_f32":
        rings += 2 * cfg.block_n * stride * size  # K and V conversion tiles, every warp's
    merge = (rows * (cfg.head_dim + 4) + 2 * cfg.warps * rows) * 4
    return q + limits + max(rings, merge)


def decode_defines(cfg: TileConfig, dtype: str, rows: int, vec_loads: bool,
                   softcap: bool, page_size: int = 0, kv_fp8: int = 0,
                   l2_prefetch: int = 0) -> dict[str, int]:
    """The -D macros of one decode variant (the kernel's file sets ELEM_F32 itself); kv_fp8: 0, or
    the cache's DECODE_FP8_FORMATS value; l2_prefetch: the cache copies' L2 hint (0, 128, 256)."""
    defines = {
        "HEAD_DIM": cfg.head_dim, "NUM_WARPS": cfg.warps, "MIN_BLOCKS": cfg.min_blocks,
        "ELEM_BF16": int(dtype == "bfloat16"),
        "BLOCK_M": rows, "WARP_N": cfg.block_n // cfg.warps, "STAGES": decode_stages(cfg, bool(kv_fp8)),
        "VEC_LOADS": int(vec_loads), "SOFTCAP": int(softcap), "PAGE_SIZE": page_size,
    }
    return (defines | ({"KV_FP8": kv_fp8} if kv_fp8 else {})
            | ({"L2_PREFETCH": l2_prefetch} if l2_prefetch else {}))


def decode_merge_defines(dtype: str, head_dim: int) -> dict[str, int]:
    """The -D macros of flash_decode_merge for the decode row of padded head dim `head_dim`."""
    return {"HEAD_DIM": head_dim, "MERGE_WARPS": DECODE_MERGE_WARPS,
            "ELEM_F32": int(dtype == "float32"), "ELEM_BF16": int(dtype == "bfloat16")}


# ---- HIP (AMD) ----------------------------------------------------------------------------------
# The HIP kernels' rows, in their own small flat table: AMD targets are named by gfx strings, not
# compute capabilities. `select` above is for CUDA only; `select_hip` and `select_hip_backward`
# read this table.
#
# Columns as above, except:
#   kernel  entry point in kernels_hip/; its source is <kernel>.hip unless HIP_SOURCES says otherwise
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
# flash_fwd_portable: HEAD_DIM a multiple of the wave size, block_n dividing it, and
#   (block_m / waves) a multiple of (wave size / block_n).
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
    # merge and the append are entry points of the same source and take the same defines.
    ("flash_decode_portable",   "gfx9",  64,     None,   16,      32,      4,     1),
    ("flash_decode_portable",   "gfx9",  128,    None,   16,      32,      4,     1),
    ("flash_decode_portable",   "gfx9",  256,    None,   16,      16,      4,     1),
    ("flash_decode_portable",   "rdna",  32,     None,   16,      32,      4,     1),
    ("flash_decode_portable",   "rdna",  64,     None,   16,      32,      4,     1),
    ("flash_decode_portable",   "rdna",  128,    None,   16,      32,      4,     1),
    ("flash_decode_portable",   "rdna",  256,    None,   16,      16,      4,     1),
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

# Entry points whose source file has another name.
HIP_SOURCES = {"flash_bwd_preprocess": "flash_bwd_prep.hip",
               "flash_bwd_portable_dq": "flash_bwd_portable.hip",
               "flash_bwd_portable_dkdv": "flash_bwd_portable.hip",
               "flash_fwd_wmma": "flash_fwd_mfma.hip",
               "flash_bwd_wmma_dkdv": "flash_bwd_mfma_dkdv.hip",
               "flash_bwd_wmma_dq": "flash_bwd_mfma_dq.hip",
               "flash_decode_wmma": "flash_decode_mfma.hip",
               "flash_decode_merge_portable": "flash_decode_portable.hip",
               "kvcache_append_portable": "flash_decode_portable.hip"}
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


HIP_DECODE_KERNEL = "flash_decode_portable"  # its merge and append: HIP_SOURCES
# The decode kernels that can serve each dtype, in order of preference (as HIP_KERNELS_FOR_DTYPE).
HIP_DECODE_KERNELS_FOR_DTYPE = {
    "float16": ("flash_decode_mfma", "flash_decode_wmma", HIP_DECODE_KERNEL),
    "bfloat16": ("flash_decode_mfma", "flash_decode_wmma", HIP_DECODE_KERNEL),
    "float32": (HIP_DECODE_KERNEL,),
}
HIP_DECODE_KERNELS = HIP_DECODE_KERNELS_FOR_DTYPE["float16"]


@functools.lru_cache(maxsize=None)
def select_hip_decode(dtype: str, gcn_arch: str, head_dim: int) -> TileConfig:
    """The HIP decode row (xattn.hip.decode) for a device of this gcnArchName and head dim: the
    matrix-core decode where the device's family has a row that large, else the portable one."""
    for kernel in HIP_DECODE_KERNELS_FOR_DTYPE[dtype]:
        if not _hip_kernel_usable(kernel, gcn_arch):
            continue
        row = _hip_row(kernel, gcn_arch, head_dim, False)
        if row is not None:
            return row
    if _hip_row(HIP_DECODE_KERNEL, gcn_arch, head_dim, False) is None:  # may raise (no family)
        raise ValueError(f"q: expected head dim D in 1..{MAX_HEAD_DIM}, got {head_dim}")
    raise AssertionError("unreachable: the portable decode serves every head dim")


@functools.lru_cache(maxsize=None)
def hip_decode_aux_row(gcn_arch: str, head_dim: int) -> TileConfig:
    """The portable decode row whose source's merge and append entry points (HIP_SOURCES) serve a
    decode row of padded head dim `head_dim` on this device: the partials it merges are rows of
    HEAD_DIM floats, so its head dim is the decode row's, exactly."""
    row = _hip_row(HIP_DECODE_KERNEL, gcn_arch, head_dim, False)
    if row is None or row.head_dim != head_dim:
        raise ValueError(f"q: no portable decode row of head dim {head_dim} for {gcn_arch!r} "
                         f"(the matrix-core decode rows take the portable rows' head dims)")
    return row


def hip_source(kernel: str) -> str:
    return HIP_SOURCES.get(kernel, kernel + ".hip")


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
    for kernel in kernels:
        if not _hip_kernel_usable(kernel, gcn_arch):
            continue
        row = _hip_row(kernel, gcn_arch, head_dim, causal)
        if row is not None:
            return row
    if _hip_row(HIP_KERNELS_FOR_DTYPE[dtype][-1], gcn_arch, head_dim, causal) is None:  # may raise
        raise ValueError(f"q: expected head dim D in 1..{MAX_HEAD_DIM}, got {head_dim}")
    raise AssertionError("unreachable: the last kernel serves every head dim")


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


def hip_shared_memory_bytes(cfg: TileConfig) -> int:
    """LDS of one block, from the layouts in the kernels' headers."""
    d = cfg.head_dim
    pad = 8 if cfg.kernel in HIP_WMMA_KERNELS else 4  # LDS_PAD of wmma.h and mfma.h
    kernel = cfg.kernel.replace("_wmma", "_mfma")  # the same sources and layouts
    # frags_in_lds: the tiles staged over the others stay beside them instead.
    if kernel in ("flash_fwd_mfma", "flash_decode_mfma"):  # 16-bit tiles; Q staged over K and V^T
        q_stage = cfg.block_m * (d + pad)
        k_vt = cfg.block_n * (d + pad) + d * (cfg.block_n + pad)
        return (q_stage + k_vt if cfg.frags_in_lds else max(q_stage, k_vt)) * 2
    if kernel == "flash_bwd_mfma_dkdv":  # Q, dO as stored and transposed; K, V staged over them
        tiles = 2 * cfg.block_m * (d + pad) + 2 * d * (cfg.block_m + pad)
        stage = cfg.block_n * (d + pad)
        tiles += 2 * stage if cfg.frags_in_lds else 0
        return max(tiles, stage) * 2 + 2 * cfg.block_m * 4  # + LSE and delta, float32
    if kernel == "flash_bwd_mfma_dq":  # K, V, K^T; Q and dO staged over them
        tiles = 2 * cfg.block_n * (d + pad) + d * (cfg.block_n + pad)
        stage = cfg.block_m * (d + pad)
        return (tiles + 2 * stage if cfg.frags_in_lds else max(tiles, stage)) * 2
    if cfg.kernel in ("flash_fwd_portable", "flash_decode_portable"):  # float32: sQ, sK (odd strides), sV, sP, sRow
        return (cfg.block_m * (d + 1) + cfg.block_n * (d + 1) + cfg.block_n * d
                + cfg.block_m * cfg.block_n + cfg.block_m) * 4
    if cfg.kernel in _PORTABLE_BWD:  # float32, odd strides: owned rows, streamed tile, dS (P, dS)
        owned, step = _portable_bwd_rows(cfg)
        slices = owned * step * (1 if cfg.kernel == "flash_bwd_portable_dq" else 2)
        return (2 * owned * (d + 1) + 2 * step * (d + 1) + slices) * 4
    if cfg.kernel == "flash_bwd_preprocess":
        return 0
    raise KeyError(f"{cfg.kernel}: not a kernel of this table (no shared-memory layout known "
                   f"for it)")


def _portable_bwd_rows(cfg: TileConfig) -> tuple[int, int]:
    """(rows a block owns, rows streamed per step) of a portable backward row."""
    if cfg.kernel == "flash_bwd_portable_dq":
        return cfg.block_m, cfg.block_n
    return cfg.block_n, cfg.block_m


def hip_threads(cfg: TileConfig) -> int:
    return cfg.warps * hip_wave_size(cfg)


def hip_defines(cfg: TileConfig, dtype: str, causal: bool, vec_loads: bool) -> dict[str, int]:
    """The -D macros that specialize a HIP kernel source for one variant."""
    common = {
        "ELEM_TYPE": {"float16": 0, "bfloat16": 1, "float32": 2}[dtype],
        "NUM_WAVES": cfg.warps,
        "WAVE_SIZE": hip_wave_size(cfg),
    }
    if cfg.kernel == "flash_bwd_preprocess":
        return common | {"BLOCK_M": cfg.block_m}
    common |= {"HEAD_DIM": cfg.head_dim, "IS_CAUSAL": int(causal)}
    mfma = {"ELEM_BF16": int(dtype == "bfloat16"), "VEC_LOADS": int(vec_loads)}
    if cfg.kernel in HIP_WMMA_KERNELS:
        mfma |= {"MATRIX_WMMA": 1, "WMMA_GFX12": int(cfg.arch == "rdna4")}
    if cfg.frags_in_lds:
        mfma |= {"FRAGS_IN_LDS": 1}
    if cfg.dim_split != 1:
        mfma |= {"DIM_SPLIT": cfg.dim_split}
    if cfg.kernel in ("flash_fwd_mfma", "flash_bwd_mfma_dq", "flash_fwd_wmma", "flash_bwd_wmma_dq",
                      "flash_decode_mfma", "flash_decode_wmma"):
        return common | mfma | {"BLOCK_N": cfg.block_n}
    if cfg.kernel in ("flash_bwd_mfma_dkdv", "flash_bwd_wmma_dkdv"):
        return common | mfma | {"BLOCK_M": cfg.block_m}
    if cfg.kernel in _PORTABLE_BWD:
        owned, step = _portable_bwd_rows(cfg)
        return common | {"BLOCK_ROWS": owned, "TILE": step}
    return common | {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}  # flash_fwd_portable


def hip_grid(cfg: TileConfig, seqlen_q: int, seqlen_k: int, heads_q: int, heads_k: int,
             batch: int) -> tuple[int, int, int]:
    """The grid of one launch of `cfg`: query blocks x query heads, or, for the dK/dV kernels, key
    blocks x key/value heads; the batch (or a chunk of it) in z."""
    if cfg.kernel in ("flash_bwd_mfma_dkdv", "flash_bwd_wmma_dkdv", "flash_bwd_portable_dkdv"):
        return (math.ceil(seqlen_k / cfg.block_n) * cfg.dim_split, heads_k, batch)
    owned = cfg.block_m
    return (math.ceil(seqlen_q / owned), heads_q, batch)
