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


_ROWS = [
    # kernel          arch  head_dim causal  block_m  block_n  warps  min_blocks
    ("flash_fwd",      80,   32,      None,   128,     128,     4,     1),
    ("flash_fwd",      80,   64,      None,   128,     128,     4,     1),
    ("flash_fwd",      80,   96,      None,   128,     64,      4,     1),
    ("flash_fwd",      80,   128,     False,  128,     64,      4,     1),
    ("flash_fwd",      80,   128,     True,   128,     48,      4,     1),
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
    ("flash_fwd",      90,   128,     False,  128,     64,      4,     1),
    ("flash_fwd",      90,   128,     True,   128,     48,      4,     1),
    ("flash_fwd",      90,   160,     None,   64,      64,      4,     1),
    ("flash_fwd",      90,   192,     None,   64,      64,      4,     1),
    ("flash_fwd",      90,   256,     None,   64,      64,      4,     1),
    # float32: exact CUDA-core arithmetic, block_n is the warp size
    ("flash_fwd_f32",  80,   32,      None,   32,      32,      4,     1),
    ("flash_fwd_f32",  80,   64,      None,   32,      32,      4,     1),
    ("flash_fwd_f32",  80,   128,     None,   32,      32,      4,     1),
    ("flash_fwd_f32",  80,   256,     None,   16,      32,      4,     1),
]

TABLE = [TileConfig(*row) for row in _ROWS]

# Which kernel serves which dtype.
KERNEL_FOR_DTYPE = {"float16": "flash_fwd", "bfloat16": "flash_fwd", "float32": "flash_fwd_f32"}

MAX_HEAD_DIM = 256


def select(kernel: str, arch: int, head_dim: int, causal: bool) -> TileConfig:
    """The row for `kernel` on a device of compute capability `arch` at this head dim."""
    family = max((r.arch for r in TABLE if r.kernel == kernel and r.arch <= arch), default=None)
    if family is None:
        raise ValueError(f"{kernel} needs compute capability 8.0 or newer, got {arch / 10:.1f}")
    rows = [r for r in TABLE if r.kernel == kernel and r.arch == family and r.head_dim >= head_dim
            and r.causal in (None, causal)]
    if not rows:
        raise ValueError(f"head dim must be at most {MAX_HEAD_DIM}, got {head_dim}")
    return min(rows, key=lambda r: r.head_dim)


def shared_memory_bytes(cfg: TileConfig) -> int:
    """Dynamic shared memory of one thread block, from the layout in the kernel's header."""
    if cfg.kernel == "flash_fwd":
        padded_row = cfg.head_dim + 8  # 16-byte pad per row (SMEM_STRIDE)
        return (cfg.block_m + 2 * cfg.block_n) * padded_row * 2  # Q, K, V tiles
    if cfg.kernel == "flash_fwd_f32":
        q = cfg.block_m * cfg.head_dim
        k = cfg.block_n * (cfg.head_dim + 1)
        v = cfg.block_n * cfg.head_dim
        p = cfg.block_m * cfg.block_n
        return (q + k + v + p) * 4
    raise KeyError(cfg.kernel)


def defines(cfg: TileConfig, dtype: str, causal: bool, vec_loads: bool) -> dict[str, int]:
    """The -D macros that specialize the kernel source for one variant."""
    common = {
        "HEAD_DIM": cfg.head_dim,
        "NUM_WARPS": cfg.warps,
        "IS_CAUSAL": int(causal),
        "MIN_BLOCKS": cfg.min_blocks,
    }
    if cfg.kernel == "flash_fwd":
        return common | {
            "ELEM_BF16": int(dtype == "bfloat16"),
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "VEC_LOADS": int(vec_loads),
        }
    return common | {"ROWS_PER_WARP": cfg.block_m // cfg.warps}


def grid(cfg: TileConfig, seqlen_q: int, heads: int, batch: int) -> tuple[int, int, int]:
    return (math.ceil(seqlen_q / cfg.block_m), heads, batch)
