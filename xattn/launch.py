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


_multiprocessors: dict[int, int] = {}


def multiprocessors(device: int) -> int:
    """The device's SMs (CUDA) or CUs (ROCm), read once: split counts and persistent grids."""
    count = _multiprocessors.get(device)
    if count is None:
        import cupy

        count = _multiprocessors[device] = int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])
    return count


_smem_configured: set = set()
_smem_lock = threading.Lock()


def function(kernel, device: int, smem: int) -> int:
    """The driver handle of a compiled kernel (a cupy.RawKernel) on `device`, with its dynamic
    shared memory opted in once: CUDA blocks above 48 KB must ask for it. ROCm has no such step
    (a block may take up to the LDS the kernel declares, 64 KB), so nothing is asked there."""
    import cupy

    with cupy.cuda.Device(device):
        handle = kernel.kernel.ptr
        key = (device, handle)
        if key not in _smem_configured and smem > 48 * 1024 and not cupy.cuda.runtime.is_hip:
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


class Variant(NamedTuple):
    """Masks and score modifiers of one call, as every kernel takes them (attention_common.h)."""
    defines: dict  # IS_CAUSAL, IS_LOCAL, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN (and IS_PAGED if paged)
    options: dict  # the AttnParams scalars (params.h): seqlen_q, seqlen_k, heads_per_kv,
                   # window_left, window_right, softcap_scale, scale, scale_log2 (the score scale:
                   # the softcap c under a softcap), grad_scale (the attention scale),
                   # alibi_batch_stride; paged: page_size, num_pages, max_pages, block_table_stride


class Paged(NamedTuple):
    """Paged keys and values of a packed batch (attention_varlen's block_table): the page size,
    the number of pages in the caches, the table's width and its row stride (elements)."""
    page_size: int
    num_pages: int
    max_pages: int
    table_stride: int


def variant(*, causal: bool, scale: float, window, softcap: float, alibi_slopes, varlen: bool,
            seqlen_q: int, seqlen_k: int, heads_per_kv: int, paged: Paged | None = None) -> Variant:
    """alibi_slopes: an array, its Array, or None; varlen: packed batches (the cu_seqlens pointers
    are patched per call, like every pointer); paged: their keys and values in pages (IS_PAGED
    only then, so that the other variants compile exactly as without it)."""
    left, right = window
    if causal:
        right = 0
    score_scale = softcap if softcap else scale
    alibi_batch_stride = 0
    if alibi_slopes is not None:
        slopes = alibi_slopes if isinstance(alibi_slopes, Array) else describe(alibi_slopes)
        alibi_batch_stride = slopes.strides[0] if len(slopes.shape) == 2 else 0  # (Hq,) or (B, Hq)
    defines = {"IS_CAUSAL": int(right >= 0), "IS_LOCAL": int(left >= 0), "HAS_SOFTCAP": int(bool(softcap)),
               "HAS_ALIBI": int(alibi_slopes is not None), "IS_VARLEN": int(varlen)}
    options = dict(seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_per_kv=heads_per_kv, window_left=left,
                   window_right=right, softcap_scale=scale / softcap if softcap else 0.0,
                   scale=score_scale, scale_log2=score_scale * LOG2_E, grad_scale=scale,
                   alibi_batch_stride=alibi_batch_stride)
    if paged is not None:
        defines["IS_PAGED"] = 1
        options.update(page_size=paged.page_size, num_pages=paged.num_pages,
                       max_pages=paged.max_pages, block_table_stride=paged.table_stride)
    return Variant(defines, options)


def decode_scales(scale: float, softcap: float) -> dict:
    """The DecodeParams scalars of the softmax's scale (params.h): scale * log2(e), and under a
    softcap c, c * log2(e) (the scores' scale there) and scale / c."""
    return {"scale_log2": scale * LOG2_E, "softcap_log2": softcap * LOG2_E,
            "scale_over_softcap": scale / softcap if softcap else 0.0}


def attn_block(var: Variant, tensors: dict, *, heads_q: int, head_dim: int) -> np.ndarray:
    """An AttnParams block (kernels_common/params.h) of one plan: the tensors' strides ({field:
    Array}; every pointer stays null until a call patches it in) and the masks and modifiers of
    `var`. Every kernel of either vendor that takes AttnParams gets its block from here."""
    block = _params.attn_params()
    for name, a in tensors.items():
        _params.set_tensor(block, name, 0, a.strides[:3])
    o = var.options
    block["heads_q"], block["head_dim"] = heads_q, head_dim
    for field in ("seqlen_q", "seqlen_k", "heads_per_kv", "window_left", "window_right",
                  "softcap_scale", "scale", "scale_log2", "grad_scale", "alibi_batch_stride"):
        block[field] = o[field]
    for field in ("page_size", "num_pages", "max_pages", "block_table_stride"):
        if field in o:
            block[field] = o[field]
    return block


def paged_of(k: Array, block_table) -> Paged | None:
    """The Paged description of a call from its key pages' (P, Hk, page_size, D) view and the
    block table (None: contiguous keys)."""
    if block_table is None:
        return None
    table = describe(block_table)
    return Paged(k.shape[2], k.shape[0], table.shape[1], table.strides[0])


def paged_pointers(pointers: dict, cu_seqlens, block_table, seqused_k) -> dict:
    """The pointers of a packed batch's lengths and pages, added: every one is patched on every
    call (0 where absent), so that a plan never keeps an earlier call's pointer."""
    if cu_seqlens is not None:
        cu_q, cu_k = cu_seqlens
        pointers["cu_seqlens_q"] = describe(cu_q).ptr
        pointers["cu_seqlens_k"] = describe(cu_k).ptr if cu_k is not None else 0
    if block_table is not None:
        pointers["block_table"] = describe(block_table).ptr
        pointers["seqused_k"] = describe(seqused_k).ptr if seqused_k is not None else 0
    return pointers


def packed(a: Array, varlen: bool) -> Array:
    """A packed (varlen) tensor is one (1, H, T, D) batch entry that every sequence indexes from
    its own first row: batch stride 0. (Paged keys and values are not packed: their batch stride
    is the page stride.)"""
    return a._replace(strides=(0,) + a.strides[1:]) if varlen else a


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


# ---- plans: what a call of one signature launches ---------------------------------------------
# A backend builds a plan on the first call of a signature (shapes, strides, dtype, device, options,
# pointer alignment) and keeps it here under a key of its own (the hip backend's start with
# "hip"); later calls look it up, patch the pointers into its parameter blocks and launch.

_plans: dict = {}
_plans_lock = threading.Lock()
_MAX_PLANS = 4096  # a process that cycles through more signatures rebuilds them


def cached_plan(key, build):
    """The plan of `key`, built by build() on its first call."""
    plan = _plans.get(key)
    if plan is None:
        plan = build()
        with _plans_lock:
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
            _plans[key] = plan
    return plan


def run(steps, pointers: dict, stream: int, device: int) -> None:
    """Launch a plan's steps (Launch objects) in order on `stream`, on `device` (made current when
    it is not)."""
    import cupy

    if cupy.cuda.runtime.getDevice() == device:
        for step in steps:
            step(pointers, stream)
        return
    with cupy.cuda.Device(device):
        for step in steps:
            step(pointers, stream)


class Launch:
    """One kernel launch of a plan: function, grid (x, y, batch), threads, shared memory, and its
    own parameter block. `batch` goes in gridDim.z in chunks of MAX_GRID_YZ, each chunk's first
    entry in the block's batch_offset."""

    __slots__ = ("handle", "grid_xy", "batch", "threads", "smem", "block", "words", "slots", "args",
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
        self.slots = _params.pointer_words(block.dtype)  # {pointer field: its word}
        self.maps = [[field, tmap, repoint, None] for field, tmap, repoint in maps]
        # cuLaunchKernel's kernelParams: an array holding the address of each argument.
        self.args = np.array([tmap.getPtr() for _, tmap, _ in maps] + [block.ctypes.data],
                             dtype=np.uint64)
        self.args_ptr = self.args.ctypes.data
        self._lock = threading.Lock()

    def __call__(self, pointers: dict, stream: int) -> None:
        """Patch {field: device pointer} into the block and launch on `stream` (a cudaStream_t)."""
        with self._lock:  # one block per Launch: threads sharing a plan take turns patching it
            patch(self.words, self.slots, pointers)
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


def patch(words: np.ndarray, slots: dict, pointers: dict) -> None:
    """Write {field: device pointer} into a parameter block (its uint64 view; slots: each pointer
    field's word, params.pointer_words)."""
    for name, ptr in pointers.items():
        words[slots[name]] = ptr


class Sequence:
    """A plan's launches in order, run as one: under one lock (launches may share a block, as the
    backward's and the decode's kernels do), each distinct block patched once per call, with the
    pointers and any scalar fields that change per call (the decode's uniform length)."""

    __slots__ = ("launches", "blocks", "_lock")

    def __init__(self, launches):
        self.launches = tuple(launches)
        distinct = {}
        for step in self.launches:
            distinct.setdefault(step.block.ctypes.data, (step.block, step.words, step.slots))
        self.blocks = tuple(distinct.values())
        self._lock = threading.Lock()

    def __call__(self, pointers: dict, stream: int, scalars: dict | None = None) -> None:
        with self._lock:
            for block, words, slots in self.blocks:
                for name, value in (scalars or {}).items():
                    block[name] = value
                patch(words, slots, pointers)
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
