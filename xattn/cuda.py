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


def _launch(kernel, grid_xy, threads: int, smem: int, arrays, scalars, batch: int) -> None:
    """Launch over the batch in chunks (gridDim.z <= 65535), moving every array's pointer by the
    chunk's batch offset. arrays: (_Array, itemsize) pairs, in the kernel's argument order."""
    for b0 in range(0, batch, MAX_GRID_YZ):
        nb = min(MAX_GRID_YZ, batch - b0)
        pointers = tuple(np.uint64(a.ptr + b0 * a.strides[0] * size) for a, size in arrays)
        kernel(grid_xy + (nb,), (threads,), pointers + scalars, shared_mem=smem)


def _strides(*arrays: _Array, dims: int = 3):
    return tuple(np.int64(s) for a in arrays for s in a.strides[:dims])


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int) -> None:
    """Write out = softmax(scale * q k^T) v and lse for (B, H, S, D) views (see module docstring)."""
    import cupy

    Q, K, V, O, L = (_describe(a) for a in (q, k, v, out, lse))
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    if batch == 0 or heads_q == 0 or seqlen_q == 0:
        return
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} heads are supported, got {heads_q}")

    kernel_name = configs.KERNEL_FOR_DTYPE[Q.dtype]
    cfg = configs.select(kernel_name, _arch(Q.device), head_dim, causal)
    size = _itemsize(Q.dtype)
    vec = kernel_name in configs.TENSOR_CORE_KERNELS and _vec_loads([Q, K, V, O], head_dim, size)
    kernel, smem = _kernel(cfg, Q.dtype, causal, vec, Q.device)
    scalars = _strides(Q, K, V, O) + _strides(L, dims=2) + (
        np.int32(seqlen_q), np.int32(seqlen_k), np.int32(head_dim), np.int32(heads_q // heads_k),
        np.float32(scale), np.float32(scale * LOG2_E))
    with cupy.cuda.Device(Q.device), _external_stream(stream, Q.device):
        _launch(kernel, (math.ceil(seqlen_q / cfg.block_m), heads_q), cfg.warps * 32, smem,
                [(Q, size), (K, size), (V, size), (O, size), (L, 4)], scalars, batch)


# Rows per thread block of flash_bwd_prep.cu's kernels (ROWS_PER_BLOCK there).
_PREP_ROWS, _PREP_THREADS = 32, 128


def backward(q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool, scale: float,
             deterministic: bool, stream: int) -> None:
    """Write dq, dk, dv for (B, H, S, D) views; lse is the forward's. dk and dv are summed over the
    query heads of each GQA group. deterministic: dQ from its own kernel instead of atomics (the
    CUDA-core path, float32 and head dims past the tensor-core rows, uses no atomics either way)."""
    import cupy

    Q, K, V, O, dO, L, dQ, dK, dV = (_describe(a) for a in (q, k, v, out, dout, lse, dq, dk, dv))
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    if batch == 0 or heads_q == 0:
        return
    if seqlen_q == 0 or seqlen_k == 0:  # nothing attends: every gradient is zero
        for grad in (dq, dk, dv):
            grad.zero_() if hasattr(grad, "zero_") else grad.fill(0)
        return
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} heads are supported, got {heads_q}")

    arch, device, size = _arch(Q.device), Q.device, _itemsize(Q.dtype)
    simt = _backward_on_cuda_cores(Q.dtype, arch, head_dim, causal)
    vec = not simt and _vec_loads([Q, K, V, O, dO, dQ, dK, dV], head_dim, size)
    heads_per_kv = np.int32(heads_q // heads_k)
    sizes = (np.int32(seqlen_q), np.int32(seqlen_k), np.int32(head_dim))
    scales = (np.float32(scale), np.float32(scale * LOG2_E))
    prep_defines = {"ELEM_F32": int(Q.dtype == "float32"), "ELEM_BF16": int(Q.dtype == "bfloat16")}
    prep = jit.get_function("cuda", "flash_bwd_prep.cu", "flash_bwd_preprocess", prep_defines, device)
    prep_grid = (math.ceil(seqlen_q / _PREP_ROWS), heads_q)

    with cupy.cuda.Device(device), _external_stream(stream, device):
        # Scratch from the caller's framework, on its stream: delta, and dQ's float32 accumulator.
        # Held until the end: the caching allocators may reuse memory freed earlier.
        delta_array = _new_like(q, (batch, heads_q, seqlen_q), zero=False)
        delta = _describe(delta_array)

        _launch(prep, prep_grid, _PREP_THREADS, 0, [(O, size), (dO, size), (delta, 4)],
                _strides(O, dO) + _strides(delta, dims=2) + (np.int32(seqlen_q), np.int32(head_dim)),
                batch)

        if simt:  # deterministic by construction: no atomics anywhere
            _backward_simt(Q, K, V, dO, L, delta, dQ, dK, dV, causal=causal, arch=arch,
                           scalars=sizes + (heads_per_kv,) + scales)
            return

        dkdv_cfg = configs.select("flash_bwd_dkdv", arch, head_dim, causal)
        accum = None if deterministic else _new_like(q, (batch, heads_q, seqlen_q, head_dim), zero=True)
        kernel, smem = _kernel(dkdv_cfg, Q.dtype, causal, vec, device, COMPUTE_DQ=int(not deterministic))
        A = _describe(accum) if accum is not None else delta  # unused by the kernel when deterministic
        _launch(kernel, (math.ceil(seqlen_k / dkdv_cfg.block_n), heads_k), dkdv_cfg.warps * 32, smem,
                [(Q, size), (K, size), (V, size), (dO, size), (L, 4), (delta, 4), (A, 4), (dK, size), (dV, size)],
                _strides(Q, K, V, dO, dK, dV) + _strides(L, delta, dims=2) + sizes
                + (np.int32(heads_q), heads_per_kv) + scales, batch)

        if deterministic:
            dq_cfg = configs.select("flash_bwd_dq", arch, head_dim, causal)
            kernel, smem = _kernel(dq_cfg, Q.dtype, causal, vec, device)
            _launch(kernel, (math.ceil(seqlen_q / dq_cfg.block_m), heads_q), dq_cfg.warps * 32, smem,
                    [(Q, size), (K, size), (V, size), (dO, size), (L, 4), (delta, 4), (dQ, size)],
                    _strides(Q, K, V, dO, dQ) + _strides(L, delta, dims=2) + sizes + (heads_per_kv,) + scales,
                    batch)
        else:
            convert = jit.get_function("cuda", "flash_bwd_prep.cu", "flash_bwd_convert_dq", prep_defines, device)
            _launch(convert, prep_grid, _PREP_THREADS, 0, [(A, 4), (dQ, size)],
                    _strides(dQ) + (np.int32(heads_q), np.int32(seqlen_q), np.int32(head_dim),
                                    np.float32(scale)), batch)


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


def _backward_simt(Q, K, V, dO, L, delta, dQ, dK, dV, *, causal: bool, arch: int, scalars) -> None:
    """Launch flash_bwd_simt_dq (query blocks) and flash_bwd_simt_dkdv (key blocks) on the current
    device and stream. scalars: seqlen_q, seqlen_k, head_dim, heads_per_kv, scale, scale_log2."""
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    size = _itemsize(Q.dtype)
    common = [(Q, size), (K, size), (V, size), (dO, size), (L, 4), (delta, 4)]

    cfg = configs.select("flash_bwd_simt_dq", arch, head_dim, causal)
    kernel, smem = _kernel(cfg, Q.dtype, causal, False, Q.device)
    _launch(kernel, (math.ceil(seqlen_q / cfg.block_m), heads_q), cfg.warps * 32, smem,
            common + [(dQ, size)], _strides(Q, K, V, dO, dQ) + _strides(L, delta, dims=2) + scalars, batch)

    cfg = configs.select("flash_bwd_simt_dkdv", arch, head_dim, causal)
    kernel, smem = _kernel(cfg, Q.dtype, causal, False, Q.device)
    _launch(kernel, (math.ceil(seqlen_k / cfg.block_n), heads_k), cfg.warps * 32, smem,
            common + [(dK, size), (dV, size)], _strides(Q, K, V, dO, dK, dV) + _strides(L, delta, dims=2) + scalars,
            batch)


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
