"""The "cuda" backend: launches the kernels of kernels_cuda/ through CuPy.

Arrays arrive in the (B, H, S, D) view with any batch, head and row strides and a contiguous last
dimension, as torch tensors or CuPy arrays; nothing is copied. Only the pointer, shape, strides and
dtype are read, so bfloat16 works without CuPy knowing that type. Work is launched on the device
that holds the arrays and on the stream the caller passes.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from xattn import configs, jit

LOG2_E = math.log2(math.e)
MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z


def availability() -> tuple[bool, str]:
    """(usable, why): CuPy importable, a CUDA (not ROCm) build, at least one device."""
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc}); pip install 'xattn[cuda13]' or 'xattn[cuda12]'"
    if cupy.cuda.runtime.is_hip:
        return False, "CuPy is a ROCm build; that is the 'hip' backend"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, no device
        return False, f"no usable CUDA device ({exc})"
    if count == 0:
        return False, "no CUDA device"
    return True, f"{count} CUDA device(s), compute capability {_arch(0) / 10:.1f} on device 0"


class _Array(NamedTuple):
    ptr: int
    shape: tuple
    strides: tuple  # in elements
    dtype: str
    device: int


def _describe(x) -> _Array:
    if hasattr(x, "data_ptr"):  # torch.Tensor
        return _Array(x.data_ptr(), tuple(x.shape), tuple(x.stride()),
                      str(x.dtype).removeprefix("torch."), x.device.index)
    size = x.dtype.itemsize
    return _Array(x.data.ptr, x.shape, tuple(s // size for s in x.strides), x.dtype.name, x.device.id)


_arch_cache: dict[int, int] = {}


def _arch(device_id: int) -> int:
    arch = _arch_cache.get(device_id)
    if arch is None:
        import cupy

        arch = _arch_cache[device_id] = int(cupy.cuda.Device(device_id).compute_capability)
    return arch


def _vec_loads(arrays: list[_Array], head_dim: int, itemsize: int) -> bool:
    """True when every row starts on a 16-byte boundary, so tiles can move in 16-byte copies."""
    per_vector = 16 // itemsize
    if head_dim % per_vector:
        return False
    return all(a.ptr % 16 == 0 and all(s % per_vector == 0 for s in a.strides[:3]) for a in arrays)


_smem_configured: set = set()
_smem_lock = threading.Lock()


def _prepare(kernel, key, smem_bytes: int) -> None:
    # Blocks that need more than 48 KB of shared memory must opt in, once per compiled kernel.
    # CuPy applies the attribute to the kernel of the *current* device: make it the kernel's own.
    if key not in _smem_configured:
        import cupy

        with _smem_lock, cupy.cuda.Device(key[0]):
            kernel.max_dynamic_shared_size_bytes = smem_bytes
            _smem_configured.add(key)


_streams: dict[tuple[int, int], object] = {}


def _external_stream(ptr: int, device_id: int):
    """A CuPy handle on the caller's stream (torch's, or any cudaStream_t), made once per stream."""
    handle = _streams.get((ptr, device_id))
    if handle is None:
        import warnings

        import cupy

        with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream for a protocol
            warnings.simplefilter("ignore", DeprecationWarning)  # raw pointers cannot speak
            handle = _streams[(ptr, device_id)] = cupy.cuda.ExternalStream(ptr, device_id)
    return handle


def _kernel(cfg, dtype: str, causal: bool, vec: bool, device: int, **extra_defines):
    """The compiled variant of a table row, its shared memory opted in."""
    defines = configs.defines(cfg, dtype, causal, vec) | extra_defines
    kernel = jit.get_function("cuda", _SOURCE.get(cfg.kernel, cfg.kernel + ".cu"), cfg.kernel, defines, device)
    smem = configs.shared_memory_bytes(cfg)
    _prepare(kernel, (device, id(kernel)), smem)
    return kernel, smem


_SOURCE = {"flash_bwd_preprocess": "flash_bwd_prep.cu", "flash_bwd_convert_dq": "flash_bwd_prep.cu",
           **configs.SOURCES}


def _launch(kernel, grid_xy, threads: int, smem: int, args, batch: int) -> None:
    """Launch over the batch in chunks (gridDim.z <= 65535). args: the kernel's arguments in
    order; (_Array, itemsize) pairs are pointers, moved by the chunk's batch offset."""
    for b0 in range(0, batch, MAX_GRID_YZ):
        nb = min(MAX_GRID_YZ, batch - b0)
        values = tuple(np.uint64(a[0].ptr + b0 * a[0].strides[0] * a[1]) if type(a) is tuple else a
                       for a in args)
        kernel(grid_xy + (nb,), (threads,), values, shared_mem=smem)


# A null pointer argument (no cu_seqlens, no ALiBi slopes): stride 0, so no chunk moves it.
_NULL = (_Array(0, (), (0,), "", -1), 4)


class _Variant(NamedTuple):
    """Masks and score modifiers of one call, as every kernel takes them (attention_common.h)."""
    defines: dict  # IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN
    args: list     # cu_seqlens_q, cu_seqlens_k, alibi_slopes, alibi_batch_stride, seqlen_q,
                   # seqlen_k, head_dim, heads_per_kv, window_left, window_right, softcap_scale,
                   # scale, scale_log2 (the score scale: the softcap c under a softcap)


def _variant(*, causal: bool, scale: float, window, softcap: float, alibi_slopes, cu_seqlens,
             seqlen_q: int, seqlen_k: int, head_dim: int, heads_per_kv: int) -> _Variant:
    left, right = window
    if causal:
        right = 0
    score_scale = softcap if softcap else scale
    cu = [(_describe(c), 4) for c in cu_seqlens] if cu_seqlens is not None else [_NULL, _NULL]
    if alibi_slopes is not None:
        slopes = _describe(alibi_slopes)  # float32 (Hq,) or (B, Hq), contiguous
        alibi = [(_Array(slopes.ptr, slopes.shape, (slopes.strides[0] if len(slopes.shape) == 2 else 0,),
                         "float32", slopes.device), 4),
                 np.int64(slopes.strides[0] if len(slopes.shape) == 2 else 0)]
    else:
        alibi = [_NULL, np.int64(0)]
    defines = {"IS_CAUSAL": int(right >= 0), "IS_LOCAL": int(left >= 0), "HAS_SOFTCAP": int(bool(softcap)),
               "HAS_ALIBI": int(alibi_slopes is not None), "IS_VARLEN": int(cu_seqlens is not None)}
    args = cu + alibi + [np.int32(seqlen_q), np.int32(seqlen_k), np.int32(head_dim), np.int32(heads_per_kv),
                         np.int32(left), np.int32(right), np.float32(scale / softcap if softcap else 0.0),
                         np.float32(score_scale), np.float32(score_scale * LOG2_E)]
    return _Variant(defines, args)


def _packed(a: _Array, varlen: bool) -> _Array:
    """A packed (varlen) tensor is one (1, H, T, D) batch entry that every sequence indexes from
    its own first row: batch stride 0."""
    return a._replace(strides=(0,) + a.strides[1:]) if varlen else a


def _strides(*arrays: _Array, dims: int = 3):
    return tuple(np.int64(s) for a in arrays for s in a.strides[:dims])


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int, window=(-1, -1),
            softcap: float = 0.0, alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> None:
    """Write out = softmax(scale * q k^T + modifiers) v and lse for (B, H, S, D) views (see the
    module docstring). window: (left, right), -1 unbounded; softcap: 0 for none; alibi_slopes:
    float32 (Hq,) or (B, Hq) on the device. Packed batches: q, k, v, out are (1, H, T, D) views,
    lse (1, Hq, Tq), cu_seqlens = (cu_seqlens_q, cu_seqlens_k) int32 on the device and
    max_seqlen = (max_seqlen_q, max_seqlen_k)."""
    import cupy

    varlen = cu_seqlens is not None
    Q, K, V, O, L = (_packed(_describe(a), varlen) for a in (q, k, v, out, lse))
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    if varlen:
        batch = cu_seqlens[0].shape[0] - 1
        seqlen_q, seqlen_k = max_seqlen
    if batch == 0 or heads_q == 0 or seqlen_q == 0:
        return
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} heads are supported, got {heads_q}")

    var = _variant(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                   cu_seqlens=cu_seqlens, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim,
                   heads_per_kv=heads_q // heads_k)
    has_right_edge = bool(var.defines["IS_CAUSAL"])
    kernel_name = configs.KERNEL_FOR_DTYPE[Q.dtype]
    cfg = configs.select(kernel_name, _arch(Q.device), head_dim, has_right_edge)
    size = _itemsize(Q.dtype)
    vec = kernel_name in configs.TENSOR_CORE_KERNELS and _vec_loads([Q, K, V, O], head_dim, size)
    kernel, smem = _kernel(cfg, Q.dtype, has_right_edge, vec, Q.device, **var.defines)
    args = [(Q, size), (K, size), (V, size), (O, size), (L, 4), *_strides(Q, K, V, O),
            *_strides(L, dims=2), *var.args]
    with cupy.cuda.Device(Q.device), _external_stream(stream, Q.device):
        _launch(kernel, (math.ceil(seqlen_q / cfg.block_m), heads_q), cfg.warps * 32, smem, args, batch)


# Rows per thread block of flash_bwd_prep.cu's kernels (ROWS_PER_BLOCK there).
_PREP_ROWS, _PREP_THREADS = 32, 128


def backward(q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool, scale: float,
             deterministic: bool, stream: int, window=(-1, -1), softcap: float = 0.0,
             alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> None:
    """Write dq, dk, dv for (B, H, S, D) views; lse is the forward's. dk and dv are summed over the
    query heads of each GQA group. deterministic: dQ from its own kernel instead of atomics (the
    CUDA-core path, float32 and head dims past the tensor-core rows, uses no atomics either way).
    window, softcap, alibi_slopes, cu_seqlens, max_seqlen: as in forward."""
    import cupy

    varlen = cu_seqlens is not None
    Q, K, V, O, dO, L, dQ, dK, dV = (_packed(_describe(a), varlen)
                                     for a in (q, k, v, out, dout, lse, dq, dk, dv))
    batch, heads_q, total_q, head_dim = Q.shape  # total_q: every query row (packed: all sequences)
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    seqlen_q = total_q
    if varlen:
        batch = cu_seqlens[0].shape[0] - 1
        seqlen_q, seqlen_k = max_seqlen
    if batch == 0 or heads_q == 0:
        return
    if seqlen_q == 0 or seqlen_k == 0:  # nothing attends: every gradient is zero
        for grad in (dq, dk, dv):
            grad.zero_() if hasattr(grad, "zero_") else grad.fill(0)
        return
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} heads are supported, got {heads_q}")

    arch, device, size = _arch(Q.device), Q.device, _itemsize(Q.dtype)
    var = _variant(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                   cu_seqlens=cu_seqlens, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim,
                   heads_per_kv=heads_q // heads_k)
    tail = var.args + [np.float32(scale)]  # grad_scale: the attention scale, for dQ and dK
    has_right_edge = bool(var.defines["IS_CAUSAL"])
    simt = _backward_on_cuda_cores(Q.dtype, arch, head_dim, has_right_edge)
    vec = not simt and _vec_loads([Q, K, V, O, dO, dQ, dK, dV], head_dim, size)
    prep_defines = {"ELEM_F32": int(Q.dtype == "float32"), "ELEM_BF16": int(Q.dtype == "bfloat16")}
    prep = jit.get_function("cuda", "flash_bwd_prep.cu", "flash_bwd_preprocess", prep_defines, device)
    # The row-wise kernels (delta, dQ conversion) see a packed batch as one entry of total_q rows.
    prep_batch = 1 if varlen else batch
    prep_grid = (math.ceil(total_q / _PREP_ROWS), heads_q)

    with cupy.cuda.Device(device), _external_stream(stream, device):
        # Scratch from the caller's framework, on its stream: delta, and dQ's float32 accumulator.
        # Held until the end: the caching allocators may reuse memory freed earlier.
        delta_array = _new_like(q, (prep_batch, heads_q, total_q), zero=False)
        delta = _packed(_describe(delta_array), varlen)

        _launch(prep, prep_grid, _PREP_THREADS, 0,
                [(O, size), (dO, size), (delta, 4), *_strides(O, dO), *_strides(delta, dims=2),
                 np.int32(total_q), np.int32(head_dim)], prep_batch)
        common = [(Q, size), (K, size), (V, size), (dO, size), (L, 4), (delta, 4)]

        if simt:  # deterministic by construction: no atomics anywhere
            _backward_simt(common, dQ, dK, dV, var, tail, arch=arch, batch=batch, seqlen_q=seqlen_q,
                           seqlen_k=seqlen_k)
            return

        dkdv_cfg = configs.select("flash_bwd_dkdv", arch, head_dim, has_right_edge)
        accum = None if deterministic else _new_like(q, (prep_batch, heads_q, total_q, head_dim), zero=True)
        kernel, smem = _kernel(dkdv_cfg, Q.dtype, has_right_edge, vec, device,
                               COMPUTE_DQ=int(not deterministic), **var.defines)
        # Unused by the kernel when deterministic: any valid pointer will do.
        A = _packed(_describe(accum), varlen) if accum is not None else delta
        _launch(kernel, (math.ceil(seqlen_k / dkdv_cfg.block_n), heads_k), dkdv_cfg.warps * 32, smem,
                [*common, (A, 4), (dK, size), (dV, size), *_strides(Q, K, V, dO, dK, dV),
                 *_strides(L, delta, dims=2), *_strides(A, dims=2), *tail], batch)

        if deterministic:
            dq_cfg = configs.select("flash_bwd_dq", arch, head_dim, has_right_edge)
            kernel, smem = _kernel(dq_cfg, Q.dtype, has_right_edge, vec, device, **var.defines)
            _launch(kernel, (math.ceil(seqlen_q / dq_cfg.block_m), heads_q), dq_cfg.warps * 32, smem,
                    [*common, (dQ, size), *_strides(Q, K, V, dO, dQ), *_strides(L, delta, dims=2), *tail],
                    batch)
        else:
            convert = jit.get_function("cuda", "flash_bwd_prep.cu", "flash_bwd_convert_dq", prep_defines, device)
            _launch(convert, prep_grid, _PREP_THREADS, 0,
                    [(A, 4), (dQ, size), *_strides(dQ), np.int32(heads_q), np.int32(total_q),
                     np.int32(head_dim), np.float32(scale)], prep_batch)


def _backward_on_cuda_cores(dtype: str, arch: int, head_dim: int, causal: bool) -> bool:
    """Whether the backward runs on the CUDA-core pair (flash_bwd_simt.cu) rather than the tensor
    cores: float32 always (tf32 would lose its precision), fp16/bf16 at head dims the tensor-core
    table has no row for (their registers cannot hold dK and dV there)."""
    if dtype == "float32":
        return True
    try:
        configs.select("flash_bwd_dkdv", arch, head_dim, causal)
    except ValueError:  # no tensor-core row for this head dim (an older device fails the same way there)
        return True
    return False


def _backward_simt(common, dQ, dK, dV, var: _Variant, tail, *, arch: int, batch: int, seqlen_q: int,
                   seqlen_k: int) -> None:
    """Launch flash_bwd_simt_dq (query blocks) and flash_bwd_simt_dkdv (key blocks) on the current
    device and stream. common: the (q, k, v, dout, lse, delta) pointer arguments."""
    Q, K = common[0][0], common[1][0]
    heads_q, head_dim = Q.shape[1], Q.shape[3]
    heads_k = K.shape[1]
    size = _itemsize(Q.dtype)
    has_right_edge = bool(var.defines["IS_CAUSAL"])
    strides = _strides(*(a for a, _ in common[:4]))
    lse_delta = _strides(common[4][0], common[5][0], dims=2)

    cfg = configs.select("flash_bwd_simt_dq", arch, head_dim, has_right_edge)
    kernel, smem = _kernel(cfg, Q.dtype, has_right_edge, False, Q.device, **var.defines)
    _launch(kernel, (math.ceil(seqlen_q / cfg.block_m), heads_q), cfg.warps * 32, smem,
            [*common, (dQ, size), *strides, *_strides(dQ), *lse_delta, *tail], batch)

    cfg = configs.select("flash_bwd_simt_dkdv", arch, head_dim, has_right_edge)
    kernel, smem = _kernel(cfg, Q.dtype, has_right_edge, False, Q.device, **var.defines)
    _launch(kernel, (math.ceil(seqlen_k / cfg.block_n), heads_k), cfg.warps * 32, smem,
            [*common, (dK, size), (dV, size), *strides, *_strides(dK, dV), *lse_delta, *tail], batch)


def _new_like(x, shape, *, zero: bool):
    """A float32 scratch array in x's framework and device (torch's allocator for torch tensors)."""
    if hasattr(x, "data_ptr"):
        import torch

        make = torch.zeros if zero else torch.empty
        return make(shape, dtype=torch.float32, device=x.device)
    import cupy

    return (cupy.zeros if zero else cupy.empty)(shape, dtype=cupy.float32)


def info() -> dict[str, str]:
    """Lines for `python -m xattn info`."""
    import cupy

    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    nvrtc = cupy.cuda.nvrtc.getVersion()
    return {
        "device": f"{props['name'].decode()} (cuda:{device.id})",
        "compute capability": f"{_arch(device.id) / 10:.1f}",
        "multiprocessors": str(props["multiProcessorCount"]),
        "compiler": f"NVRTC {nvrtc[0]}.{nvrtc[1]} (through CuPy RawModule)",
        "kernel cache": jit.cache_location(),
    }
