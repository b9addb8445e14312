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

import threading
from typing import NamedTuple

import numpy as np

from xattn import params as _params

MAX_GRID_YZ = 65535  # CUDA's and HIP's limit on gridDim.y and gridDim.z


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
        gx, gy = self.grid_xy
        with self._lock:  # one block per Launch: threads sharing a plan take turns patching it
            words = self.words
            for name, ptr in pointers.items():
                words[_params.POINTER_WORDS[name]] = ptr
            for entry in self.maps:  # [field, map, repoint, the pointer it holds]
                ptr = pointers[entry[0]]
                if ptr != entry[3]:
                    entry[2](entry[1], ptr)
                    entry[3] = ptr
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


_driver_module = None


def _driver():
    """CuPy's driver bindings (cuLaunchKernel; hipModuleLaunchKernel on ROCm), imported once."""
    global _driver_module
    if _driver_module is None:
        from cupy.cuda import driver
        _driver_module = driver
    return _driver_module
