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
    if key not in _smem_configured:
        with _smem_lock:
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
    itemsize = 4 if Q.dtype == "float32" else 2
    vec = kernel_name == "flash_fwd" and _vec_loads([Q, K, V, O], head_dim, itemsize)
    defines = configs.defines(cfg, Q.dtype, causal, vec)
    kernel = jit.get_function("cuda", cfg.kernel + ".cu", cfg.kernel, defines, Q.device)
    smem = configs.shared_memory_bytes(cfg)
    _prepare(kernel, (Q.device, id(kernel)), smem)

    scalars = (
        *(np.int64(s) for a in (Q, K, V, O) for s in a.strides[:3]),
        np.int64(L.strides[0]), np.int64(L.strides[1]),
        np.int32(seqlen_q), np.int32(seqlen_k), np.int32(head_dim),
        np.int32(heads_q // heads_k),
        np.float32(scale), np.float32(scale * LOG2_E),
    )
    with cupy.cuda.Device(Q.device), _external_stream(stream, Q.device):
        for b0 in range(0, batch, MAX_GRID_YZ):  # gridDim.z is bounded; walk the batch in chunks
            nb = min(MAX_GRID_YZ, batch - b0)
            pointers = tuple(
                np.uint64(a.ptr + b0 * a.strides[0] * size)
                for a, size in ((Q, itemsize), (K, itemsize), (V, itemsize), (O, itemsize), (L, 4))
            )
            kernel(configs.grid(cfg, seqlen_q, heads_q, nb), (cfg.warps * 32,),
                   pointers + scalars, shared_mem=smem)


def info() -> dict[str, str]:
    """Lines for `python -m xattn info`."""
    import cupy
    from cupy.cuda import compiler

    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    nvrtc = cupy.cuda.nvrtc.getVersion()
    return {
        "device": f"{props['name'].decode()} (cuda:{device.id})",
        "compute capability": f"{_arch(device.id) / 10:.1f}",
        "multiprocessors": str(props["multiProcessorCount"]),
        "compiler": f"NVRTC {nvrtc[0]}.{nvrtc[1]} (through CuPy RawModule)",
        "kernel cache": compiler.get_cache_dir(),
    }
