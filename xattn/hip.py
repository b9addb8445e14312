"""The "hip" backend: launches the kernels of kernels_hip/ through a ROCm build of CuPy (hiprtc).

The same contract as xattn/cuda.py: arrays in the (B, H, S, D) view with any batch, head and row
strides and a contiguous last dimension, as torch tensors or CuPy arrays; nothing is copied; work
runs on the device that holds the arrays and on the stream the caller passes. The kernel and its
tiles come from the device's gcnArchName (configs.select_hip): the MFMA kernel for float16 and
bfloat16 on CDNA (gfx908, gfx90a, gfx94x, gfx95x), the portable FMA kernel for float32 and on
GPUs without MFMA (RDNA: wave32). The backward (delta, then dK/dV and dQ in two kernels without
atomics) follows the same choice per dtype and head dim (configs.select_hip_backward).

window, softcap, alibi_slopes and packed batches (cu_seqlens, max_seqlen; issue 6) are accepted
with their defaults only: the HIP kernels do not implement them yet, and other values raise
ValueError.
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


def _unsupported_variants(window=(-1, -1), softcap=0.0, alibi_slopes=None, cu_seqlens=None,
                          max_seqlen=None) -> None:
    """ValueError for the attention variants the HIP kernels do not implement yet."""
    if window is not None and tuple(window) != (-1, -1):
        raise ValueError(f"window: {tuple(window)} is not supported by the hip backend yet "
                         f"(only (-1, -1), no window)")
    if softcap:
        raise ValueError(f"softcap: {softcap} is not supported by the hip backend yet (only 0.0)")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: is not supported by the hip backend yet (only None)")
    if cu_seqlens is not None or max_seqlen is not None:
        raise ValueError("cu_seqlens: packed (varlen) batches are not supported by the hip backend "
                         "yet")


def forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int,
            window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, cu_seqlens=None,
            max_seqlen=None) -> None:
    """Write out = softmax(scale * q k^T) v and lse for (B, H, S, D) views (see module docstring)."""
    _unsupported_variants(window, softcap, alibi_slopes, cu_seqlens, max_seqlen)
    Q = cuda._describe(q)
    if Q.shape[0] == 0 or Q.shape[1] == 0 or Q.shape[2] == 0:
        return
    head_dim = Q.shape[3]
    cfg = configs.select_hip(Q.dtype, _arch(Q.device), head_dim, causal)
    arrays = [cuda._describe(a) for a in (k, v, out)]
    itemsize = 4 if Q.dtype == "float32" else 2
    vec = cfg.kernel in configs.HIP_MFMA_KERNELS and cuda._vec_loads([Q, *arrays], head_dim, itemsize)
    defines = configs.hip_defines(cfg, Q.dtype, causal, vec)
    kernel = jit.get_function("hip", configs.hip_source(cfg.kernel), cfg.kernel, defines, Q.device)
    launch(kernel, cfg, q, k, v, out, lse, scale=scale, stream=stream)


def launch(kernel, cfg: configs.TileConfig, q, k, v, out, lse, *, scale: float, stream: int) -> None:
    """Launch one compiled HIP forward variant (a cupy.RawKernel) for row `cfg` of the table.

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
    smem = configs.hip_shared_memory_bytes(cfg)
    with cupy.cuda.Device(Q.device), cuda._external_stream(stream, Q.device):
        cuda._launch(kernel, configs.hip_grid(cfg, seqlen_q, seqlen_k, heads_q, heads_k, 1)[:2],
                     configs.hip_threads(cfg), smem,
                     [(Q, itemsize), (K, itemsize), (V, itemsize), (O, itemsize), (L, 4)], scalars, batch)


def backward(q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool, scale: float,
             deterministic: bool, stream: int, window=(-1, -1), softcap: float = 0.0,
             alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> None:
    """Write dq, dk, dv for (B, H, S, D) views; lse is the forward's (natural log, float32
    (B, Hq, Sq)). dk and dv are summed over the query heads of each GQA group. The same contract as
    xattn.cuda.backward. `deterministic` changes nothing here: dQ always comes from its own
    query-parallel kernel, with no atomics, so every run gives the same bits."""
    _unsupported_variants(window, softcap, alibi_slopes, cu_seqlens, max_seqlen)
    Q = cuda._describe(q)
    head_dim = Q.shape[3]
    if 0 in Q.shape[:2]:
        return
    cfgs = configs.select_hip_backward(Q.dtype, _arch(Q.device), head_dim, causal)
    itemsize = 4 if Q.dtype == "float32" else 2
    arrays = [cuda._describe(a) for a in (q, k, v, out, dout, dq, dk, dv)]
    vec = cuda._vec_loads(arrays, head_dim, itemsize)
    kernels = tuple(
        jit.get_function("hip", configs.hip_source(cfg.kernel), cfg.kernel,
                         configs.hip_defines(cfg, Q.dtype, causal,
                                             vec and cfg.kernel in configs.HIP_MFMA_KERNELS), Q.device)
        for cfg in cfgs)
    launch_backward(kernels, cfgs, q, k, v, out, dout, lse, dq, dk, dv, scale=scale, stream=stream)


def launch_backward(kernels, cfgs, q, k, v, out, dout, lse, dq, dk, dv, *, scale: float,
                    stream: int) -> None:
    """Launch compiled HIP backward variants: kernels and cfgs are (preprocess, dK/dV, dQ), as
    configs.select_hip_backward gives them. Shared with tests/test_hip_portable.py, which compiles
    the portable kernels for an NVIDIA GPU."""
    import cupy

    Q, K, V, O, dO, L, dQ, dK, dV = (cuda._describe(a) for a in (q, k, v, out, dout, lse, dq, dk, dv))
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
    size = 4 if Q.dtype == "float32" else 2
    sizes = (np.int32(seqlen_q), np.int32(seqlen_k), np.int32(head_dim))
    tail = sizes + (np.int32(heads_q // heads_k), np.float32(scale), np.float32(scale * LOG2_E))
    prep, dkdv, dq_kernel = kernels
    prep_cfg, dkdv_cfg, dq_cfg = cfgs

    def grid(cfg):
        return configs.hip_grid(cfg, seqlen_q, seqlen_k, heads_q, heads_k, 1)[:2]

    with cupy.cuda.Device(Q.device), cuda._external_stream(stream, Q.device):
        # delta = rowsum(dO * O), float32 scratch from the caller's framework, on its stream; held
        # until the end, as the caching allocators may hand freed memory out again at once.
        delta_array = cuda._new_like(q, (batch, heads_q, seqlen_q), zero=False)
        D = cuda._describe(delta_array)
        cuda._launch(prep, grid(prep_cfg), configs.hip_threads(prep_cfg), 0, [(O, size), (dO, size), (D, 4)],
                     cuda._strides(O, dO) + cuda._strides(D, dims=2) + (np.int32(seqlen_q), np.int32(head_dim)),
                     batch)
        common = [(Q, size), (K, size), (V, size), (dO, size), (L, 4), (D, 4)]
        cuda._launch(dkdv, grid(dkdv_cfg), configs.hip_threads(dkdv_cfg), configs.hip_shared_memory_bytes(dkdv_cfg),
                     common + [(dK, size), (dV, size)],
                     cuda._strides(Q, K, V, dO, dK, dV) + cuda._strides(L, D, dims=2) + tail, batch)
        cuda._launch(dq_kernel, grid(dq_cfg), configs.hip_threads(dq_cfg), configs.hip_shared_memory_bytes(dq_cfg),
                     common + [(dQ, size)],
                     cuda._strides(Q, K, V, dO, dQ) + cuda._strides(L, D, dims=2) + tail, batch)


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
