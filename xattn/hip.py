"""The "hip" backend: launches the kernels of kernels_hip/ through a ROCm build of CuPy (hiprtc).

The same contract as xattn/cuda.py: arrays in the (B, H, S, D) view with any batch, head and row
strides and a contiguous last dimension, as torch tensors or CuPy arrays; nothing is copied; work
runs on the device that holds the arrays and on the stream the caller passes. The kernel and its
tiles come from the device's gcnArchName (configs.select_hip): the MFMA kernel for float16 and
bfloat16 on CDNA (gfx908, gfx90a, gfx94x, gfx95x), the portable FMA kernel for float32 and on
GPUs without MFMA (RDNA: wave32).
"""

from __future__ import annotations

import math

import numpy as np

from xattn import configs, cuda, jit

LOG2_E = math.log2(math.e)
MAX_GRID_YZ = 65535  # gridDim.y and gridDim.z, as on CUDA: the batch is walked in chunks


def availability() -> tuple[bool, str]:
    """(usable, why): a ROCm build of CuPy, at least one device, a gfx target the table serves."""
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc}); pip install 'xattn[rocm]'"
    if not cupy.cuda.runtime.is_hip:
        return False, "CuPy is a CUDA build; that is the 'cuda' backend"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return False, f"no usable ROCm device ({exc})"
    if count == 0:
        return False, "no ROCm device"
    arch = _arch(0)
    try:
        configs.select_hip("float16", arch, configs.MAX_HEAD_DIM, False)
    except ValueError as exc:
        return False, str(exc)
    return True, f"{count} ROCm device(s), {arch} on device 0"


_arch_cache: dict[int, str] = {}


def _arch(device_id: int) -> str:
    """The device's gcnArchName, e.g. "gfx90a:sramecc+:xnack-"."""
    arch = _arch_cache.get(device_id)
    if arch is None:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(device_id)["gcnArchName"]
        arch = _arch_cache[device_id] = name.decode() if isinstance(name, bytes) else str(name)
    return arch


def forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int) -> None:
    """Write out = softmax(scale * q k^T) v and lse for (B, H, S, D) views (see module docstring)."""
    Q = cuda._describe(q)
    if Q.shape[0] == 0 or Q.shape[1] == 0 or Q.shape[2] == 0:
        return
    head_dim = Q.shape[3]
    cfg = configs.select_hip(Q.dtype, _arch(Q.device), head_dim, causal)
    arrays = [cuda._describe(a) for a in (k, v, out)]
    itemsize = 4 if Q.dtype == "float32" else 2
    vec = cfg.kernel == "flash_fwd_mfma" and cuda._vec_loads([Q, *arrays], head_dim, itemsize)
    defines = configs.hip_defines(cfg, Q.dtype, causal, vec)
    kernel = jit.get_function("hip", cfg.kernel + ".hip", cfg.kernel, defines, Q.device)
    launch(kernel, cfg, q, k, v, out, lse, scale=scale, stream=stream)


def launch(kernel, cfg: configs.TileConfig, q, k, v, out, lse, *, scale: float, stream: int) -> None:
    """Launch one compiled HIP kernel variant (a cupy.RawKernel) for row `cfg` of the table.

    Shared with tests/test_hip_portable.py, which compiles the portable kernel for an NVIDIA GPU.
    """
    import cupy

    Q, K, V, O, L = (cuda._describe(a) for a in (q, k, v, out, lse))
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} heads are supported, got {heads_q}")
    itemsize = 4 if Q.dtype == "float32" else 2
    scalars = (
        *(np.int64(s) for a in (Q, K, V, O) for s in a.strides[:3]),
        np.int64(L.strides[0]), np.int64(L.strides[1]),
        np.int32(seqlen_q), np.int32(seqlen_k), np.int32(head_dim),
        np.int32(heads_q // heads_k),
        np.float32(scale), np.float32(scale * LOG2_E),
    )
    threads = cfg.warps * configs.hip_wave_size(cfg)
    smem = configs.hip_shared_memory_bytes(cfg)
    with cupy.cuda.Device(Q.device), cuda._external_stream(stream, Q.device):
        for b0 in range(0, batch, MAX_GRID_YZ):
            nb = min(MAX_GRID_YZ, batch - b0)
            pointers = tuple(
                np.uint64(a.ptr + b0 * a.strides[0] * size)
                for a, size in ((Q, itemsize), (K, itemsize), (V, itemsize), (O, itemsize), (L, 4))
            )
            kernel(configs.grid(cfg, seqlen_q, heads_q, nb), (threads,), pointers + scalars,
                   shared_mem=smem)


def info() -> dict[str, str]:
    """Lines for `python -m xattn info`."""
    import cupy

    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    arch = _arch(device.id)
    kernels = {dtype: configs.select_hip(dtype, arch, 128, False).kernel
               for dtype in configs.HIP_KERNELS_FOR_DTYPE}
    return {
        "device": f"{props['name'].decode()} (rocm:{device.id})",
        "gcnArchName": arch,
        "compute units": str(props["multiProcessorCount"]),
        "kernels": ", ".join(f"{dtype}: {name}" for dtype, name in kernels.items()),
        "compiler": "hiprtc (through CuPy RawModule)",
        "kernel cache": jit.cache_location(),
    }
