"""The "hip" backend: launches the kernels of kernels_hip/ through a ROCm build of CuPy (hiprtc).

The same contract as xattn/cuda.py: arrays in the (B, H, S, D) view with any batch, head and row
strides and a contiguous last dimension, as torch tensors or CuPy arrays; nothing is copied; work
runs on the device that holds the arrays and on the stream the caller passes. The kernel and its
tiles come from the device's gcnArchName (configs.select_hip): the MFMA kernel for float16 and
bfloat16 on CDNA (gfx908, gfx90a, gfx94x, gfx95x), the portable FMA kernel for float32 and on
GPUs without MFMA (RDNA: wave32). The backward (delta, then dK/dV and dQ in two kernels without
atomics) follows the same choice per dtype and head dim (configs.select_hip_backward).

The variants of issue 6 -- sliding windows, softcap, ALiBi and packed (varlen) batches -- reach
the kernels exactly as on CUDA: the same flags and trailing arguments (xattn.launch_layer.variant), the
same (1, H, T, D) views of batch stride 0 for packed batches (xattn.launch_layer.packed), the same
vendor-neutral logic in kernels_common/attention_common.h.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from xattn import configs, jit
from xattn import launch as launch_layer  # the vendor-neutral launch layer (hip.launch is ours)

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


def _jit(cfg: configs.TileConfig, defines: dict, device: int):
    """The hiprtc-compiled kernel of table row `cfg` with these -D defines (CuPy RawModule)."""
    return jit.get_function("hip", configs.hip_source(cfg.kernel), cfg.kernel, defines, device)


def _compiler(x, direction: str):
    """(compile, gcnArchName) for a launch on x's device: hiprtc and the device's own target, or
    while on_cuda is active, its NVRTC compile and the target it was given for `direction`."""
    if _served is not None:
        return _served.compile, _served.targets[direction]
    return _jit, _arch(launch_layer.describe(x).device)


def forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int, window=(-1, -1),
            softcap: float = 0.0, alibi_slopes=None, cu_seqlens=None, max_seqlen=None,
            sinks=None) -> None:
    """Write out = softmax(scale * q k^T + modifiers) v and lse for (B, H, S, D) views: the
    contract of xattn.cuda.forward, variants included (window, softcap, alibi_slopes, packed
    batches through cu_seqlens and max_seqlen); attention sinks are not (ValueError)."""
    if sinks is not None:
        raise ValueError("sinks: attention sinks are not supported on the hip backend, got an "
                         "array; pass sinks=None")
    launch(*_compiler(q, "forward"), q, k, v, out, lse, causal=causal, scale=scale,
           stream=stream, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
           cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def _problem(arrays, cu_seqlens, max_seqlen):
    """(described arrays, batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim) of a call; a
    packed batch is one (1, H, T, D) entry of batch stride 0 (launch_layer.packed) and its lengths are
    the longest sequence's."""
    varlen = cu_seqlens is not None
    described = [launch_layer.packed(launch_layer.describe(a), varlen) for a in arrays]
    Q, K = described[0], described[1]
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    if varlen:
        batch = cu_seqlens[0].shape[0] - 1
        seqlen_q, seqlen_k = max_seqlen
    return described, batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim


def launch(compile, target: str, q, k, v, out, lse, *, causal: bool, scale: float, stream: int,
           window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, cu_seqlens=None,
           max_seqlen=None) -> None:
    """The forward on a device of gcnArchName `target`, its kernel from compile(cfg, defines,
    device) -> cupy.RawKernel. Everything else -- row choice, variant flags and arguments (the
    cuda backend's own, launch_layer.variant), grid, launch -- is the hip backend's. Shared with
    tests/test_hip_portable.py, which compiles the portable kernel for an NVIDIA GPU with NVRTC."""
    import cupy

    (Q, K, V, O, L), batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim = _problem(
        (q, k, v, out, lse), cu_seqlens, max_seqlen)
    if batch == 0 or heads_q == 0 or seqlen_q == 0:
        return
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} heads are supported, got {heads_q}")
    var = launch_layer.variant(causal=causal, scale=scale, window=window, softcap=softcap,
                        alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens, seqlen_q=seqlen_q,
                        seqlen_k=seqlen_k, head_dim=head_dim, heads_per_kv=heads_q // heads_k)
    has_right_edge = bool(var.defines["IS_CAUSAL"])
    cfg = configs.select_hip(Q.dtype, target, head_dim, has_right_edge)
    size = launch_layer.itemsize(Q.dtype)
    vec = cfg.kernel in configs.HIP_MFMA_KERNELS and launch_layer.vec_loads([Q, K, V, O], head_dim, size)
    kernel = compile(cfg, configs.hip_defines(cfg, Q.dtype, has_right_edge, vec) | var.defines, Q.device)
    args = [(Q, size), (K, size), (V, size), (O, size), (L, 4), *launch_layer.stride_args(Q, K, V, O),
            *launch_layer.stride_args(L, dims=2), *var.args]
    with cupy.cuda.Device(Q.device), launch_layer.external_stream(stream, Q.device):
        launch_layer.launch_args(kernel, configs.hip_grid(cfg, seqlen_q, seqlen_k, heads_q, heads_k, 1)[:2],
                     configs.hip_threads(cfg), configs.hip_shared_memory_bytes(cfg), args, batch)


def backward(q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool, scale: float,
             deterministic: bool, stream: int, window=(-1, -1), softcap: float = 0.0,
             alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> None:
    """Write dq, dk, dv for (B, H, S, D) views; lse is the forward's (natural log, float32
    (B, Hq, Sq)). dk and dv are summed over the query heads of each GQA group. The same contract as
    xattn.cuda.backward, variants included. `deterministic` changes nothing here: dQ always comes
    from its own query-parallel kernel, with no atomics, so every run gives the same bits."""
    launch_backward(*_compiler(q, "backward"), q, k, v, out, dout, lse, dq, dk, dv,
                    causal=causal, scale=scale, stream=stream, window=window, softcap=softcap,
                    alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def launch_backward(compile, target: str, q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool,
                    scale: float, stream: int, window=(-1, -1), softcap: float = 0.0,
                    alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> None:
    """The backward on a device of gcnArchName `target`: delta, then dK/dV and dQ, the kernels
    from compile(cfg, defines, device) as in `launch`. Shared with tests/test_hip_portable.py."""
    import cupy

    varlen = cu_seqlens is not None
    (Q, K, V, O, dO, L, dQ, dK, dV), batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim = _problem(
        (q, k, v, out, dout, lse, dq, dk, dv), cu_seqlens, max_seqlen)
    total_q = Q.shape[2]  # every query row (packed: all sequences)
    if batch == 0 or heads_q == 0:
        return
    if seqlen_q == 0 or seqlen_k == 0:  # nothing attends: every gradient is zero
        for grad in (dq, dk, dv):
            grad.zero_() if hasattr(grad, "zero_") else grad.fill(0)
        return
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} heads are supported, got {heads_q}")
    var = launch_layer.variant(causal=causal, scale=scale, window=window, softcap=softcap,
                        alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens, seqlen_q=seqlen_q,
                        seqlen_k=seqlen_k, head_dim=head_dim, heads_per_kv=heads_q // heads_k)
    tail = var.args + [np.float32(scale)]  # grad_scale: the attention scale, for dQ and dK
    has_right_edge = bool(var.defines["IS_CAUSAL"])
    cfgs = configs.select_hip_backward(Q.dtype, target, head_dim, has_right_edge)
    size = launch_layer.itemsize(Q.dtype)
    vec = launch_layer.vec_loads([Q, K, V, O, dO, dQ, dK, dV], head_dim, size)
    prep, dkdv, dq_kernel = (
        compile(cfg, configs.hip_defines(cfg, Q.dtype, has_right_edge, vec and cfg.kernel in configs.HIP_MFMA_KERNELS)
                | ({} if cfg.kernel == "flash_bwd_preprocess" else var.defines), Q.device)
        for cfg in cfgs)
    prep_cfg, dkdv_cfg, dq_cfg = cfgs

    def grid(cfg, rows_q):
        return configs.hip_grid(cfg, rows_q, seqlen_k, heads_q, heads_k, 1)[:2]

    # The row-wise preprocess sees a packed batch as one entry of total_q rows.
    prep_batch = 1 if varlen else batch
    with cupy.cuda.Device(Q.device), launch_layer.external_stream(stream, Q.device):
        # delta = rowsum(dO * O), float32 scratch from the caller's framework, on its stream; held
        # until the end, as the caching allocators may hand freed memory out again at once.
        delta_array = launch_layer.new_like(q, (prep_batch, heads_q, total_q), zero=False)
        D = launch_layer.packed(launch_layer.describe(delta_array), varlen)
        launch_layer.launch_args(prep, grid(prep_cfg, total_q), configs.hip_threads(prep_cfg), 0,
                     [(O, size), (dO, size), (D, 4), *launch_layer.stride_args(O, dO), *launch_layer.stride_args(D, dims=2),
                      np.int32(total_q), np.int32(head_dim)], prep_batch)
        common = [(Q, size), (K, size), (V, size), (dO, size), (L, 4), (D, 4)]
        lse_delta = launch_layer.stride_args(L, D, dims=2)
        launch_layer.launch_args(dkdv, grid(dkdv_cfg, seqlen_q), configs.hip_threads(dkdv_cfg),
                     configs.hip_shared_memory_bytes(dkdv_cfg),
                     [*common, (dK, size), (dV, size), *launch_layer.stride_args(Q, K, V, dO, dK, dV), *lse_delta, *tail],
                     batch)
        launch_layer.launch_args(dq_kernel, grid(dq_cfg, seqlen_q), configs.hip_threads(dq_cfg),
                     configs.hip_shared_memory_bytes(dq_cfg),
                     [*common, (dQ, size), *launch_layer.stride_args(Q, K, V, dO, dQ), *lse_delta, *tail], batch)


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


# ---- the portable kernels on an NVIDIA GPU (a test hook) -------------------------------------------

class _Served(NamedTuple):
    compile: object  # compile(cfg, defines, device) -> a launchable kernel
    targets: dict    # "forward" / "backward" -> the gcnArchName whose table rows are used


_served: _Served | None = None  # set while on_cuda is active
_nvrtc_kernels: dict = {}       # the NVRTC-compiled kernels of on_cuda, kept across activations


@contextlib.contextmanager
def on_cuda(*, prefix: str, options: tuple, forward_target: str, backward_target: str):
    """A context in which the hip backend serves arrays in CUDA memory, with its portable
    kernels compiled by CuPy's NVRTC from `prefix` (tests/hip_on_cuda.h: the HIP device API
    on CUDA) followed by the preprocessed HIP source, with `options`: xattn.attention,
    attention_varlen, autograd (xattn/dispatch.py asks backends.hip_on_cuda), the KV-cache
    decode, and direct calls of forward, backward and decode. Forwards and the decode use the
    table rows of `forward_target`, backwards those of `backward_target` (gcnArchNames). The
    MFMA/WMMA rows cannot run there: selecting one raises ValueError. For the tests; not
    thread-safe (one active context per process)."""
    global _served
    from xattn import backends

    def compile(cfg, defines: dict, device: int):
        if cfg.kernel in configs.HIP_MFMA_KERNELS:
            raise ValueError(f"{cfg.kernel} ({cfg.arch} row): a matrix-core kernel runs on AMD "
                             f"only; on_cuda runs the portable kernels (pick a target without "
                             f"MFMA/WMMA rows for this dtype)")
        key = (prefix, options, device, cfg.kernel, tuple(jit.define_options(defines)))
        kernel = _nvrtc_kernels.get(key)
        if kernel is None:
            import cupy

            with cupy.cuda.Device(device):
                code = prefix + jit.preprocess("hip", configs.hip_source(cfg.kernel))
                raw = cupy.RawModule(code=code, options=(*options, *key[4])).get_function(cfg.kernel)
            kernel = _nvrtc_kernels[key] = _OptedIn(raw, device)
        return kernel

    if _served is not None:
        raise RuntimeError("xattn.hip.on_cuda: already active")
    _served = _Served(compile, {"forward": forward_target, "backward": backward_target})
    backends.hip_on_cuda = True
    try:
        yield
    finally:
        backends.hip_on_cuda = False
        _served = None


class _OptedIn:
    """A CuPy kernel that opts in to its launch's dynamic shared memory above 48 KB (CUDA
    requires it; the portable rows' LDS goes up to 64 KB)."""

    def __init__(self, raw, device: int):
        self.raw, self.device = raw, device

    def __call__(self, grid, block, args, shared_mem: int = 0):
        if shared_mem > 48 * 1024:
            launch_layer.prepare_smem(self.raw, (self.device, id(self.raw), shared_mem), shared_mem)
        self.raw(grid, block, args, shared_mem=shared_mem)


# ---- KV-cache decode (attention_with_kvcache) -------------------------------------------------

def decode(q, k_cache, v_cache, k_new, v_new, out, lse, cache_seqlens, call, workspace,
           stream: int) -> None:
    """attention_with_kvcache's GPU step on a ROCm device: append k_new/v_new to the caches, then
    split-KV decode and, with several splits, the merge (kernels_hip/flash_decode_portable.hip).
    Called by xattn.kvcache._run_hip with (B, H, S, D) views, D contiguous (caches: unit stride
    along D), cache_seqlens an int32 device array or None to use call.uniform, `call` the
    validated kvcache call (seqlen_new, uniform, window with causal folded in, softcap, scale),
    workspace(n) -> n float32 elements from the caller's framework. Contiguous caches only (no
    block_table) and no sinks: kvcache raises for those before this."""
    launch_decode(*_compiler(q, "forward"), q, k_cache, v_cache, k_new, v_new, out, lse,
                  cache_seqlens, call, workspace, stream)


_cu_counts: dict[int, int] = {}


def _cu_count(device_id: int) -> int:
    count = _cu_counts.get(device_id)
    if count is None:
        import cupy

        count = _cu_counts[device_id] = int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])
    return count


def launch_decode(compile, target: str, q, k_cache, v_cache, k_new, v_new, out, lse, cache_seqlens,
                  call, workspace, stream: int) -> None:
    """The decode on a device of gcnArchName `target`, its kernels from compile(cfg, defines,
    device) as in `launch` (cfg of another entry point of the same source for the merge and the
    append). Shared with tests/test_hip_decode.py, which compiles them for an NVIDIA GPU."""
    import cupy

    from xattn import kvcache

    Q, Kc, Vc, O, L = (launch_layer.describe(a) for a in (q, k_cache, v_cache, out, lse))
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k, seqlen_max = Kc.shape[1], Kc.shape[2]
    seqlen_new = call.seqlen_new
    if batch == 0:
        return
    if heads_k > MAX_GRID_YZ:
        raise ValueError(f"k_cache: at most {MAX_GRID_YZ} heads are supported, got {heads_k}")
    device, size = Q.device, launch_layer.itemsize(Q.dtype)
    null = launch_layer.Array(0, (), (0,), "", device)
    if cache_seqlens is not None:
        S = launch_layer.describe(cache_seqlens)
        seqlens, seqlens_stride, uniform = (S, 4), np.int64(S.strides[0]), np.int32(0)
    else:
        seqlens, seqlens_stride, uniform = (null, 4), np.int64(0), np.int32(call.uniform)

    cfg = configs.select_hip_decode(Q.dtype, target, head_dim)
    # Window bounds past every key distance are unbounded (-1), as on CUDA (kvcache._plan).
    left, right = ((-1 if w >= seqlen_max + seqlen_q else w) for w in call.window)
    scale, softcap = call.scale, call.softcap
    defines = configs.hip_defines(cfg, Q.dtype, right >= 0, False) | {
        "IS_LOCAL": int(left >= 0), "HAS_SOFTCAP": int(bool(softcap))}
    decode_kernel = compile(cfg, defines, device)
    merge = compile(cfg._replace(kernel="flash_decode_merge_portable"), defines, device)
    append = compile(cfg._replace(kernel="kvcache_append_portable"), defines, device)
    threads = configs.hip_threads(cfg)

    rows = (heads_q // heads_k) * seqlen_q
    m_blocks = -(-rows // cfg.block_m)
    band = seqlen_max  # the keys one sequence's queries can see span at most left + right + Sq
    if left >= 0:
        band = min(band, left + seqlen_q + max(right, 0))
    splits = kvcache.num_splits(m_blocks * heads_k * batch, _cu_count(device),
                                max(1, -(-band // cfg.block_n)), 1)
    if m_blocks * splits >= 2**31:
        raise ValueError(f"q: too many query rows per kv head ({rows})")

    with cupy.cuda.Device(device), launch_layer.external_stream(stream, device):
        if seqlen_new and k_new is not None:
            Kn, Vn = launch_layer.describe(k_new), launch_layer.describe(v_new)
            elements = heads_k * seqlen_new * head_dim
            launch_layer.launch_args(append, (-(-elements // threads), 1), threads, 0,
                         [(Kn, size), (Vn, size), (Kc, size), (Vc, size), seqlens,
                          *launch_layer.stride_args(Kn, Vn, Kc, Vc), seqlens_stride, uniform, np.int32(heads_k),
                          np.int32(seqlen_new), np.int32(seqlen_max), np.int32(head_dim)], batch)
        if seqlen_q == 0:
            return
        rows_bhs = heads_q * seqlen_q
        if splits > 1:  # partials of every split, merged below (freed on return: stream-ordered)
            part = workspace(batch * rows_bhs * splits * (cfg.head_dim + 1))
            P = launch_layer.describe(part)
            o_part = launch_layer.Array(P.ptr, (batch,), (rows_bhs * splits * cfg.head_dim,), "float32", device)
            lse_part = launch_layer.Array(P.ptr + 4 * batch * rows_bhs * splits * cfg.head_dim, (batch,),
                                   (rows_bhs * splits,), "float32", device)
            parts = [(o_part, 4), (lse_part, 4)]
        else:
            parts = [(null, 4), (null, 4)]
        # The softmax's scale is the softcap c under a softcap (attention_common.h).
        score_scale = softcap if softcap else scale
        launch_layer.launch_args(decode_kernel, (m_blocks * splits, heads_k), threads,
                     configs.hip_shared_memory_bytes(cfg),
                     [(Q, size), (Kc, size), (Vc, size), (O, size), (L, 4), *parts, seqlens,
                      *launch_layer.stride_args(Q, Kc, Vc, O), *launch_layer.stride_args(L, dims=2), seqlens_stride,
                      uniform, np.int32(seqlen_q), np.int32(seqlen_new), np.int32(seqlen_max),
                      np.int32(head_dim), np.int32(heads_q // heads_k), np.int32(left),
                      np.int32(right), np.int32(splits), np.int32(m_blocks),
                      np.float32(scale / softcap if softcap else 0.0), np.float32(score_scale),
                      np.float32(score_scale * launch_layer.LOG2_E)], batch)
        if splits > 1:
            # one wave per query row, cfg.warps rows per block (NUM_WAVES of the module)
            launch_layer.launch_args(merge, (-(-rows_bhs // cfg.warps), 1), threads, 0,
                         [*parts, (O, size), (L, 4), *launch_layer.stride_args(O), *launch_layer.stride_args(L, dims=2),
                          np.int32(heads_q), np.int32(seqlen_q), np.int32(head_dim), np.int32(splits)],
                         batch)
