"""The launch layer, vendor-neutral: how a planned kernel call reaches the GPU.

A kernel takes one parameter block by value (kernels_common/params.h). A `Launch` holds what does
not change between calls of one signature: the compiled function, grid, block, dynamic shared
memory and the parameter block with every stride and scalar filled in. A call patches the pointers
into the block and launches through the driver (`cuLaunchKernel`, or `hipModuleLaunchKernel` on a
ROCm build of CuPy: `cupy.cuda.driver.launchKernel` is either), on the caller's stream. No CuPy
array or kernel-call machinery runs per call.

Arrays are described by `Array` (pointer, shape, strides in elements, dtype, device), read once
from a torch tensor or a CuPy array.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from xattn import params as _params

MAX_GRID_YZ = 65535  # CUDA's and HIP's limit on gridDim.y and gridDim.z
LOG2_E = math.log2(math.e)


class Array(NamedTuple):
    ptr: int
    shape: tuple
    strides: tuple  # in elements
    dtype: str
    device: int


def describe(x) -> Array:
    """The pointer, shape, strides, dtype and device of a torch tensor or a CuPy array."""
    if hasattr(x, "data_ptr"):  # torch.Tensor
        return Array(x.data_ptr(), tuple(x.shape), tuple(x.stride()),
                     str(x.dtype).removeprefix("torch."), x.device.index)
    size = x.dtype.itemsize
    return Array(x.data.ptr, x.shape, tuple(s // size for s in x.strides), x.dtype.name, x.device.id)


_smem_configured: set = set()
_smem_lock = threading.Lock()


def function(kernel, device: int, smem: int) -> int:
    """The driver handle of a compiled kernel (a cupy.RawKernel) on `device`, with its dynamic
    shared memory opted in once: blocks above 48 KB must ask for it."""
    import cupy

    with cupy.cuda.Device(device):
        handle = kernel.kernel.ptr
        key = (device, handle)
        if key not in _smem_configured and smem > 48 * 1024:
            with _smem_lock:
                kernel.max_dynamic_shared_size_bytes = smem
                _smem_configured.add(key)
    return handle


def vec_loads(arrays: list[Array], head_dim: int, itemsize: int) -> bool:
    """True when every row starts on a 16-byte boundary, so tiles can move in 16-byte copies."""
    per_vector = 16 // itemsize
    if head_dim % per_vector:
        return False
    return all(a.ptr % 16 == 0 and all(s % per_vector == 0 for s in a.strides[:3]) for a in arrays)


def prepare_smem(kernel, key, smem_bytes: int) -> None:
    # Blocks that need more than 48 KB of shared memory must opt in, once per compiled kernel.
    # CuPy applies the attribute to the kernel of the *current* device: make it the kernel's own.
    if key not in _smem_configured:
        import cupy

        with _smem_lock, cupy.cuda.Device(key[0]):
            kernel.max_dynamic_shared_size_bytes = smem_bytes
            _smem_configured.add(key)


_streams: dict[tuple[int, int], object] = {}


def external_stream(ptr: int, device_id: int):
    """A CuPy handle on the caller's stream (torch's, or any cudaStream_t), made once per stream."""
    handle = _streams.get((ptr, device_id))
    if handle is None:
        import warnings

        import cupy

        with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream for a protocol
            warnings.simplefilter("ignore", DeprecationWarning)  # raw pointers cannot speak
            handle = _streams[(ptr, device_id)] = cupy.cuda.ExternalStream(ptr, device_id)
    return handle


def launch_args(kernel, grid_xy, threads: int, smem: int, args, batch: int) -> None:
    """Launch over the batch in chunks (gridDim.z <= 65535). args: the kernel's arguments in
    order; (Array, itemsize) pairs are pointers, moved by the chunk's batch offset."""
    for b0 in range(0, batch, MAX_GRID_YZ):
        nb = min(MAX_GRID_YZ, batch - b0)
        values = tuple(np.uint64(a[0].ptr + b0 * a[0].strides[0] * a[1]) if type(a) is tuple else a
                       for a in args)
        kernel(grid_xy + (nb,), (threads,), values, shared_mem=smem)


# A null pointer argument (no cu_seqlens, no ALiBi slopes): stride 0, so no chunk moves it.
NULL = (Array(0, (), (0,), "", -1), 4)


class Variant(NamedTuple):
    """Masks and score modifiers of one call, as every kernel takes them (attention_common.h)."""
    defines: dict  # IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN
    options: dict  # the AttnParams scalars (params.h): seqlen_q, seqlen_k, heads_per_kv,
                   # window_left, window_right, softcap_scale, scale, scale_log2 (the score scale:
                   # the softcap c under a softcap), grad_scale (the attention scale),
                   # alibi_batch_stride
    args: list     # the same as the HIP kernels take them, positionally: cu_seqlens_q, cu_seqlens_k,
                   # alibi_slopes, alibi_batch_stride, seqlen_q, seqlen_k, head_dim, heads_per_kv,
                   # window_left, window_right, softcap_scale, scale, scale_log2


def variant(*, causal: bool, scale: float, window, softcap: float, alibi_slopes, cu_seqlens,
             seqlen_q: int, seqlen_k: int, head_dim: int, heads_per_kv: int) -> Variant:
    """alibi_slopes: an array or its Array; cu_seqlens: a pair of arrays, (None, None) when only
    the flags and scalars are wanted (a plan patches the pointers later), or None (not packed)."""
    left, right = window
    if causal:
        right = 0
    score_scale = softcap if softcap else scale
    if cu_seqlens is not None and cu_seqlens[0] is not None:
        cu = [(describe(c), 4) for c in cu_seqlens]
    else:
        cu = [NULL, NULL]
    alibi_batch_stride = 0
    if alibi_slopes is not None:
        slopes = alibi_slopes if isinstance(alibi_slopes, Array) else describe(alibi_slopes)
        alibi_batch_stride = slopes.strides[0] if len(slopes.shape) == 2 else 0  # (Hq,) or (B, Hq)
        alibi = [(Array(slopes.ptr, slopes.shape, (alibi_batch_stride,), "float32", slopes.device), 4),
                 np.int64(alibi_batch_stride)]
    else:
        alibi = [NULL, np.int64(0)]
    defines = {"IS_CAUSAL": int(right >= 0), "IS_LOCAL": int(left >= 0), "HAS_SOFTCAP": int(bool(softcap)),
               "HAS_ALIBI": int(alibi_slopes is not None), "IS_VARLEN": int(cu_seqlens is not None)}
    options = dict(seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_per_kv=heads_per_kv, window_left=left,
                   window_right=right, softcap_scale=scale / softcap if softcap else 0.0,
                   scale=score_scale, scale_log2=score_scale * LOG2_E, grad_scale=scale,
                   alibi_batch_stride=alibi_batch_stride)
    args = cu + alibi + [np.int32(seqlen_q), np.int32(seqlen_k), np.int32(head_dim), np.int32(heads_per_kv),
                         np.int32(left), np.int32(right), np.float32(options["softcap_scale"]),
                         np.float32(score_scale), np.float32(options["scale_log2"])]
    return Variant(defines, options, args)


def packed(a: Array, varlen: bool) -> Array:
    """A packed (varlen) tensor is one (1, H, T, D) batch entry that every sequence indexes from
    its own first row: batch stride 0."""
    return a._replace(strides=(0,) + a.strides[1:]) if varlen else a


def stride_args(*arrays: Array, dims: int = 3):
    return tuple(np.int64(s) for a in arrays for s in a.strides[:dims])


def itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def new_like(x, shape, *, zero: bool):
    """A float32 scratch array in x's framework and device (torch's allocator for torch tensors)."""
    if hasattr(x, "data_ptr"):
        import torch

        make = torch.zeros if zero else torch.empty
        return make(shape, dtype=torch.float32, device=x.device)
    import cupy

    return (cupy.zeros if zero else cupy.empty)(shape, dtype=cupy.float32)


def torch_stream(device_index: int) -> int:
    """torch's current stream on the device, as a cudaStream_t. torch's raw-stream query (what its
    own generated code calls) skips building a Stream object: a few microseconds a call."""
    import torch
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


class Launch:
    """One kernel launch of a plan: function, grid (x, y, batch), threads, shared memory, and its
    own parameter block. `batch` goes in gridDim.z in chunks of MAX_GRID_YZ, each chunk's first
    entry in the block's batch_offset."""

    __slots__ = ("handle", "grid_xy", "batch", "threads", "smem", "block", "words", "args",
                 "args_ptr", "maps", "_lock")

    def __init__(self, handle: int, grid_xy: tuple, batch: int, threads: int, smem: int,
                 block: np.ndarray, maps=()):
        """maps: (field, tensor map, repoint) triples of a Hopper kernel's by-value tensor-map
        arguments, which come before the block; each is re-pointed at its field's pointer when
        that pointer changes (xattn/tma.py)."""
        self.handle, self.grid_xy, self.batch = handle, grid_xy, batch
        self.threads, self.smem = threads, smem
        self.block = block
        self.words = block.view(np.uint64)  # pointer fields are patched through this view
        self.maps = [[field, tmap, repoint, None] for field, tmap, repoint in maps]
        # cuLaunchKernel's kernelParams: an array holding the address of each argument.
        self.args = np.array([tmap.getPtr() for _, tmap, _ in maps] + [block.ctypes.data],
                             dtype=np.uint64)
        self.args_ptr = self.args.ctypes.data
        self._lock = threading.Lock()

    def __call__(self, pointers: dict, stream: int) -> None:
        """Patch {field: device pointer} into the block and launch on `stream` (a cudaStream_t)."""
        with self._lock:  # one block per Launch: threads sharing a plan take turns patching it
            patch(self.words, pointers)
            self.launch(pointers, stream)

    def launch(self, pointers: dict, stream: int) -> None:
        """Launch with the block as it is (patched by the caller, who holds the lock)."""
        for entry in self.maps:  # [field, map, repoint, the pointer it holds]
            ptr = pointers[entry[0]]
            if ptr != entry[3]:
                entry[2](entry[1], ptr)
                entry[3] = ptr
        gx, gy = self.grid_xy
        launch_kernel = _driver().launchKernel
        if self.batch <= MAX_GRID_YZ:
            launch_kernel(self.handle, gx, gy, self.batch, self.threads, 1, 1, self.smem, stream,
                          self.args_ptr, 0)
            return
        for b0 in range(0, self.batch, MAX_GRID_YZ):  # the parameters are copied at launch
            self.block["batch_offset"] = b0
            launch_kernel(self.handle, gx, gy, min(MAX_GRID_YZ, self.batch - b0), self.threads,
                          1, 1, self.smem, stream, self.args_ptr, 0)
        self.block["batch_offset"] = 0


def patch(words: np.ndarray, pointers: dict) -> None:
    """Write {field: device pointer} into a parameter block (its uint64 view)."""
    for name, ptr in pointers.items():
        words[_params.POINTER_WORDS[name]] = ptr


class Sequence:
    """A plan's launches in order, run as one: under one lock (launches may share a block, as the
    backward's row-wise kernels do), each distinct block patched once per call."""

    __slots__ = ("launches", "blocks", "_lock")

    def __init__(self, launches):
        self.launches = tuple(launches)
        distinct = {}
        for step in self.launches:
            distinct.setdefault(step.block.ctypes.data, step.words)
        self.blocks = tuple(distinct.values())
        self._lock = threading.Lock()

    def __call__(self, pointers: dict, stream: int) -> None:
        with self._lock:
            for words in self.blocks:
                patch(words, pointers)
            for step in self.launches:
                step.launch(pointers, stream)


_driver_module = None


def _driver():
    """CuPy's driver bindings (cuLaunchKernel; hipModuleLaunchKernel on ROCm), imported once."""
    global _driver_module
    if _driver_module is None:
        from cupy.cuda import driver
        _driver_module = driver
    return _driver_module
