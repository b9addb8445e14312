"""Tensor maps for Hopper's copy engine (TMA), built on the host with the CUDA driver through
cuda-bindings (`cuTensorMapEncodeTiled`).

A map describes one (B, H, S, D) view with D contiguous as a 4-D tensor (D, S, H, B), innermost
first, with byte strides for S, H and B, and a box of 128 bytes of columns (the widest box the
128-byte swizzle allows: 64 columns of a 16-bit type, 32 of float32) by `box_rows` rows; the copy
engine fills elements outside the tensor with zeros on loads and skips them on stores and
reductions. float32 maps serve the backward's dQ accumulator (reduce-add). Kernels take the 128 bytes by value as a
`const __grid_constant__` parameter; a launch (xattn/launch.py) passes the driver's CUtensorMap
object by address.

Each launch plan owns its maps (`plan_map`) and re-points one with `cuTensorMapReplaceAddress`
only when its pointer changes (`repoint`): on an H200 encoding took 11.7 µs a map and re-pointing
4.8 (ci/sm90_fwd_check.py --phase host measures both).
"""

from __future__ import annotations

BOX_BYTES = 128            # bytes of a box row: the widest the 128-byte swizzle allows
ALIGN = 16                 # bytes: the base address and every stride
MAX_STRIDE = 1 << 40       # bytes, exclusive
MAX_DIM = 1 << 32          # elements per dimension, inclusive

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}

# A stand-in base address (aligned, never dereferenced) for a map whose memory a plan does not know
# yet: the backward's dq_accum scratch is allocated per call, and every launch re-points the map.
PLACEHOLDER_PTR = 1 << 20


def expressible(ptr: int, dtype: str, shape: tuple, strides: tuple) -> bool:
    """Whether a (B, H, S, D) view (strides in elements, D contiguous) can be a tensor map: a
    16-byte aligned base, strides of the outer dimensions multiples of 16 bytes below 2^40, every
    dimension at most 2^32 and not empty. A dimension of extent 1 is never stepped over, so its
    stride does not matter."""
    size = _ITEMSIZE.get(dtype)
    if size is None or ptr % ALIGN or len(shape) != 4 or (strides[3] != 1 and shape[3] > 1):
        return False
    if not all(0 < n <= MAX_DIM for n in shape):
        return False
    return all(n == 1 or (s > 0 and (s * size) % ALIGN == 0 and s * size < MAX_STRIDE)
               for n, s in zip(shape[:3], strides[:3]))


_driver = None


def _load_driver():
    global _driver
    if _driver is None:
        from cuda.bindings import driver

        (err,) = driver.cuInit(0)
        _check(driver, err, "cuInit")
        _driver = driver
    return _driver


def _check(driver, err, what: str) -> None:
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"xattn: {what} failed ({err})")


def _with_context(driver, call, device: int | None = None):
    """call() -> (err, *results) through the driver API, which needs a context current on the
    calling thread: a thread that has only used torch's caching allocator may have none yet
    (CUDA_ERROR_INVALID_CONTEXT). Then the device's primary context is made current (cudaSetDevice
    does that from CUDA 12 on; `device` None: the thread's current device, which launch.run has
    made the plan's) and the call is made once more."""
    result = call()
    if result[0] == driver.CUresult.CUDA_ERROR_INVALID_CONTEXT:
        import cupy

        runtime = cupy.cuda.runtime
        runtime.setDevice(runtime.getDevice() if device is None else device)
        result = call()
    return result


def _encode(driver, ptr: int, dtype: str, shape: tuple, strides: tuple, box_rows: int, device: int):
    size = _ITEMSIZE[dtype]
    batch, heads, rows, cols = shape
    # A dimension of extent 1 gets a legal stride: its coordinate is always 0.
    byte_strides = [s * size if n > 1 else ALIGN for n, s in zip(shape[:3], strides[:3])]
    data_type = getattr(driver.CUtensorMapDataType, {
        "bfloat16": "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16", "float16": "CU_TENSOR_MAP_DATA_TYPE_FLOAT16",
        "float32": "CU_TENSOR_MAP_DATA_TYPE_FLOAT32"}[dtype])
    err, tmap = _with_context(driver, lambda: driver.cuTensorMapEncodeTiled(
        data_type, 4, ptr,
        [driver.cuuint64_t(n) for n in (cols, rows, heads, batch)],
        [driver.cuuint64_t(s) for s in (byte_strides[2], byte_strides[1], byte_strides[0])],
        [driver.cuuint32_t(n) for n in (BOX_BYTES // size, box_rows, 1, 1)],
        [driver.cuuint32_t(1)] * 4,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE), device)  # NONE: zeros
    _check(driver, err, f"cuTensorMapEncodeTiled(shape={shape}, strides={strides}, {dtype}, box rows {box_rows})")
    return tmap


def plan_map(ptr: int, dtype: str, shape: tuple, strides: tuple, box_rows: int, device: int):
    """A tensor map owned by one launch plan (shared with no other plan, so re-pointing it races
    with none): the driver's CUtensorMap object, whose 128 bytes a launch passes by address."""
    return _encode(_load_driver(), ptr, dtype, shape, strides, box_rows, device)


def repoint(tmap, ptr: int) -> None:
    """Point a plan's map at another base address (same shape, strides and box)."""
    driver = _load_driver()
    (err,) = _with_context(driver, lambda: driver.cuTensorMapReplaceAddress(tmap, ptr))
    _check(driver, err, "cuTensorMapReplaceAddress")
