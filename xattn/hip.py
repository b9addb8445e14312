"""The "hip" backend: launches the kernels of kernels_hip/ through a ROCm build of CuPy (hiprtc).

The same contract as xattn/cuda.py: arrays in the (B, H, S, D) view with any batch, head and row
strides and a contiguous last dimension, as torch tensors or CuPy arrays; nothing is copied; work
runs on the device that holds the arrays and on the stream the caller passes. The kernel and its
tiles come from the device's gcnArchName (configs.select_hip): the MFMA kernel for float16 and
bfloat16 on CDNA (gfx908, gfx90a, gfx94x, gfx95x), the WMMA kernel on RDNA3/RDNA4 where the table
has a row, the portable FMA kernel for float32 and elsewhere. The backward (delta, then dK/dV and
dQ in two kernels without atomics) follows the same choice per dtype and head dim
(configs.select_hip_backward).

Every kernel takes one parameter block by value, as the CUDA kernels do: AttnParams for the
attention kernels, DecodeParams for the decode (kernels_common/params.h). The blocks, the plan
cache, pointer patching, batch chunking and the driver launch are the vendor-neutral launch layer's
(xattn/launch.py), shared with xattn/cuda.py: the same variant flags and scalars
(launch.variant), the same (1, H, T, D) views of batch stride 0 for packed batches
(launch.packed), the same vendor-neutral logic in kernels_common/attention_common.h.

Sinks: every forward kernel folds them into out and lse in its epilogue (HAS_SINKS), the decode
reads its sinks pointer at run time (epilogue with one split, merge with several); the backward
needs nothing of them. FP8 KV caches: the portable decode (KV_FP8). Both have run only on NVIDIA
GPUs, through the portable kernels (on_cuda below), and have been compiled for AMD targets
(ci/hip_compile.py); no AMD GPU has run them.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

from xattn import configs, jit, kernels, params
from xattn import launch as launch_layer  # the vendor-neutral launch layer (hip.launch is ours)

MAX_GRID_YZ = launch_layer.MAX_GRID_YZ  # gridDim.y and gridDim.z: the batch is walked in chunks


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


def _compiler(x, direction: str):
    """(compile, gcnArchName) for a launch on x's device: hiprtc (kernels.Kernel.compile, CuPy
    RawModule) and the device's own target, or while on_cuda is active, its NVRTC compile and the
    target it was given for `direction`. compile(kernel, defines, device): kernel is the entry
    point's kernels.Kernel."""
    if _served is not None:
        return _served.compile, _served.targets[direction]
    return kernels.Kernel.compile, _arch(launch_layer.describe(x).device)


def _signature(arrays) -> tuple:
    return tuple((a.dtype, a.shape, a.strides) for a in arrays)


def _variant_pointers(pointers: dict, slopes, cu_seqlens) -> dict:
    """The pointers of the variant's arrays (ALiBi slopes, the packed batch's offsets), added."""
    if slopes is not None:
        pointers["alibi_slopes"] = slopes.ptr
    if cu_seqlens is not None:
        pointers["cu_seqlens_q"], pointers["cu_seqlens_k"] = (launch_layer.describe(c).ptr
                                                              for c in cu_seqlens)
    return pointers


def forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int, window=(-1, -1),
            softcap: float = 0.0, alibi_slopes=None, cu_seqlens=None, max_seqlen=None,
            sinks=None, block_table=None, seqused_k=None) -> None:
    """Write out = softmax(scale * q k^T + modifiers) v and lse for (B, H, S, D) views: the
    contract of xattn.cuda.forward, variants included (window, softcap, alibi_slopes, packed
    batches through cu_seqlens and max_seqlen, paged keys and values through block_table and
    seqused_k: on the portable kernel only, sinks: float32 (Hq,) on the device, folded into out
    and lse by every forward kernel's epilogue, HAS_SINKS)."""
    launch(*_compiler(q, "forward"), q, k, v, out, lse, causal=causal, scale=scale,
           stream=stream, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
           cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, block_table=block_table,
           seqused_k=seqused_k, sinks=sinks)


def _problem(arrays, cu_seqlens, max_seqlen, paged: bool = False):
    """(described arrays, batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim) of a call; a
    packed batch is one (1, H, T, D) entry of batch stride 0 (launch_layer.packed) and its lengths are
    the longest sequence's. paged: k and v (the second and third arrays) are pages, not packed."""
    varlen = cu_seqlens is not None
    described = [launch_layer.packed(launch_layer.describe(a), varlen and not (paged and i in (1, 2)))
                 for i, a in enumerate(arrays)]
    Q, K = described[0], described[1]
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    if varlen:
        batch = cu_seqlens[0].shape[0] - 1
        seqlen_q, seqlen_k = max_seqlen
    return described, batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim


def launch(compile, target: str, q, k, v, out, lse, *, causal: bool, scale: float, stream: int,
           window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, cu_seqlens=None,
           max_seqlen=None, block_table=None, seqused_k=None, sinks=None) -> None:
    """The forward on a device of gcnArchName `target`, its kernel from compile(kernel, defines,
    device) -> cupy.RawKernel. Everything else -- row choice, variant flags, the AttnParams
    block (the launch layer's, as on CUDA), grid, launch -- is the hip backend's. Shared with
    tests/test_hip_portable.py, which compiles the portable kernel for an NVIDIA GPU with NVRTC."""
    arrays, batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim = _problem(
        (q, k, v, out, lse), cu_seqlens, max_seqlen, paged=block_table is not None)
    if batch == 0 or heads_q == 0 or seqlen_q == 0:
        return
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} heads are supported, got {heads_q}")
    Q, K, V, O, L = arrays
    slopes = launch_layer.describe(alibi_slopes) if alibi_slopes is not None else None
    vec = launch_layer.vec_loads([Q, K, V, O], head_dim, launch_layer.itemsize(Q.dtype))
    paged = launch_layer.paged_of(K, block_table)
    key = ("hip", "fwd", compile, target, Q.device, batch, _signature(arrays), causal, scale,
           tuple(window), softcap, _signature([slopes]) if slopes is not None else None,
           cu_seqlens is not None, max_seqlen, vec, paged, sinks is not None)
    steps = launch_layer.cached_plan(key, lambda: _plan_forward(
        compile, target, arrays, batch, heads_k, seqlen_q, seqlen_k, causal=causal, scale=scale,
        window=window, softcap=softcap, slopes=slopes, varlen=cu_seqlens is not None, vec=vec,
        paged=paged, sinks=sinks is not None))
    pointers = {"q": Q.ptr, "k": K.ptr, "v": V.ptr, "o": O.ptr, "lse": L.ptr}
    _variant_pointers(pointers, slopes, None)
    if sinks is not None:
        pointers["sinks"] = launch_layer.describe(sinks).ptr
    launch_layer.paged_pointers(pointers, cu_seqlens, block_table, seqused_k)
    launch_layer.run(steps, pointers, stream, Q.device)


def _plan_forward(compile, target, arrays, batch, heads_k, seqlen_q, seqlen_k, *, causal, scale,
                  window, softcap, slopes, varlen, vec, paged=None, sinks=False):
    """(the forward's one launch,): its row, defines, AttnParams block and grid. Paged keys
    (launch.Paged) take the portable row: the MFMA/WMMA forwards have no paged loads. sinks: the
    HAS_SINKS variant (only then, so that the other variants compile exactly as without it)."""
    Q, K, V, O, L = arrays
    heads_q, head_dim = Q.shape[1], Q.shape[3]
    var = launch_layer.variant(causal=causal, scale=scale, window=window, softcap=softcap,
                               alibi_slopes=slopes, varlen=varlen, seqlen_q=seqlen_q,
                               seqlen_k=seqlen_k, heads_per_kv=heads_q // heads_k, paged=paged)
    has_right_edge = bool(var.defines["IS_CAUSAL"])
    cfg = configs.select_hip(Q.dtype, target, head_dim, has_right_edge, paged is not None)
    vec = vec and cfg.kernel in configs.HIP_MFMA_KERNELS
    block = launch_layer.attn_block(var, dict(zip(("q", "k", "v", "o", "lse"), arrays)),
                                    heads_q=heads_q, head_dim=head_dim)
    kernel = kernels.hip(cfg.kernel)
    defines = (kernel.defines(cfg, Q.dtype, causal=has_right_edge, vec=vec) | var.defines
               | ({"HAS_SINKS": 1} if sinks else {}))
    sizes = kernels.Sizes(seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q, heads_k=heads_k)
    return (kernel.launch(defines, sizes, block, batch, Q.device, compile=compile),)


def backward(q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool, scale: float,
             deterministic: bool, stream: int, window=(-1, -1), softcap: float = 0.0,
             alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> None:
    """Write dq, dk, dv for (B, H, S, D) views; lse is the forward's (natural log, float32
    (B, Hq, Sq)). dk and dv are summed over the query heads of each GQA group. The same contract as
    xattn.cuda.backward, variants included; with sinks, lse is the sink forward's and the
    gradients are the sink-softmax's (xattn/torch_ops.py adds dsinks). `deterministic` changes
    nothing here: dQ always comes from its own query-parallel kernel, with no atomics, so every
    run gives the same bits."""
    launch_backward(*_compiler(q, "backward"), q, k, v, out, dout, lse, dq, dk, dv,
                    causal=causal, scale=scale, stream=stream, window=window, softcap=softcap,
                    alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def launch_backward(compile, target: str, q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool,
                    scale: float, stream: int, window=(-1, -1), softcap: float = 0.0,
                    alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> None:
    """The backward on a device of gcnArchName `target`: delta, then dK/dV and dQ, the kernels
    from compile(kernel, defines, device) as in `launch`. Shared with tests/test_hip_portable.py."""
    import cupy

    varlen = cu_seqlens is not None
    arrays, batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim = _problem(
        (q, k, v, out, dout, lse, dq, dk, dv), cu_seqlens, max_seqlen)
    Q, K, V, O, dO, L, dQ, dK, dV = arrays
    if batch == 0 or heads_q == 0:
        return
    if seqlen_q == 0 or seqlen_k == 0:  # nothing attends: every gradient is zero
        for grad in (dq, dk, dv):
            grad.zero_() if hasattr(grad, "zero_") else grad.fill(0)
        return
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} heads are supported, got {heads_q}")
    slopes = launch_layer.describe(alibi_slopes) if alibi_slopes is not None else None
    vec = launch_layer.vec_loads([Q, K, V, O, dO, dQ, dK, dV], head_dim, launch_layer.itemsize(Q.dtype))
    key = ("hip", "bwd", compile, target, Q.device, batch, _signature(arrays), causal, scale,
           tuple(window), softcap, _signature([slopes]) if slopes is not None else None, varlen, max_seqlen,
           vec)
    steps, delta_shape = launch_layer.cached_plan(key, lambda: _plan_backward(
        compile, target, arrays, batch, heads_k, seqlen_q, seqlen_k, causal=causal, scale=scale,
        window=window, softcap=softcap, slopes=slopes, varlen=varlen, vec=vec))
    with cupy.cuda.Device(Q.device):
        # delta = rowsum(dO * O): float32 scratch from the caller's framework, held until the
        # launches are queued (the caching allocators may hand freed memory out again at once).
        delta = launch_layer.new_like(q, delta_shape, zero=False)
        pointers = {"q": Q.ptr, "k": K.ptr, "v": V.ptr, "o": O.ptr, "dout": dO.ptr, "lse": L.ptr,
                    "dq": dQ.ptr, "dk": dK.ptr, "dv": dV.ptr,
                    "delta": launch_layer.describe(delta).ptr}
        launch_layer.run(steps, _variant_pointers(pointers, slopes, cu_seqlens), stream, Q.device)


def _plan_backward(compile, target, arrays, batch, heads_k, seqlen_q, seqlen_k, *, causal, scale,
                   window, softcap, slopes, varlen, vec):
    """((the launches as one launch.Sequence,), the shape of delta): the preprocess (delta), dK/dV
    (key blocks), dQ (query blocks), on two AttnParams blocks, the preprocess's seeing every row
    of a packed batch as one entry of total_q rows (the Sequence patches each block once per
    call, under one lock)."""
    Q, K, V, O, dO, L, dQ, dK, dV = arrays
    device, dtype = Q.device, Q.dtype
    heads_q, total_q, head_dim = Q.shape[1], Q.shape[2], Q.shape[3]
    var = launch_layer.variant(causal=causal, scale=scale, window=window, softcap=softcap,
                               alibi_slopes=slopes, varlen=varlen, seqlen_q=seqlen_q,
                               seqlen_k=seqlen_k, heads_per_kv=heads_q // heads_k)
    has_right_edge = bool(var.defines["IS_CAUSAL"])
    prep_cfg, dkdv_cfg, dq_cfg = configs.select_hip_backward(dtype, target, head_dim, has_right_edge)
    prep_batch = 1 if varlen else batch
    delta_shape = (prep_batch, heads_q, total_q)
    delta = launch_layer.packed(launch_layer.Array(0, delta_shape, (heads_q * total_q, total_q, 1),
                                                   "float32", device), varlen)
    main = launch_layer.attn_block(var, {"q": Q, "k": K, "v": V, "o": O, "dout": dO, "lse": L,
                                         "dq": dQ, "dk": dK, "dv": dV, "delta": delta},
                                   heads_q=heads_q, head_dim=head_dim)
    prep = main.copy()
    prep["seqlen_q"] = total_q
    prep_kernel = kernels.hip(prep_cfg.kernel)  # no masks, no modifiers, no tiles
    steps = [prep_kernel.launch(prep_kernel.defines(prep_cfg, dtype),
                                kernels.Sizes(seqlen_q=total_q, heads_q=heads_q), prep, prep_batch,
                                device, compile=compile)]
    sizes = kernels.Sizes(seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q, heads_k=heads_k)
    for cfg in (dkdv_cfg, dq_cfg):
        kernel = kernels.hip(cfg.kernel)
        defines = kernel.defines(cfg, dtype, causal=has_right_edge,
                                 vec=vec and cfg.kernel in configs.HIP_MFMA_KERNELS) | var.defines
        steps.append(kernel.launch(defines, sizes, main, batch, device, compile=compile))
    return (launch_layer.Sequence(steps),), delta_shape


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
    compile: object  # compile(kernel, defines, device) -> a launchable kernel
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

    def compile(kernel: kernels.Kernel, defines: dict, device: int):
        if kernel.entry in configs.HIP_MFMA_KERNELS:
            raise ValueError(f"{kernel.entry}: a matrix-core kernel runs on AMD only; on_cuda runs "
                             f"the portable kernels (pick a target without MFMA/WMMA rows for "
                             f"this dtype)")
        key = (prefix, options, device, kernel.entry, tuple(jit.define_options(defines)))
        compiled = _nvrtc_kernels.get(key)
        if compiled is None:
            import cupy

            with cupy.cuda.Device(device):
                code = prefix + jit.preprocess("hip", kernel.source)
                raw = cupy.RawModule(code=code, options=(*options, *key[4])).get_function(kernel.entry)
            compiled = _nvrtc_kernels[key] = raw
        return compiled

    if _served is not None:
        raise RuntimeError("xattn.hip.on_cuda: already active")
    _served = _Served(compile, {"forward": forward_target, "backward": backward_target})
    backends.hip_on_cuda = True
    try:
        yield
    finally:
        backends.hip_on_cuda = False
        _served = None


# ---- KV-cache decode (attention_with_kvcache) -------------------------------------------------

def decode(q, k_cache, v_cache, k_new, v_new, out, lse, cache_seqlens, call, workspace,
           stream: int, block_table=None, sinks=None, scales=(None, None), leftpad=None) -> None:
    """attention_with_kvcache's GPU step on a ROCm device: append k_new/v_new to the caches, then
    split-KV decode (kernels_hip/flash_decode_mfma.hip on MFMA/WMMA for float16/bfloat16 where the
    table has a row, flash_decode_portable.hip otherwise) and, with several splits, the merge.
    Called by xattn.kvcache._run_hip with (B, H, S, D) views, D contiguous (caches: unit stride
    along D), cache_seqlens an int32 device array or None to use call.uniform, `call` the
    validated kvcache call (seqlen_new, uniform, window with causal folded in, softcap, scale),
    workspace(n) -> n float32 elements from the caller's framework. block_table: int32 (B,
    max_pages) on the device, the caches then seen as (num_pages, Hk, page_size, D) (the portable
    decode, IS_PAGED), or None. sinks: float32 (Hq,) on the device, or None. scales: (k_scale,
    v_scale) float32 of one or Hk elements on the device for FP8 caches (call.kv_format: the
    portable decode, KV_FP8), else (None, None). leftpad: int32 (B,) cache_leftpad on the
    device, or None."""
    launch_decode(*_compiler(q, "forward"), q, k_cache, v_cache, k_new, v_new, out, lse,
                  cache_seqlens, call, workspace, stream, block_table, sinks, scales, leftpad)


def launch_decode(compile, target: str, q, k_cache, v_cache, k_new, v_new, out, lse, cache_seqlens,
                  call, workspace, stream: int, block_table=None, sinks=None,
                  scales=(None, None), leftpad=None) -> None:
    """The decode on a device of gcnArchName `target`, its kernels from compile(kernel, defines,
    device) as in `launch`: the append, the decode (the matrix-core row where the table has one,
    else the portable one) and the merge, all three on one DecodeParams block
    (kernels_common/params.h). The plan (rows, defines, split count, the block's strides and
    scalars) is cached per signature, as the forward's; a call patches its pointers and its
    uniform length into the block. block_table: paged caches (their (num_pages, Hk, page_size, D)
    view), or None. sinks and scales: as `decode` takes them; both are pointers the kernels read
    at run time (null: none), the scales' strides in the block. Shared with
    tests/test_hip_decode.py, which compiles the kernels for an NVIDIA GPU."""
    from xattn import kvcache

    Q, Kc, Vc, O, L = (launch_layer.describe(a) for a in (q, k_cache, v_cache, out, lse))
    batch, heads_k = Q.shape[0], Kc.shape[1]
    if batch == 0:
        return
    if heads_k > MAX_GRID_YZ:
        raise ValueError(f"k_cache: at most {MAX_GRID_YZ} heads are supported, got {heads_k}")
    seqlen_new = call.seqlen_new if k_new is not None else 0
    tensors = {"q": Q, "k": Kc, "v": Vc, "o": O, "lse": L}
    if seqlen_new:
        tensors["k_new"], tensors["v_new"] = launch_layer.describe(k_new), launch_layer.describe(v_new)
    S = launch_layer.describe(cache_seqlens) if cache_seqlens is not None else None
    P = launch_layer.describe(leftpad) if leftpad is not None else None
    scale_arrays = tuple(launch_layer.describe(s) for s in scales if s is not None)
    vec = launch_layer.vec_loads([Q, Kc, Vc, O], Q.shape[3], launch_layer.itemsize(Q.dtype))
    paged = launch_layer.paged_of(Kc, block_table)
    # The uniform length is not in the key: a plan serves every length (patched per call below).
    key = ("hip", "decode", compile, target, Q.device, _signature(tensors.values()),
           _signature([S]) if S is not None else None, _signature([P]) if P is not None else None,
           seqlen_new, tuple(call.window),
           call.softcap, call.scale, vec, paged, kvcache._FORCED_SPLITS, call.kv_format,
           _signature(scale_arrays))
    plan = launch_layer.cached_plan(key, lambda: _plan_decode(compile, target, tensors, S, seqlen_new,
                                                              call, vec, paged, scale_arrays, P))
    pointers = {name: a.ptr for name, a in tensors.items()}
    # Every pointer the kernels may read is patched on every call, null where the call has none:
    # the plan (and its block) is shared by calls with and without sinks, and a pointer left
    # from an earlier call would be read as that call's (freed) sinks.
    pointers["cache_seqlens"] = S.ptr if S is not None else 0
    pointers["cache_leftpad"] = P.ptr if P is not None else 0
    pointers["block_table"] = launch_layer.describe(block_table).ptr if paged is not None else 0
    pointers["sinks"] = launch_layer.describe(sinks).ptr if sinks is not None else 0
    if scale_arrays:
        pointers["k_scale"], pointers["v_scale"] = (a.ptr for a in scale_arrays)
    if plan.partials:  # the partials of every split (freed on return: stream-ordered)
        base = launch_layer.describe(workspace(plan.partials * (plan.head_dim + 1))).ptr
        pointers["o_part"], pointers["lse_part"] = base, base + 4 * plan.partials * plan.head_dim
    # The uniform length is a scalar of the block that changes from call to call.
    scalars = {"uniform_seqlen": call.uniform} if S is None else None
    launch_layer.run((lambda ptrs, strm: plan.launches(ptrs, strm, scalars),), pointers, stream,
                     Q.device)


class _DecodePlan(NamedTuple):
    """The decode's launches on one shared DecodeParams block (each kernel reads the fields of its
    role), and the split partials' size: floats per partial row (head_dim + 1) x `partials`."""
    launches: launch_layer.Sequence
    partials: int
    head_dim: int


def _plan_decode(compile, target, tensors, S, seqlen_new, call, vec, paged=None,
                 scales=(), P=None) -> _DecodePlan:
    """The decode's rows, defines, split count, DecodeParams block and launches. paged
    (launch.Paged): the caches are pages, Smax = max_pages * page_size. call.kv_format: FP8
    caches (the portable decode and append with KV_FP8), scales their (k_scale, v_scale)
    Arrays."""
    from xattn import kvcache

    Q, Kc = tensors["q"], tensors["k"]
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k = Kc.shape[1]
    seqlen_max = paged.max_pages * paged.page_size if paged is not None else Kc.shape[2]
    device = Q.device
    kv_fp8 = configs.DECODE_FP8_FORMATS.get(call.kv_format, 0)
    cfg = configs.select_hip_decode(Q.dtype, target, head_dim, paged is not None, bool(kv_fp8))
    # The merge and the append: entry points of the portable decode's source, from the portable
    # row of the decode row's head dim (the partials are rows of that many floats).
    aux = cfg if cfg.kernel == configs.HIP_DECODE_KERNEL else configs.hip_decode_aux_row(target, cfg.head_dim)
    # Window bounds past every key distance are unbounded (-1), as on CUDA (kvcache._plan).
    left, right = ((-1 if w >= seqlen_max + seqlen_q else w) for w in call.window)
    flags = {"IS_LOCAL": int(left >= 0), "HAS_SOFTCAP": int(bool(call.softcap))}
    if paged is not None:  # the decode and the append (one source) find rows through the pages
        flags["IS_PAGED"] = 1
    if kv_fp8:  # the decode reads and the append writes FP8 codes (the merge reads neither)
        flags["KV_FP8"] = kv_fp8
    decode = kernels.hip(cfg.kernel)
    defines = decode.defines(cfg, Q.dtype, causal=right >= 0,
                             vec=vec and cfg.kernel in configs.HIP_MFMA_KERNELS) | flags
    # The merge and the append take the portable decode's defines (one source).
    aux_defines = kernels.hip(aux.kernel).defines(aux, Q.dtype, causal=right >= 0) | flags
    merge_defines = {name: value for name, value in aux_defines.items() if name != "KV_FP8"}
    rows = (heads_q // heads_k) * seqlen_q
    m_blocks = -(-rows // cfg.block_m)
    band = seqlen_max  # the keys one sequence's queries can see span at most left + right + Sq
    if left >= 0:
        band = min(band, left + seqlen_q + max(right, 0))
    splits = kvcache.num_splits(m_blocks * heads_k * batch, launch_layer.multiprocessors(device),
                                max(1, -(-band // cfg.block_n)), 1)
    if m_blocks * splits >= 2**31:
        raise ValueError(f"q: too many query rows per kv head ({rows})")

    block = params.decode_params()
    for name, a in tensors.items():
        params.set_tensor(block, name, 0, a.strides[:3])
    if S is not None:
        block["seqlens_stride"] = S.strides[0]
    if P is not None:  # cache_leftpad
        block["leftpad_stride"] = P.strides[0]
    block["heads_q"], block["heads_per_kv"], block["seqlen_q"] = heads_q, heads_q // heads_k, seqlen_q
    block["seqlen_new"], block["seqlen_max"], block["head_dim"] = seqlen_new, seqlen_max, head_dim
    block["window_left"], block["window_right"] = left, right
    block["num_splits"], block["m_blocks"] = splits, m_blocks
    for field, value in launch_layer.decode_scales(call.scale, call.softcap).items():
        block[field] = value
    if paged is not None:  # the caches' batch strides (set above) are the page strides
        block["page_size"], block["num_pages"] = paged.page_size, paged.num_pages
        block["block_table_stride"] = paged.table_stride
    if kv_fp8:  # one scale per tensor (stride 0) or per kv head
        for field, a in zip(("k_scale_stride", "v_scale_stride"), scales):
            block[field] = 0 if math.prod(a.shape) == 1 else a.strides[0]

    sizes = kernels.Sizes(seqlen_q=seqlen_q, heads_q=heads_q, heads_k=heads_k, head_dim=head_dim,
                          seqlen_new=seqlen_new, m_blocks=m_blocks, splits=splits)

    def step(kernel, kernel_defines):
        return kernel.launch(kernel_defines, sizes, block, batch, device, compile=compile)

    steps = []
    if seqlen_new:  # one thread per appended element of a batch entry
        steps.append(step(kernels.hip("kvcache_append_portable"), aux_defines))
    if seqlen_q:
        steps.append(step(decode, defines))
    partials = 0
    if seqlen_q and splits > 1:  # one wave per query row
        steps.append(step(kernels.hip("flash_decode_merge_portable"), merge_defines))
        partials = batch * heads_q * seqlen_q * splits
    return _DecodePlan(launch_layer.Sequence(steps), partials, cfg.head_dim)
