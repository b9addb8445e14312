"""Array-library adaptation: what an input array is, and moving data in and out of backends.

Nothing here imports torch, CuPy or JAX at module level: an array of a library can only
exist once that library is imported, so `sys.modules` tells whether to check for it.
Layouts: kernels and the reference see "bhsd" (B, H, S, D); a "bshd" array (B, S, H, D)
reaches them as a transposed view, never a copy.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

# DLPack device types (dlpack.h, DLDeviceType) mapped to where the memory lives for us.
_DLPACK_DEVICES = {1: "cpu", 2: "cuda", 3: "cpu", 10: "rocm", 11: "cpu", 13: "cuda"}
_BHSD_FROM_BSHD = (0, 2, 1, 3)  # swapping axes 1 and 2 is its own inverse


class ArrayInfo(NamedTuple):
    library: str    # "numpy", "torch", "cupy" or "dlpack" (any other DLPack producer)
    device: str     # "cpu", "cuda" or "rocm"
    device_id: int
    dtype: str      # numpy-style name: "float16", "bfloat16", "float32", ...
    shape: tuple


def device_label(info: ArrayInfo) -> str:
    return "cpu" if info.device == "cpu" else f"{info.device}:{info.device_id}"


def library_label(info: ArrayInfo) -> str:
    return {"numpy": "a NumPy array", "torch": "a torch tensor", "cupy": "a CuPy array",
            "dlpack": "a DLPack array"}[info.library]


def describe(x, name: str) -> ArrayInfo:
    """Classify x, or raise TypeError/ValueError naming the argument."""
    if isinstance(x, np.ma.MaskedArray):  # the mask would be silently ignored
        raise TypeError(f"{name}: expected an array without a mask, got a numpy.ma.MaskedArray; "
                        f"pass .filled(...) or .data")
    if isinstance(x, np.ndarray):
        return ArrayInfo("numpy", "cpu", 0, _dtype_name(x.dtype), x.shape)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        device = x.device
        kind = device.type
        if kind == "cuda":
            kind = "rocm" if torch.version.hip else "cuda"
        elif kind != "cpu":
            raise ValueError(f"{name}: expected a tensor on the CPU or a CUDA/ROCm GPU, "
                             f"got a tensor on {device}")
        if x.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")
        return ArrayInfo("torch", kind, device.index or 0, _torch_dtype_name(x.dtype),
                         tuple(x.shape))
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        kind = "rocm" if cupy.cuda.runtime.is_hip else "cuda"
        return ArrayInfo("cupy", kind, x.device.id, _dtype_name(x.dtype), x.shape)
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        device_type, device_id = x.__dlpack_device__()
        kind = _DLPACK_DEVICES.get(int(device_type))
        if kind is None:
            raise ValueError(f"{name}: expected an array in host, CUDA or ROCm memory, "
                             f"got DLPack device type {int(device_type)}")
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            # A bare producer (only __dlpack__ and __dlpack_device__): its shape and dtype are
            # read through NumPy's or CuPy's import of it, which shares its memory.
            x = _import_dlpack(x, kind, name)
        return ArrayInfo("dlpack", kind, int(device_id), _dtype_name(x.dtype), tuple(x.shape))
    raise TypeError(f"{name}: expected an array (NumPy, torch, CuPy or any DLPack producer), "
                    f"got {type(x).__module__}.{type(x).__qualname__}")


# dtype -> "float16" etc. NumPy's dtype.name is computed in Python on every access, and this
# sits on every call's path, so names are looked up once per dtype.
_DTYPE_NAMES: dict = {}
# torch dtypes get a table of their own: torch.compile traces describe(), and Dynamo can hash a
# torch.dtype key but not the NumPy dtype keys the other table collects.
_TORCH_DTYPE_NAMES: dict = {}


def _torch_dtype_name(dtype) -> str:
    name = _TORCH_DTYPE_NAMES.get(dtype)
    if name is None:
        name = _TORCH_DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _dtype_name(dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = getattr(dtype, "name", None) or str(dtype)
        name = _DTYPE_NAMES[dtype] = name.removeprefix("torch.")
    return name


def _import_dlpack(x, kind: str, name: str):
    """x imported zero-copy by NumPy (host memory) or CuPy (GPU memory)."""
    try:
        if kind == "cpu":
            return np.from_dlpack(x)
        import cupy
        return cupy.from_dlpack(x)
    except Exception as error:  # ImportError (no CuPy), BufferError, TypeError (dtype)
        raise TypeError(f"{name}: this DLPack producer could not be imported "
                        f"({type(error).__name__}: {error})") from error


def _producer_from_dlpack(x):
    """The from_dlpack of x's own library (jax.numpy for JAX arrays), or None."""
    if _is_jax(x):
        import jax.numpy
        return jax.numpy.from_dlpack
    return getattr(sys.modules.get(type(x).__module__.split(".")[0]), "from_dlpack", None)


# ---------------------------------------------------------------- host (reference backend)

def to_host_numpy(x, info: ArrayInfo) -> np.ndarray:
    """A NumPy view of a host array (a copy only where NumPy lacks the dtype: bfloat16)."""
    if info.library == "numpy":
        return x
    if info.library == "torch":
        x = x.detach().resolve_neg()  # a negative-bit view's memory holds -x
        return x.float().numpy() if info.dtype == "bfloat16" else x.numpy()
    if info.library == "dlpack":
        try:
            return np.from_dlpack(x)
        except (TypeError, BufferError, RuntimeError):
            return np.asarray(x)  # e.g. JAX bfloat16, which NumPy reads through ml_dtypes
    raise AssertionError(f"not a host array: {info}")


def to_host_ints(x, info: ArrayInfo) -> np.ndarray:
    """A NumPy copy of a small integer array from any supported library (GPU arrays are read
    back: a synchronization)."""
    if info.library == "torch":
        return x.detach().cpu().numpy()
    if info.device == "cpu":
        return np.asarray(to_host_numpy(x, info))
    import cupy
    return cupy.asnumpy(cupy.from_dlpack(x) if info.library == "dlpack" else x)


def index_array(x, info: ArrayInfo, host: np.ndarray):
    """An integer array as the backends take it: torch tensors and CuPy arrays contiguous in their
    own library (the torch op takes tensors), other host arrays as the NumPy copy `host`, other
    GPU arrays through CuPy."""
    if info.library == "torch":
        return x.detach().contiguous()
    if info.library == "cupy":
        import cupy
        return cupy.ascontiguousarray(x)
    if info.device == "cpu":
        return host
    import cupy
    return cupy.ascontiguousarray(cupy.from_dlpack(x))


def slopes_array(x, info: ArrayInfo):
    """A small float array (ALiBi slopes), contiguous, in its own library and device: float64 on
    the host (the reference computes in float64 for float64 data), float32 on a GPU (the kernels'
    type). Host DLPack arrays become NumPy, GPU ones CuPy."""
    if info.library == "torch":
        import torch
        dtype = torch.float64 if info.device == "cpu" else torch.float32
        return x.detach().to(dtype).contiguous()
    if info.device == "cpu":
        return np.ascontiguousarray(to_host_numpy(x, info), dtype=np.float64)
    import cupy
    if info.library == "dlpack":
        x = cupy.from_dlpack(x)
    return cupy.ascontiguousarray(x, dtype=cupy.float32)


def run_on_host(forward, q, k, v, info: ArrayInfo, *, layout: str, dims, **options):
    """Run the reference forward on host arrays; return (out, lse) in q's library.

    dims = (B, Hq, Sq, Sk, D). out is allocated contiguous in q's layout. options: the forward's
    keyword arguments (causal, scale, window, ...).
    """
    batch, q_heads, sq, _, _ = dims
    hq, hk, hv = (to_host_numpy(a, info) for a in (q, k, v))
    # A torch bfloat16 input arrives here as float32 (NumPy has no bfloat16), and its
    # output is computed in float32 and converted back below.
    out = np.empty(hq.shape, dtype=hq.dtype)
    lse = np.empty((batch, q_heads, sq), dtype=np.float32)
    if layout == "bshd":
        hq, hk, hv = (a.transpose(_BHSD_FROM_BSHD) for a in (hq, hk, hv))
        forward(hq, hk, hv, out=out.transpose(_BHSD_FROM_BSHD), lse=lse, **options)
    else:
        forward(hq, hk, hv, out=out, lse=lse, **options)

    if info.library == "torch":
        import torch
        out_t = torch.from_numpy(out)
        if info.dtype == "bfloat16":
            out_t = out_t.to(torch.bfloat16)
        return out_t, torch.from_numpy(lse)
    if info.library == "dlpack":
        back = _producer_from_dlpack(q)
        if back is not None and info.dtype == "bfloat16" and _is_jax(q):
            import jax.numpy
            back = jax.numpy.asarray  # NumPy exports no bfloat16 through DLPack: JAX copies
        if back is not None:
            return back(out), back(lse)
    return out, lse


def _is_jax(x) -> bool:
    return type(x).__module__.split(".")[0] in ("jax", "jaxlib")


def to_float64_numpy(x, info: ArrayInfo) -> np.ndarray:
    """A float64 NumPy copy of any supported array, moved to the host if needed."""
    if info.device == "cpu":
        if info.library == "torch":
            return x.detach().resolve_neg().double().numpy()
        return np.asarray(to_host_numpy(x, info), dtype=np.float64)
    if info.library == "torch":
        return x.detach().resolve_neg().double().cpu().numpy()
    import cupy
    if info.library == "dlpack":
        x = cupy.from_dlpack(x)
    with x.device:
        return x.astype(cupy.float64).get()


# ---------------------------------------------------------------- GPU (cuda / hip backends)

def _last_dim_unit_stride_cupy(x):
    """Kernels need element stride 1 in D; copy only an array that lacks it."""
    import cupy
    if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        return cupy.ascontiguousarray(x)
    return x


def _bhsd(x, layout):
    return x.transpose(_BHSD_FROM_BSHD) if layout == "bshd" else x


def run_on_gpu(forward, q, k, v, info: ArrayInfo, *, layout: str, dims, **options):
    """Launch a GPU backend's forward(q, k, v, out, lse, stream=, **options).

    dims = (B, Hq, Sq, Sk, D). Returns (out, lse) in q's library, on q's device.
    """
    batch, q_heads, sq, sk, head_dim = dims
    if info.library == "torch":
        return _run_torch(forward, q, k, v, layout=layout, dims=dims, **options)

    import cupy
    if info.library == "cupy":
        arrays = (q, k, v)
    else:
        try:
            arrays = tuple(cupy.from_dlpack(a) for a in (q, k, v))
        except Exception as error:
            raise TypeError(f"q: CuPy could not import this {info.dtype} array through "
                            f"DLPack ({error}); for bfloat16 install ml_dtypes") from error
    with cupy.cuda.Device(info.device_id):
        out_shape = (batch, sq, q_heads, head_dim) if layout == "bshd" \
            else (batch, q_heads, sq, head_dim)
        out = cupy.empty(out_shape, dtype=arrays[0].dtype)
        lse = cupy.empty((batch, q_heads, sq), dtype=cupy.float32)
        if out.size and sk == 0:
            # No key anywhere: every row is empty by definition (out 0, lse -inf).
            out.fill(0)
            lse.fill(-np.inf)
        elif out.size:
            cq, ck, cv = (_last_dim_unit_stride_cupy(_bhsd(a, layout)) for a in arrays)
            forward(cq, ck, cv, _bhsd(out, layout), lse,
                    stream=cupy.cuda.get_current_stream().ptr, **options)
    if info.library == "dlpack":
        back = _producer_from_dlpack(q)
        if back is not None:
            return back(out), back(lse)
    return out, lse


def _run_torch(forward, q, k, v, *, layout, dims, **options):
    """Torch CUDA tensors go to forward as they are: it reads only pointer, shape, strides and
    dtype, so no DLPack round trip is paid per call and bfloat16 needs nothing from CuPy."""
    import torch
    batch, q_heads, sq, sk, head_dim = dims
    out_shape = (batch, sq, q_heads, head_dim) if layout == "bshd" \
        else (batch, q_heads, sq, head_dim)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if sk == 0:
        out.zero_()
        lse.fill_(-float("inf"))
        return out, lse

    def kernel_view(t):
        # A copy made by torch runs on torch's current stream and is freed into torch's
        # stream-aware allocator, so the kernel launched on that stream sees it complete.
        t = t.resolve_neg()  # a negative-bit view's memory holds -t: the kernel reads memory
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            t = t.contiguous()
        return t.transpose(1, 2) if layout == "bshd" else t

    forward(kernel_view(q), kernel_view(k), kernel_view(v), kernel_view(out), lse,
            stream=torch.cuda.current_stream(q.device).cuda_stream, **options)
    return out, lse
