"""One description per kernel entry point: its source, entry name, parameter block, the -D defines
of a variant, and, from those defines, its dynamic shared memory, threads per block and grid.

The tiles come from the flat table of rows (xattn/configs.py) or, for the Hopper kernels, from
xattn/sm90.py's rows; a description turns a row and a call's variant into the macros the source
is compiled with (`defines`). Shared memory, threads and grid are read from those macros only, as
the kernel's own header computes them from the same macros, so a row and its compile can never
disagree. Constants a kernel needs that no row holds (the preprocess's rows per block, the decode
merge's warps) are defined here and passed to it; the launch constants that are a kernel's own
structure (the Hopper kernels' warpgroups, the 16-bit tiles' row padding, the matrix-core blocks)
are read from the sources by tests/test_kernels.py and compared with these.

Every launch site (xattn/cuda.py, sm90.py, kvcache.py, hip.py) and the compile checks
(ci/compile_kernels.py, ci/hip_compile.py) take their kernels from `KERNELS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from xattn import configs, jit, launch, params


class Sizes(NamedTuple):
    """The sizes a grid is computed from (the batch goes in gridDim.z: launch.Launch)."""
    seqlen_q: int = 0    # query rows per batch entry (a packed batch: its longest sequence; the
                         # row-wise preprocess: every row of the entry)
    seqlen_k: int = 0
    heads_q: int = 0
    heads_k: int = 0
    head_dim: int = 0    # the decode's append: elements per row
    seqlen_new: int = 0  # the decode's append: rows appended per sequence
    m_blocks: int = 0    # the decode: row tiles per kv head
    splits: int = 1      # the decode: blocks sharing one row tile's keys
    batch: int = 0       # a persistent grid (the sm90 forward's PERSISTENT): the batch entries its
                         # CTAs walk (other grids take the batch in gridDim.z: launch.Launch)
    resident: int = 0    # a persistent grid: the CTAs that run at once (one per SM)


@dataclass(frozen=True)
class Kernel:
    """One entry point. defines(row, dtype, **variant) -> {macro: value}; shared_memory(defines)
    -> bytes; threads(defines) -> threads per block; grid(defines, Sizes) -> (x, y)."""
    vendor: str                 # "cuda" or "hip": the source lives in kernels_<vendor>/
    entry: str                  # the extern "C" name
    source: str                 # the file, relative to kernels_<vendor>/
    params: np.dtype            # the parameter block it takes by value (kernels_common/params.h)
    defines: Callable[..., dict]
    shared_memory: Callable[[dict], int]
    threads: Callable[[dict], int]
    grid: Callable[[dict, Sizes], tuple]
    options: tuple = ()         # compiler options beside the defines (the Hopper "a" target)

    def compile(self, defines: dict, device: int):
        """The compiled entry point (a cupy.RawKernel) of these defines on `device`."""
        return jit.get_function(self.vendor, self.source, self.entry, defines, device,
                                options=self.options)

    def launch(self, defines: dict, sizes: Sizes, block: np.ndarray, batch: int, device: int, *,
               compile=None, maps=()):
        """A launch.Launch of this entry point built with `defines`: its grid, threads and shared
        memory (opted in once: launch.function) and its parameter block; the batch goes in
        gridDim.z. compile(kernel, defines, device): another compiler than `Kernel.compile` (the
        hip backend's on NVIDIA, the tests' stand-ins). maps: launch.Launch's tensor maps."""
        compiled = (compile or Kernel.compile)(self, defines, device)
        smem = self.shared_memory(defines)
        return launch.Launch(launch.function(compiled, device, smem), self.grid(defines, sizes),
                             batch, self.threads(defines), smem, block, maps=maps)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _elem(dtype: str) -> dict:
    return {"ELEM_F32": int(dtype == "float32"), "ELEM_BF16": int(dtype == "bfloat16")}


# ---- grids -------------------------------------------------------------------------------------

def _queries_grid(block_m: str):
    """Query blocks x query heads: a block of d[block_m] query rows."""
    return lambda d, s: (_ceil(s.seqlen_q, d[block_m]), s.heads_q)


def _keys_grid(block_n: Callable[[dict], int]):
    """Key blocks x kv heads (dK/dV kernels, one block per block_n(d) keys; DIM_SPLIT blocks per
    key block where the head dim is split across blocks)."""
    return lambda d, s: (_ceil(s.seqlen_k, block_n(d)) * d.get("DIM_SPLIT", 1), s.heads_k)


def _warps(d: dict) -> int:
    return d["NUM_WARPS"] * 32


# ---- CUDA: the mma.sync kernels (kernels_cuda/mma_tile.h) ------------------------------------------

CHUNK = 8  # 16-bit elements per 16-byte copy: shared-memory rows are padded by one (mma_tile.h)


# The widest dK/dV slice one warp of flash_bwd_dkdv keeps in registers: 2 x 16 keys x 128 columns
# = 128 floats per thread. Past it the warps of a key group split the head dim.
DKDV_WARP_COLS = 128


def dkdv_warps_d(head_dim: int) -> int:
    """Warps that split the head dim of one key group's dK/dV in flash_bwd_dkdv (DKV_WARPS_D)."""
    return -(-head_dim // DKDV_WARP_COLS)


def _tensor_core_defines(cfg, dtype: str, *, causal: bool, vec: bool) -> dict:
    defines = {"HEAD_DIM": cfg.head_dim, "NUM_WARPS": cfg.warps, "IS_CAUSAL": int(causal),
               "MIN_BLOCKS": cfg.min_blocks, "ELEM_BF16": int(dtype == "bfloat16"),
               "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "VEC_LOADS": int(vec)}
    if cfg.kernel == "flash_bwd_dkdv":
        defines["DKV_WARPS_D"] = dkdv_warps_d(cfg.head_dim)
    return defines


def _fwd_smem(d: dict) -> int:
    """flash_fwd.cu: the Q, K and V tiles, 16-bit, rows padded by one chunk."""
    return (d["BLOCK_M"] + 2 * d["BLOCK_N"]) * (d["HEAD_DIM"] + CHUNK) * 2


def _dkdv_smem(d: dict) -> int:
    """flash_bwd_dkdv.cu: K, V, two buffers of Q and dO; dS^T (and P^T beside it when the head
    dim is split over warps); two buffers of LSE and delta (floats)."""
    m, n, row = d["BLOCK_M"], d["BLOCK_N"], d["HEAD_DIM"] + CHUNK
    tiles = (2 * n + 4 * m) * row * 2
    ds = n * (m + CHUNK) * 2 * (2 if d["DKV_WARPS_D"] > 1 else 1)
    return tiles + ds + 4 * m * 4


def _dq_smem(d: dict) -> int:
    """flash_bwd_dq.cu: Q, dO, two buffers of K and V."""
    return (2 * d["BLOCK_M"] + 4 * d["BLOCK_N"]) * (d["HEAD_DIM"] + CHUNK) * 2


# ---- CUDA: the CUDA-core float32 kernels (kernels_common/simt_tile.h) -------------------------------

WARP = 32  # CUDA's warp size: the CUDA-core kernels stream tiles of one key (or query) per lane


def _f32_forward_defines(cfg, dtype: str, *, causal: bool, vec: bool = False) -> dict:
    """kernels_common/flash_fwd_simt.h entered by flash_fwd_f32.cu: a wave is a warp."""
    return {"HEAD_DIM": cfg.head_dim, "NUM_WAVES": cfg.warps, "IS_CAUSAL": int(causal),
            "MIN_BLOCKS": cfg.min_blocks, "ELEM_F32": 1, "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n}


def _wave_size(d: dict) -> int:
    """The wave of a kernel both vendors compile: HIP's defines carry WAVE_SIZE; on CUDA, whose
    defines do not (platform.h), a wave is a warp."""
    return d.get("WAVE_SIZE", WARP)


def _simt_threads(d: dict) -> int:
    return d["NUM_WAVES"] * _wave_size(d)


def _simt_forward_smem(d: dict) -> int:
    """kernels_common/flash_fwd_simt.h: sQ (odd stride with more than one row group), sK (odd
    stride), sV, sP, and sRow with more than one row group; floats."""
    hd, m, n = d["HEAD_DIM"], d["BLOCK_M"], d["BLOCK_N"]
    groups = _wave_size(d) // n
    q_stride, row_floats = (hd, 0) if groups == 1 else (hd + 1, m)
    return (m * q_stride + n * (hd + 1) + n * hd + m * n + row_floats) * 4


def _simt_defines(cfg, dtype: str, *, causal: bool, vec: bool = False) -> dict:
    """kernels_common/flash_bwd_simt.h entered by flash_bwd_simt.cu: a wave is a warp. _dq owns
    block_m queries and streams block_n keys a step, _dkdv owns block_n keys and streams block_m
    queries."""
    return {"HEAD_DIM": cfg.head_dim, "NUM_WAVES": cfg.warps, "IS_CAUSAL": int(causal),
            "MIN_BLOCKS": cfg.min_blocks, **_elem(dtype), **_simt_backward_rows(cfg)}


def _simt_backward_rows(cfg) -> dict:
    """BLOCK_ROWS (owned) and TILE (streamed a step) of a backward row, either vendor."""
    owned, step = ((cfg.block_m, cfg.block_n) if cfg.kernel.endswith("_dq")
                   else (cfg.block_n, cfg.block_m))
    return {"BLOCK_ROWS": owned, "TILE": step}


def _simt_backward_smem(slices_per_row: int):
    """kernels_common/flash_bwd_simt.h: the owned rows (two tensors; odd stride with more than one
    row group), the streamed tile (two tensors, odd stride), and slices_per_row floats of dS (or
    P and dS) per owned row and streamed row."""
    def smem(d: dict) -> int:
        hd, owned, step = d["HEAD_DIM"], d["BLOCK_ROWS"], d["TILE"]
        owned_stride = hd if _wave_size(d) == step else hd + 1
        return (2 * owned * owned_stride + 2 * step * (hd + 1) + owned * step * slices_per_row) * 4
    return smem


# ---- CUDA: the backward's row-wise kernels (flash_bwd_prep.cu) --------------------------------------
# No table row: one warp per ROWS_PER_WARP query rows, lanes along the head dim.

PREP_WARPS, PREP_ROWS_PER_WARP = 4, 8


def _prep_defines(cfg, dtype: str) -> dict:
    return {**_elem(dtype), "NUM_WARPS": PREP_WARPS, "ROWS_PER_WARP": PREP_ROWS_PER_WARP}


def _prep_grid(d: dict, s: Sizes) -> tuple:
    return (_ceil(s.seqlen_q, d["NUM_WARPS"] * d["ROWS_PER_WARP"]), s.heads_q)


# ---- CUDA: KV-cache decoding (flash_decode.cu, flash_decode_f32.cu, flash_decode_merge.cu) -----------

MERGE_WARPS = 4  # query rows per merge block, one warp each


def decode_stages(cfg, fp8: bool) -> int:
    """The cp.async ring depth of a decode variant: the row's stages, or for FP8 caches its
    fp8_stages where it has them (a stage of 1-byte codes is half the bytes, so about twice the
    stages keep as many bytes in flight in the same shared memory)."""
    return cfg.fp8_stages if fp8 and cfg.fp8_stages else cfg.stages


def _decode_defines(cfg, dtype: str, *, rows: int, vec: bool, softcap: bool, page_size: int = 0,
                    kv_fp8: int = 0, l2_prefetch: int = 0) -> dict:
    """rows: query rows per tile (BLOCK_M: the call's, up to the row's block_m); kv_fp8: 0, or the
    cache's configs.DECODE_FP8_FORMATS value; l2_prefetch: the cache copies' L2 hint (0, 128,
    256). The kernel's file sets ELEM_F32 itself."""
    defines = {"HEAD_DIM": cfg.head_dim, "NUM_WARPS": cfg.warps, "MIN_BLOCKS": cfg.min_blocks,
               "ELEM_BF16": int(dtype == "bfloat16"), "BLOCK_M": rows,
               "WARP_N": cfg.block_n // cfg.warps, "STAGES": decode_stages(cfg, bool(kv_fp8)),
               "VEC_LOADS": int(vec), "SOFTCAP": int(softcap), "PAGE_SIZE": page_size}
    if kv_fp8 and cfg.head_dim == 64 and cfg.arch < 90:
        defines["RING_SWIZZLE"] = 0  # flash_decode.cu, ring_at: ptxas spills these swizzled
    return (defines | ({"KV_FP8": kv_fp8} if kv_fp8 else {})
            | ({"L2_PREFETCH": l2_prefetch} if l2_prefetch else {}))


def _decode_smem(elem_bytes: int):
    """decode_common.h's layout: the Q tile, the row limits, then the warps' K/V rings (FP8
    caches: rings of 1-byte codes; the float32 kernel adds each warp's K and V conversion tiles)
    or, reusing them, the merge scratch."""
    def smem(d: dict) -> int:
        hd, rows, warps, warp_n = d["HEAD_DIM"], d["BLOCK_M"], d["NUM_WARPS"], d["WARP_N"]
        fp8 = bool(d.get("KV_FP8"))
        stride = hd + 16 // elem_bytes  # Q's rows padded by 16 bytes
        cache_bytes = 1 if fp8 else elem_bytes
        # ring rows: swizzled and unpadded in flash_decode.cu (RING_SWIZZLE, on unless set to 0),
        # padded by 16 bytes otherwise (and in the float32 kernel)
        swizzled = elem_bytes == 2 and d.get("RING_SWIZZLE", 1)
        ring_row = hd * cache_bytes + (0 if swizzled else 16)
        rings = warps * d["STAGES"] * 2 * warp_n * ring_row
        if fp8 and elem_bytes == 4:
            rings += warps * 2 * warp_n * stride * elem_bytes  # conversion tiles
        merge = (rows * (hd + 4) + 2 * warps * rows) * 4
        return rows * stride * elem_bytes + 2 * rows * 4 + max(rings, merge)
    return smem


def _decode_grid(d: dict, s: Sizes) -> tuple:
    return (s.m_blocks * s.splits, s.heads_k)


def _merge_defines(cfg, dtype: str) -> dict:
    """cfg: the decode row whose partials it merges (rows of HEAD_DIM floats)."""
    return {"HEAD_DIM": cfg.head_dim, "MERGE_WARPS": MERGE_WARPS, **_elem(dtype)}


def _merge_grid(d: dict, s: Sizes) -> tuple:
    return (max(1, _ceil(s.heads_q * s.seqlen_q, d["MERGE_WARPS"])), 1)


# ---- CUDA: the Hopper kernels (kernels_cuda/sm90/: TMA, wgmma) ---------------------------------------
# Launch constants of their structure (two consumer warpgroups and a producer): the sources define
# them from their warpgroups; tests/test_kernels.py reads them there and compares.

SM90_THREADS = 384       # NUM_THREADS of both
SM90_BLOCK_M = 128       # the forward's query rows per CTA (BLOCK_M there)
SM90_STORE_ROWS = 64     # rows of one consumer's store box (WGMMA_M)
SM90_WARP_ROWS = 16      # rows of one warp's dQ reduce box (WARP_ROWS, the D256 backward)
SM90_SMEM_ALIGN = 1024   # the kernels align shared memory to the 128-byte swizzle's 1024-byte atom
SM90_BARRIER_BYTES = 8
SM90_OPTIONS = ("-arch=sm_90a",)  # wgmma and setmaxnreg exist only on the "a" target


def _sm90_forward_defines(row, dtype: str, *, flags: dict) -> dict:
    """flags: the band and modifiers (IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI), packed batches
    (IS_VARLEN), sinks (HAS_SINKS) and the persistent grid (PERSISTENT: flags' where given, which
    xattn/sm90.py's plan decides from the row and the query length, else whether the row ever
    uses it; never with a packed batch); the last three only where set, so that the other
    variants compile exactly as before."""
    persistent = flags.get("PERSISTENT", row.persistent > 0) and not flags.get("IS_VARLEN")
    extra = ({k: 1 for k in ("IS_VARLEN", "HAS_SINKS") if flags.get(k)}
             | ({"PERSISTENT": 1} if persistent else {}))
    # OVERLAP_WAIT_LATE: the rows that keep the wait after the softmax (xattn/sm90.py)
    late = {"OVERLAP_WAIT_LATE": 1} if row.overlap and not row.softmax_under_pv else {}
    return {"ELEM_BF16": int(dtype == "bfloat16"), "HEAD_DIM": row.head_dim,
            "BLOCK_N": row.block_n, "STAGES": row.stages, "OVERLAP": row.overlap,
            "PINGPONG": row.pingpong, "RESCALE_SLACK": row.rescale_slack, **_sm90_flags(flags), **extra,
            **late}


def _sm90_flags(flags: dict) -> dict:
    return {k: int(flags.get(k, 0)) for k in ("IS_CAUSAL", "IS_LOCAL", "HAS_SOFTCAP", "HAS_ALIBI")}


def _sm90_forward_smem(d: dict) -> int:
    """sm90/flash_fwd.cu: sQ, STAGES K and V tiles, the barriers (q_full, q_empty and v_tail, and
    k_full, v_full, k_empty, v_empty per stage), plus the slack to align it to 1024 bytes."""
    q = SM90_BLOCK_M * d["HEAD_DIM"] * 2
    kv = 2 * d["STAGES"] * d["BLOCK_N"] * d["HEAD_DIM"] * 2
    return SM90_SMEM_ALIGN + q + kv + SM90_BARRIER_BYTES * (3 + 4 * d["STAGES"])


def _sm90_forward_grid(d: dict, s: Sizes) -> tuple:
    """One CTA per query block and head (the batch in gridDim.z), or with PERSISTENT one per SM,
    at most one per query block of the whole batch (a causal grid's CTAs take pairs of blocks: a
    CTA past their count finds no work and ends)."""
    blocks = _ceil(s.seqlen_q, SM90_BLOCK_M)
    if d.get("PERSISTENT"):
        return (max(1, min(s.resident, blocks * s.heads_q * s.batch)), 1)
    return (blocks, s.heads_q)


def _sm90_backward_defines(row, dtype: str, *, flags: dict, compute_dq: bool = True) -> dict:
    """compute_dq False: dK and dV only (deterministic=True takes dQ from flash_bwd_dq). flags as
    the forward's; IS_VARLEN only where set, so that the other variants compile as before."""
    return {"ELEM_BF16": int(dtype == "bfloat16"), "HEAD_DIM": row.head_dim, "BLOCK_N": row.block_n,
            "BLOCK_M": row.block_m, "STAGES": row.stages, "DQ_TMA": int(row.dq_tma),
            "EARLY_SCORES": int(row.early_scores), "COMPUTE_DQ": int(compute_dq), **_sm90_flags(flags),
            **({"IS_VARLEN": 1} if flags.get("IS_VARLEN") else {})}


def sm90_dq_by_box(block_n: int, dq_tma: bool, compute_dq: bool) -> bool:
    """flash_bwd.cu's DQ_BY_BOX: the D256 row (its consumers share 64 keys) with the TMA
    reduce-add, where each warp stages its 16 rows of dQ one 32-column box at a time, and sP and
    sdS have one buffer each."""
    return block_n == SM90_STORE_ROWS and dq_tma and compute_dq


def _sm90_backward_smem(d: dict) -> int:
    """sm90/flash_bwd.cu: sK and sV, STAGES Q and dO tiles, two dS^T buffers where it computes dQ
    or the consumers share their keys (and then two P^T buffers), each consumer's float32 dQ tile
    (DQ_TMA: 64 rows by half the step's dQ columns, DQ_COLS there) where it computes dQ, STAGES
    rows of lse and delta (floats), the barriers (kv_full, and full, empty per stage), plus the
    slack to align it to 1024 bytes."""
    hd, n, m, stages, with_dq = d["HEAD_DIM"], d["BLOCK_N"], d["BLOCK_M"], d["STAGES"], d["COMPUTE_DQ"]
    shared_keys = n == SM90_STORE_ROWS
    by_box = sm90_dq_by_box(n, d["DQ_TMA"], with_dq)
    buffers = 1 if by_box else 2
    kv = 2 * n * hd * 2
    q_do = 2 * stages * m * hd * 2
    ds = (buffers if with_dq or shared_keys else 0) * n * m * 2 + (buffers * n * m * 2 if shared_keys else 0)
    dq_cols = 32 if by_box else hd * (m // SM90_STORE_ROWS) // 2
    dq = 2 * SM90_STORE_ROWS * dq_cols * 4 if with_dq and d["DQ_TMA"] else 0
    rows = 2 * stages * m * 4
    return SM90_SMEM_ALIGN + kv + q_do + ds + dq + rows + SM90_BARRIER_BYTES * (1 + 2 * stages)


# ---- HIP (kernels_hip/): threads are NUM_WAVES x WAVE_SIZE -----------------------------------------

def _waves(d: dict) -> int:
    return d["NUM_WAVES"] * d["WAVE_SIZE"]


def _hip_common(cfg, dtype: str) -> dict:
    return {"ELEM_TYPE": {"float16": 0, "bfloat16": 1, "float32": 2}[dtype],
            "NUM_WAVES": cfg.warps, "WAVE_SIZE": configs.hip_wave_size(cfg)}


def _hip_matrix_defines(tile: str):
    """The MFMA/WMMA kernels: HEAD_DIM, the masks, 16-bit loads, the matrix instruction set (WMMA
    on RDNA, WMMA_GFX12 for RDNA4's layout), and the one tile the waves do not split (`tile`)."""
    def defines(cfg, dtype: str, *, causal: bool, vec: bool) -> dict:
        wmma = cfg.kernel in configs.HIP_WMMA_KERNELS
        matrix = {"MATRIX_WMMA": 1, "WMMA_GFX12": int(cfg.arch == "rdna4")} if wmma else {}
        # The row's options (configs.py): fixed operands read from LDS, D split across blocks.
        matrix |= {"FRAGS_IN_LDS": 1} if cfg.frags_in_lds else {}
        matrix |= {"DIM_SPLIT": cfg.dim_split} if cfg.dim_split != 1 else {}
        return {**_hip_common(cfg, dtype), "HEAD_DIM": cfg.head_dim, "IS_CAUSAL": int(causal),
                "ELEM_BF16": int(dtype == "bfloat16"), "VEC_LOADS": int(vec), **matrix,
                tile: cfg.block_n if tile == "BLOCK_N" else cfg.block_m}
    return defines


def _lds_pad(d: dict) -> int:
    return 8 if d.get("MATRIX_WMMA") else 4  # LDS_PAD of wmma.h and mfma.h


def _hip_fwd_smem(d: dict) -> int:
    """flash_fwd_mfma.hip, flash_decode_mfma.hip: 16-bit tiles; Q staged over K and V^T (beside
    them with FRAGS_IN_LDS, whose fixed operands stay there)."""
    hd, n, pad = d["HEAD_DIM"], d["BLOCK_N"], _lds_pad(d)
    q_stage = _matrix_block_m(d) * (hd + pad)
    k_vt = n * (hd + pad) + hd * (n + pad)
    return (q_stage + k_vt if d.get("FRAGS_IN_LDS") else max(q_stage, k_vt)) * 2


def _matrix_block_m(d: dict) -> int:
    """Rows one block of the matrix-core kernels owns, one MATRIX_N block per wave (BLOCK_M of the
    forward, dQ and decode kernels, BLOCK_N of dK/dV): MATRIX_N is 32 on MFMA, 16 on WMMA (mfma.h,
    wmma.h)."""
    return d["NUM_WAVES"] * (16 if d.get("MATRIX_WMMA") else 32)


def _hip_dkdv_smem(d: dict) -> int:
    """flash_bwd_mfma_dkdv.hip: Q, dO as stored and transposed; K, V staged over them (beside
    them with FRAGS_IN_LDS); LSE and delta (floats)."""
    hd, m, pad = d["HEAD_DIM"], d["BLOCK_M"], _lds_pad(d)
    tiles = 2 * m * (hd + pad) + 2 * hd * (m + pad)
    stage = _matrix_block_m(d) * (hd + pad)
    tiles += 2 * stage if d.get("FRAGS_IN_LDS") else 0
    return max(tiles, stage) * 2 + 2 * m * 4


def _hip_dq_smem(d: dict) -> int:
    """flash_bwd_mfma_dq.hip: K, V, K^T; Q and dO staged over them (beside them with
    FRAGS_IN_LDS)."""
    hd, n, pad = d["HEAD_DIM"], d["BLOCK_N"], _lds_pad(d)
    tiles = 2 * n * (hd + pad) + hd * (n + pad)
    stage = _matrix_block_m(d) * (hd + pad)
    return (tiles + 2 * stage if d.get("FRAGS_IN_LDS") else max(tiles, stage)) * 2


def _hip_portable_defines(cfg, dtype: str, *, causal: bool, vec: bool = False) -> dict:
    """flash_fwd_portable.hip and flash_decode_portable.hip (whose merge and append entry points
    take the same defines). The variant's flags come on top, from xattn/hip.py, as on CUDA: the
    band, modifiers and packing (launch.variant), HAS_SINKS for a forward with sinks, KV_FP8 for
    the decode and append of FP8 caches (whose LDS tiles stay float32: the same size)."""
    return {**_hip_common(cfg, dtype), "HEAD_DIM": cfg.head_dim, "IS_CAUSAL": int(causal),
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}


def _hip_decode_smem(d: dict) -> int:
    """flash_decode_portable.hip: decode_common.h's layout (_decode_smem) with float32 tiles and
    one ring slot per wave of float32 values (synchronous copies convert as they copy)."""
    hd, rows, waves = d["HEAD_DIM"], d["BLOCK_M"], d["NUM_WAVES"]
    row = (hd + 4) * 4  # every tile row padded by 16 bytes
    rings = waves * 2 * (d["BLOCK_N"] // waves) * row
    merge = (rows * (hd + 4) + 2 * waves * rows) * 4
    return rows * row + 2 * rows * 4 + max(rings, merge)


def _hip_portable_bwd_defines(cfg, dtype: str, *, causal: bool, vec: bool = False) -> dict:
    """flash_bwd_portable.hip: kernels_common/flash_bwd_simt.h, as on CUDA."""
    return {**_hip_common(cfg, dtype), "HEAD_DIM": cfg.head_dim, "IS_CAUSAL": int(causal),
            **_simt_backward_rows(cfg)}


def _hip_prep_defines(cfg, dtype: str, *, causal: bool = False, vec: bool = False) -> dict:
    """No masks, no modifiers, no tiles: causal and vec change nothing (every HIP description
    takes them)."""
    return {**_hip_common(cfg, dtype), "BLOCK_M": cfg.block_m}


def _hip_append_grid(d: dict, s: Sizes) -> tuple:
    """One thread per appended element of a batch entry."""
    return (_ceil(s.heads_k * s.seqlen_new * s.head_dim, _waves(d)), 1)


def _hip_merge_grid(d: dict, s: Sizes) -> tuple:
    """One wave per query row."""
    return (_ceil(s.heads_q * s.seqlen_q, d["NUM_WAVES"]), 1)


def _none(d: dict) -> int:
    return 0


# ---- the registry ----------------------------------------------------------------------------------

_ATTN, _DECODE = params.ATTN_PARAMS, params.DECODE_PARAMS


def _cuda(entry, source, block, defines, smem, threads, grid, options=()):
    return Kernel("cuda", entry, source, block, defines, smem, threads, grid, options)


def _hip(entry, source, block, defines, smem, grid):
    return Kernel("hip", entry, source, block, defines, smem, _waves, grid)


_ALL = (
    _cuda("flash_fwd", "flash_fwd.cu", _ATTN, _tensor_core_defines, _fwd_smem, _warps,
          _queries_grid("BLOCK_M")),
    _cuda("flash_bwd_dkdv", "flash_bwd_dkdv.cu", _ATTN, _tensor_core_defines, _dkdv_smem, _warps,
          _keys_grid(lambda d: d["BLOCK_N"])),
    _cuda("flash_bwd_dq", "flash_bwd_dq.cu", _ATTN, _tensor_core_defines, _dq_smem, _warps,
          _queries_grid("BLOCK_M")),
    _cuda("flash_fwd_f32", "flash_fwd_f32.cu", _ATTN, _f32_forward_defines, _simt_forward_smem,
          _simt_threads, _queries_grid("BLOCK_M")),
    _cuda("flash_bwd_simt_dq", "flash_bwd_simt.cu", _ATTN, _simt_defines, _simt_backward_smem(1),
          _simt_threads, _queries_grid("BLOCK_ROWS")),
    _cuda("flash_bwd_simt_dkdv", "flash_bwd_simt.cu", _ATTN, _simt_defines, _simt_backward_smem(2),
          _simt_threads, _keys_grid(lambda d: d["BLOCK_ROWS"])),
    _cuda("flash_bwd_preprocess", "flash_bwd_prep.cu", _ATTN, _prep_defines, _none, _warps,
          _prep_grid),
    _cuda("flash_bwd_convert_dq", "flash_bwd_prep.cu", _ATTN, _prep_defines, _none, _warps,
          _prep_grid),
    _cuda("flash_decode", "flash_decode.cu", _DECODE, _decode_defines, _decode_smem(2), _warps,
          _decode_grid),
    _cuda("flash_decode_f32", "flash_decode_f32.cu", _DECODE, _decode_defines, _decode_smem(4),
          _warps, _decode_grid),
    _cuda("flash_decode_merge", "flash_decode_merge.cu", _DECODE, _merge_defines, _none,
          lambda d: d["MERGE_WARPS"] * 32, _merge_grid),
    _cuda("flash_fwd_sm90", "sm90/flash_fwd.cu", _ATTN, _sm90_forward_defines, _sm90_forward_smem,
          lambda d: SM90_THREADS, _sm90_forward_grid, SM90_OPTIONS),
    _cuda("flash_bwd_sm90", "sm90/flash_bwd.cu", _ATTN, _sm90_backward_defines, _sm90_backward_smem,
          lambda d: SM90_THREADS, lambda d, s: (_ceil(s.seqlen_k, d["BLOCK_N"]), s.heads_k),
          SM90_OPTIONS),

    _hip("flash_fwd_mfma", "flash_fwd_mfma.hip", _ATTN, _hip_matrix_defines("BLOCK_N"),
         _hip_fwd_smem, lambda d, s: (_ceil(s.seqlen_q, _matrix_block_m(d)), s.heads_q)),
    _hip("flash_fwd_wmma", "flash_fwd_mfma.hip", _ATTN, _hip_matrix_defines("BLOCK_N"),
         _hip_fwd_smem, lambda d, s: (_ceil(s.seqlen_q, _matrix_block_m(d)), s.heads_q)),
    _hip("flash_fwd_portable", "flash_fwd_portable.hip", _ATTN, _hip_portable_defines,
         _simt_forward_smem, _queries_grid("BLOCK_M")),
    _hip("flash_bwd_preprocess", "flash_bwd_prep.hip", _ATTN, _hip_prep_defines, _none,
         _queries_grid("BLOCK_M")),
    _hip("flash_bwd_mfma_dkdv", "flash_bwd_mfma_dkdv.hip", _ATTN, _hip_matrix_defines("BLOCK_M"),
         _hip_dkdv_smem, _keys_grid(_matrix_block_m)),
    _hip("flash_bwd_wmma_dkdv", "flash_bwd_mfma_dkdv.hip", _ATTN, _hip_matrix_defines("BLOCK_M"),
         _hip_dkdv_smem, _keys_grid(_matrix_block_m)),
    _hip("flash_bwd_mfma_dq", "flash_bwd_mfma_dq.hip", _ATTN, _hip_matrix_defines("BLOCK_N"),
         _hip_dq_smem, lambda d, s: (_ceil(s.seqlen_q, _matrix_block_m(d)), s.heads_q)),
    _hip("flash_bwd_wmma_dq", "flash_bwd_mfma_dq.hip", _ATTN, _hip_matrix_defines("BLOCK_N"),
         _hip_dq_smem, lambda d, s: (_ceil(s.seqlen_q, _matrix_block_m(d)), s.heads_q)),
    _hip("flash_bwd_portable_dq", "flash_bwd_portable.hip", _ATTN, _hip_portable_bwd_defines,
         _simt_backward_smem(1), _queries_grid("BLOCK_ROWS")),
    _hip("flash_bwd_portable_dkdv", "flash_bwd_portable.hip", _ATTN, _hip_portable_bwd_defines,
         _simt_backward_smem(2), _keys_grid(lambda d: d["BLOCK_ROWS"])),
    _hip("flash_decode_mfma", "flash_decode_mfma.hip", _DECODE, _hip_matrix_defines("BLOCK_N"),
         _hip_fwd_smem, _decode_grid),
    _hip("flash_decode_wmma", "flash_decode_mfma.hip", _DECODE, _hip_matrix_defines("BLOCK_N"),
         _hip_fwd_smem, _decode_grid),
    _hip("flash_decode_portable", "flash_decode_portable.hip", _DECODE, _hip_portable_defines,
         _hip_decode_smem, _decode_grid),
    _hip("flash_decode_merge_portable", "flash_decode_portable.hip", _DECODE, _hip_portable_defines,
         _none, _hip_merge_grid),
    _hip("kvcache_append_portable", "flash_decode_portable.hip", _DECODE, _hip_portable_defines,
         _none, _hip_append_grid),
)

KERNELS: dict[tuple[str, str], Kernel] = {(k.vendor, k.entry): k for k in _ALL}


def cuda(entry: str) -> Kernel:
    return KERNELS["cuda", entry]


def hip(entry: str) -> Kernel:
    return KERNELS["hip", entry]
