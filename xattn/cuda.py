"""The "cuda" backend: launches the kernels of kernels_cuda/ through CuPy.

Arrays arrive in the (B, H, S, D) view with any batch, head and row strides and a contiguous last
dimension, as torch tensors or CuPy arrays; nothing is copied. Only the pointer, shape, strides and
dtype are read, so bfloat16 works without CuPy knowing that type. Work is launched on the device
that holds the arrays and on the stream the caller passes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from xattn import configs, jit, kernels, launch

# Attention sinks fused into the forward kernels' epilogue (HAS_SINKS). False: the forward runs
# without them and the sinks are folded into out and lse afterwards by array ops (one more pass
# over out), the switch if the fused epilogue misbehaves on a device.
FUSED_SINKS = True

# The Hopper backward (xattn/sm90.py: flash_bwd.cu) wherever it serves a call on compute capability
# 9.0. False: the mma.sync kernels serve every backward (the switch if the sm90 kernel misbehaves
# on a device; ci/sm90_bwd_check.py flips it to time both). Plans are keyed by it (and by
# FUSED_SINKS), so flipping either takes effect at the next call.
SM90_BACKWARD = True


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


_arch_cache: dict[int, int] = {}


def _arch(device_id: int) -> int:
    arch = _arch_cache.get(device_id)
    if arch is None:
        import cupy

        arch = _arch_cache[device_id] = int(cupy.cuda.Device(device_id).compute_capability)
    return arch


# ---- plans: what a call of one signature launches ---------------------------------------------
# A plan is built on the first call of a signature (shapes, strides, dtype, device, options and
# whether the pointers are 16-byte aligned) and kept: later calls look it up, patch the pointers
# into its parameter blocks and launch. Nothing per call depends on anything but the pointers.

# The launch layer's plan cache, parameter-block packing and launch sequence (xattn/launch.py, shared
# with the hip backend), under the names this module and sm90.py use.
_cached_plan, _attn_params, _run = launch.cached_plan, launch.attn_block, launch.run


def forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int, window=(-1, -1),
            softcap: float = 0.0, alibi_slopes=None, cu_seqlens=None, max_seqlen=None,
            sinks=None, block_table=None, seqused_k=None) -> None:
    """Write out = softmax(scale * q k^T + modifiers) v and lse for (B, H, S, D) views (see the
    module docstring). window: (left, right), -1 unbounded; softcap: 0 for none; alibi_slopes:
    float32 (Hq,) or (B, Hq) on the device. Packed batches: q, k, v, out are (1, H, T, D) views,
    lse (1, Hq, Tq), cu_seqlens = (cu_seqlens_q, cu_seqlens_k) int32 on the device and
    max_seqlen = (max_seqlen_q, max_seqlen_k). sinks: float32 (Hq,) on the device, or None.
    Paged keys and values (a packed batch only): k and v are (num_pages, Hk, page_size, D) views of
    the (num_pages, page_size, Hk, D) caches, block_table int32 (B, max_pages) and seqused_k int32
    (B,) or None (then cu_seqlens_k gives the key counts; cu_seqlens_k may be None with it), all on
    the device and never read here: the kernel clamps (attention_common.h)."""
    if sinks is not None and not FUSED_SINKS:
        forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream, window=window,
                softcap=softcap, alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen, block_table=block_table, seqused_k=seqused_k)
        return fold_sinks(out, lse, sinks)
    varlen = cu_seqlens is not None
    Q, K, V, O, L = (launch.packed(launch.describe(a), varlen) for a in (q, k, v, out, lse))
    if block_table is not None:  # pages: the batch stride of k and v is the page stride
        K, V = launch.describe(k), launch.describe(v)
    batch, heads_q, seqlen_q, head_dim = Q.shape
    if varlen:
        batch = cu_seqlens[0].shape[0] - 1
        seqlen_q = max_seqlen[0]
    if batch == 0 or heads_q == 0 or seqlen_q == 0:
        return
    if heads_q > launch.MAX_GRID_YZ:
        raise ValueError(f"q: at most {launch.MAX_GRID_YZ} heads are supported, got {heads_q}")
    options = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    # Hopper: the wgmma/TMA kernel where it serves the call (never paged keys: those take
    # flash_fwd.cu's IS_PAGED variant).
    if _arch(Q.device) == 90 and block_table is None:
        from xattn import sm90
        if sm90.supports(q, k, v, out, lse, **options):
            return sm90.forward(q, k, v, out, lse, scale=scale, stream=stream, sinks=sinks, **options)
    pointers = {"q": Q.ptr, "k": K.ptr, "v": V.ptr, "o": O.ptr, "lse": L.ptr}
    slopes = launch.describe(alibi_slopes) if alibi_slopes is not None else None
    if slopes is not None:
        pointers["alibi_slopes"] = slopes.ptr
    launch.paged_pointers(pointers, cu_seqlens, block_table, seqused_k)
    if sinks is not None:
        pointers["sinks"] = launch.describe(sinks).ptr
    vec = launch.vec_loads([Q, K, V, O], head_dim, launch.itemsize(Q.dtype))
    paged = launch.paged_of(K, block_table)
    key = ("fwd", Q.dtype, Q.device, batch, Q.shape, K.shape, Q.strides, K.strides, V.strides,
           O.strides, L.strides, causal, scale, tuple(window), softcap,
           slopes.shape if slopes is not None else None, max_seqlen, vec, sinks is not None, paged)
    steps = _cached_plan(key, lambda: _plan_forward(Q, K, V, O, L, batch, causal=causal, scale=scale,
                                                    window=window, softcap=softcap, slopes=slopes,
                                                    varlen=varlen, max_seqlen=max_seqlen, vec=vec,
                                                    sinks=sinks is not None, paged=paged))
    _run(steps, pointers, stream, Q.device)


def fold_sinks(out, lse, sinks):
    """FUSED_SINKS off (and calls with no key at all): fold the sinks into a finished forward's
    (B, H, S, D) out and (B, H, S) lse in place, with the array library's own ops (torch or CuPy):
    lse' = logaddexp(lse, sink), out *= exp(lse - lse') (0 for a row of lse -inf)."""
    if type(lse).__module__.startswith("torch"):
        import torch as xp
    else:
        import cupy as xp
    new_lse = xp.logaddexp(lse, sinks[None, :, None])
    weight = xp.where(lse == -math.inf, 0.0, xp.exp(lse - new_lse))
    out *= weight[..., None]
    lse[...] = new_lse


def _plan_forward(Q, K, V, O, L, batch, *, causal, scale, window, softcap, slopes, varlen,
                  max_seqlen, vec, sinks=False, paged=None):
    heads_q, total_q, head_dim = Q.shape[1], Q.shape[2], Q.shape[3]
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    seqlen_q = max_seqlen[0] if varlen else total_q
    if varlen:
        seqlen_k = max_seqlen[1]
    var = launch.variant(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=slopes,
                   varlen=varlen, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_per_kv=heads_q // heads_k,
                   paged=paged)
    has_right_edge = bool(var.defines["IS_CAUSAL"])
    kernel_name = configs.KERNEL_FOR_DTYPE[Q.dtype]
    cfg = configs.select(kernel_name, _arch(Q.device), head_dim, has_right_edge)
    if paged is not None:
        cfg = configs.paged_forward_row(cfg)
    vec = vec and kernel_name in configs.TENSOR_CORE_KERNELS
    block = _attn_params(var, {"q": Q, "k": K, "v": V, "o": O, "lse": L}, heads_q=heads_q,
                         head_dim=head_dim)
    kernel = kernels.cuda(kernel_name)
    # HAS_SINKS only where sinks are given: the other variants compile exactly as without sinks.
    defines = (kernel.defines(cfg, Q.dtype, causal=has_right_edge, vec=vec) | var.defines
               | ({"HAS_SINKS": 1} if sinks else {}))
    sizes = kernels.Sizes(seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q, heads_k=heads_k)
    return (kernel.launch(defines, sizes, block, batch, Q.device),)


# ---- the call path: a validated Call on torch tensors ------------------------------------------
# xattn.dispatch sends GPU torch tensors here with their Call (xattn/call.py). The Call fixes
# shapes, strides, dtype and options, so its plans live on it (call.plans); a call reads the
# pointers, allocates the outputs from torch's allocator and launches on torch's current stream.
# What a plan does not cover (no work at all, a strided last dimension, a negative-bit view) takes
# the general path, arrays.run_on_gpu -> forward(). On Hopper, calls the sm90 kernel serves get
# its plan (xattn/sm90.py).

def attention(call, q, k, v, alibi_slopes=None, cu_seqlens=None, sinks=None):
    """(out, lse) of a validated Call on CUDA torch tensors."""
    q_ptr, k_ptr, v_ptr = q.data_ptr(), k.data_ptr(), v.data_ptr()
    aligned = not ((q_ptr | k_ptr | v_ptr) & 15)
    key = ("fwd", aligned, FUSED_SINKS)
    plan = call.plans.get(key, _UNPLANNED)
    if plan is _UNPLANNED:
        plan = call.plans[key] = _call_forward_plan(call, q, k, v, alibi_slopes,
                                                                 cu_seqlens, aligned)
    if plan is None:
        from xattn import arrays
        return arrays.run_on_gpu(forward, q, k, v, _info(call), layout=call.layout,
                                 dims=call.dims, **call.options(alibi_slopes, cu_seqlens, sinks))
    steps, (new_out, new_lse) = plan
    out, lse = new_out(), new_lse()
    pointers = {"q": q_ptr, "k": k_ptr, "v": v_ptr, "o": out.data_ptr(), "lse": lse.data_ptr()}
    if alibi_slopes is not None:
        pointers["alibi_slopes"] = alibi_slopes.data_ptr()
    if cu_seqlens is not None:
        pointers["cu_seqlens_q"], pointers["cu_seqlens_k"] = (c.data_ptr() for c in cu_seqlens)
    if sinks is not None:
        pointers["sinks"] = sinks.data_ptr()
    _run(steps, pointers, launch.torch_stream(q.device.index), q.device.index)
    return out, lse


def _allocator(shape, dtype, device):
    """A plan's allocator of fresh contiguous (shape, dtype) tensors on `device`: torch.empty_like
    of one element expanded to the shape (the plan holds no memory of its own), which skips most
    of torch.empty's argument parsing (a few microseconds a call on the host)."""
    import torch

    like = torch.empty(1, dtype=dtype, device=device).expand(shape)
    return functools.partial(torch.empty_like, like, memory_format=torch.contiguous_format)


def attention_backward(call, dout, q, k, v, out, lse, alibi_slopes=None, cu_seqlens=None):
    """(dq, dk, dv) of a validated Call on CUDA torch tensors, each contiguous in its layout."""
    if dout.shape[-1] > 1 and dout.stride(-1) != 1:  # e.g. the gradient of out.sum(): copied once
        dout = dout.contiguous()
    pointers = {"q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "o": out.data_ptr(),
                "dout": dout.data_ptr(), "lse": lse.data_ptr()}
    aligned = not ((pointers["q"] | pointers["k"] | pointers["v"] | pointers["dout"]
                    | pointers["o"]) & 15)
    key = ("bwd", dout.stride(), out.stride(), aligned, SM90_BACKWARD)  # the switch: see above
    plan = call.plans.get(key, _UNPLANNED)
    if plan is _UNPLANNED:
        plan = call.plans[key] = _call_backward_plan(call, dout, q, k, v, out, lse, alibi_slopes,
                                                     cu_seqlens, aligned)
    if plan is None:
        from xattn import torch_ops
        dq, dk, dv = (x.new_empty(x.shape) for x in (q, k, v))
        if dq.numel() == 0 or dk.numel() == 0:  # no rows, or no keys: no gradient flows
            return tuple(g.zero_() for g in (dq, dk, dv))
        return torch_ops.backward_gpu(backward, dout, q, k, v, out, lse, layout=call.layout,
                                      deterministic=call.deterministic,
                                      **call.options(alibi_slopes, cu_seqlens))
    steps, scratch, (new_dq, new_dk, new_dv, new_scratch) = plan
    dq, dk, dv = new_dq(), new_dk(), new_dv()
    # One float32 scratch buffer from torch's allocator, on its stream: delta, then dQ's
    # accumulator (zeroed by the delta kernel). Held until the launches are queued.
    buffer = new_scratch()
    pointers["dq"], pointers["dk"], pointers["dv"] = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    pointers.update(scratch.pointers(buffer.data_ptr()))
    if alibi_slopes is not None:
        pointers["alibi_slopes"] = alibi_slopes.data_ptr()
    if cu_seqlens is not None:
        pointers["cu_seqlens_q"], pointers["cu_seqlens_k"] = (c.data_ptr() for c in cu_seqlens)
    _run(steps, pointers, launch.torch_stream(q.device.index), q.device.index)
    return dq, dk, dv


_UNPLANNED = object()


def _info(call):
    from xattn import arrays
    return arrays.ArrayInfo(call.library, call.device, call.device_id, call.dtype, call.q_shape)


def _kernel_views(call, *tensors):
    """(B, H, S, D) _Arrays of tensors in the call's layout (a plan patches the pointers per call;
    these only shape it), packed batches with batch stride 0; None where a tensor's last dimension
    is strided."""
    described = []
    for t in tensors:
        a = launch.describe(t)
        if a.shape[-1] > 1 and a.strides[-1] != 1:
            return None
        if call.layout == "bshd" and len(a.shape) == 4:
            a = a._replace(shape=(a.shape[0], a.shape[2], a.shape[1], a.shape[3]),
                           strides=(a.strides[0], a.strides[2], a.strides[1], a.strides[3]))
        described.append(launch.packed(a, call.varlen))
    return described


def _call_forward_plan(call, q, k, v, alibi_slopes, cu_seqlens, aligned):
    """The forward plan of a Call: (steps, what out and lse are allocated like), or None where
    the general path serves it."""
    steps = _call_forward_steps(call, q, k, v, alibi_slopes, cu_seqlens, aligned)
    if steps is None:
        return None
    return (launch.Sequence(steps),), (_allocator(call.q_shape, q.dtype, q.device),
                                       _allocator(call.lse_shape, _float32(), q.device))


def _float32():
    import torch
    return torch.float32


def _call_forward_steps(call, q, k, v, alibi_slopes, cu_seqlens, aligned):
    """The forward plan's steps for a Call (None: the general path serves it)."""
    import torch

    batch, heads_q, seqlen_q, seqlen_k, head_dim = call.dims
    if batch == 0 or heads_q == 0 or seqlen_q == 0 or seqlen_k == 0 or heads_q > launch.MAX_GRID_YZ:
        return None
    if any(t.is_neg() for t in (q, k, v)) or (call.sinks and not FUSED_SINKS):
        return None
    if call.paged is not None:  # paged keys: forward()'s own plan (its pointers include the table)
        return None
    out = torch.empty(call.q_shape, dtype=q.dtype, device=q.device)
    views = _kernel_views(call, q, k, v, out)
    if views is None:
        return None
    Q, K, V, O = views
    L = launch.Array(0, call.lse_shape, (call.heads_q * call.seqlen_q, call.seqlen_q, 1), "float32",
               Q.device)
    L = launch.packed(L, call.varlen)
    slopes = launch.describe(alibi_slopes) if alibi_slopes is not None else None
    if _arch(Q.device) == 90 and _sm90_serves(call, q, k, v, out, alibi_slopes, cu_seqlens):
        from xattn import sm90
        return (sm90.plan(Q, K, V, O, L, causal=call.causal, scale=call.scale, window=call.window,
                          softcap=call.softcap, slopes=slopes, batch=call.batch,
                          max_seqlen=call.max_seqlen if call.varlen else None,
                          sinks=call.sinks),)
    vec = aligned and launch.vec_loads([Q, K, V, O], head_dim, launch.itemsize(Q.dtype))
    return _plan_forward(Q, K, V, O, L, call.batch, causal=call.causal, scale=call.scale,
                         window=call.window, softcap=call.softcap, slopes=slopes,
                         varlen=call.varlen, max_seqlen=call.max_seqlen, vec=vec,
                         sinks=call.sinks)


def _sm90_serves(call, q, k, v, out, alibi_slopes, cu_seqlens) -> bool:
    """Whether the Hopper kernel (xattn/sm90.py) takes this call's forward."""
    from xattn import sm90

    def bhsd(t):
        return t.transpose(1, 2) if call.layout == "bshd" else t

    lse = out.new_empty(call.lse_shape, dtype=out.new_empty(0).float().dtype)
    return sm90.supports(bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse, causal=call.causal,
                         window=call.window, softcap=call.softcap, alibi_slopes=alibi_slopes,
                         cu_seqlens=cu_seqlens, max_seqlen=call.max_seqlen)


def _call_backward_plan(call, dout, q, k, v, out, lse, alibi_slopes, cu_seqlens, aligned):
    """The backward plan (steps, scratch) for a Call and dout's strides (None: the general
    path serves it)."""
    import torch

    batch, heads_q, seqlen_q, seqlen_k, head_dim = call.dims
    if batch == 0 or heads_q == 0 or seqlen_q == 0 or seqlen_k == 0 or heads_q > launch.MAX_GRID_YZ:
        return None
    if any(t.is_neg() for t in (q, k, v, out, dout)):
        return None
    grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
    views = _kernel_views(call, q, k, v, out, dout, *grads)
    if views is None:
        return None
    Q, K, V, O, dO, dQ, dK, dV = views
    L = launch.packed(launch.Array(0, call.lse_shape, (call.heads_q * call.seqlen_q, call.seqlen_q, 1),
                       "float32", Q.device), call.varlen)
    if tuple(lse.stride()) != (call.heads_q * call.seqlen_q, call.seqlen_q, 1):
        return None
    vec = aligned and launch.vec_loads([Q, K, V, O, dO, dQ, dK, dV], head_dim, launch.itemsize(Q.dtype))
    slopes = launch.describe(alibi_slopes) if alibi_slopes is not None else None
    steps, scratch = _plan_backward(Q, K, V, O, dO, L, dQ, dK, dV, call.batch, causal=call.causal,
                                    scale=call.scale, window=call.window, softcap=call.softcap,
                                    slopes=slopes, varlen=call.varlen, max_seqlen=call.max_seqlen,
                                    deterministic=call.deterministic, vec=vec)
    allocators = tuple(_allocator(x.shape, x.dtype, x.device) for x in (q, k, v)) + (
        _allocator((scratch.floats,), _float32(), q.device),)
    return steps, scratch, allocators


class _Scratch(NamedTuple):
    """The backward's float32 scratch, one buffer: delta at its start, then (dQ by atomics) the
    accumulator at accum_offset floats."""
    floats: int
    accum_offset: int | None

    def pointers(self, base: int) -> dict:
        if self.accum_offset is None:
            return {"delta": base}
        return {"delta": base, "dq_accum": base + 4 * self.accum_offset}


_SCRATCH_ALIGN = 64  # floats: the accumulator starts 256-byte aligned (paired float atomics)


def backward(q, k, v, out, dout, lse, dq, dk, dv, *, causal: bool, scale: float,
             deterministic: bool, stream: int, window=(-1, -1), softcap: float = 0.0,
             alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> None:
    """Write dq, dk, dv for (B, H, S, D) views; lse is the forward's. dk and dv are summed over the
    query heads of each GQA group. deterministic: dQ from its own kernel instead of atomics (the
    CUDA-core path, float32 and head dims past the tensor-core rows, uses no atomics either way).
    window, softcap, alibi_slopes, cu_seqlens, max_seqlen: as in forward."""
    varlen = cu_seqlens is not None
    Q, K, V, O, dO, L, dQ, dK, dV = (launch.packed(launch.describe(a), varlen)
                                     for a in (q, k, v, out, dout, lse, dq, dk, dv))
    batch, heads_q, total_q, head_dim = Q.shape  # total_q: every query row (packed: all sequences)
    seqlen_q, seqlen_k = total_q, K.shape[2]
    if varlen:
        batch = cu_seqlens[0].shape[0] - 1
        seqlen_q, seqlen_k = max_seqlen
    if batch == 0 or heads_q == 0:
        return
    if seqlen_q == 0 or seqlen_k == 0:  # nothing attends: every gradient is zero
        for grad in (dq, dk, dv):
            grad.zero_() if hasattr(grad, "zero_") else grad.fill(0)
        return
    if heads_q > launch.MAX_GRID_YZ:
        raise ValueError(f"q: at most {launch.MAX_GRID_YZ} heads are supported, got {heads_q}")

    device = Q.device
    vec = launch.vec_loads([Q, K, V, O, dO, dQ, dK, dV], head_dim, launch.itemsize(Q.dtype))
    slopes = launch.describe(alibi_slopes) if alibi_slopes is not None else None
    key = ("bwd", Q.dtype, device, batch, Q.shape, K.shape, Q.strides, K.strides, V.strides,
           O.strides, dO.strides, L.strides, dQ.strides, dK.strides, dV.strides, causal, scale,
           tuple(window), softcap, slopes.shape if slopes is not None else None, max_seqlen,
           deterministic, vec, SM90_BACKWARD)
    plan = _cached_plan(key, lambda: _plan_backward(
        Q, K, V, O, dO, L, dQ, dK, dV, batch, causal=causal, scale=scale, window=window,
        softcap=softcap, slopes=slopes, varlen=varlen, max_seqlen=max_seqlen,
        deterministic=deterministic, vec=vec))
    steps, scratch = plan
    # One float32 scratch buffer from the caller's framework, on its stream: delta, then dQ's
    # accumulator (zeroed by the delta kernel). Held until the launches are queued: the caching
    # allocators may reuse memory freed earlier.
    buffer = launch.new_like(q, (scratch.floats,), zero=False)
    pointers = {"q": Q.ptr, "k": K.ptr, "v": V.ptr, "o": O.ptr, "dout": dO.ptr, "lse": L.ptr,
                "dq": dQ.ptr, "dk": dK.ptr, "dv": dV.ptr,
                **scratch.pointers(launch.describe(buffer).ptr)}
    if slopes is not None:
        pointers["alibi_slopes"] = slopes.ptr
    if varlen:
        pointers["cu_seqlens_q"], pointers["cu_seqlens_k"] = (launch.describe(c).ptr for c in cu_seqlens)
    _run(steps, pointers, stream, device)


def sm90_backward_planned() -> bool:
    """Whether a cached backward plan of `backward` (key "bwd": ((launch.Sequence,), scratch))
    launches the sm90 kernel, the only one with a tensor map for dk: how checks and tests see which
    kernel served a call."""
    plans = [plan for key, plan in list(launch._plans.items()) if key[0] == "bwd"]
    if not plans:
        raise RuntimeError("no backward plan is cached: nothing to inspect")
    return any(any(m[0] == "dk" for m in step.maps)
               for sequences, _ in plans for sequence in sequences for step in sequence.launches)


def _plan_backward(Q, K, V, O, dO, L, dQ, dK, dV, batch, *, causal, scale, window, softcap, slopes,
                   varlen, max_seqlen, deterministic, vec):
    """((the launches as one launch.Sequence,), scratch shapes): delta = rowsum(dO * O), then
    dK/dV (and dQ by atomics, converted after) or, deterministic, dK/dV and dQ from separate
    kernels; the CUDA-core pair where the tensor-core table has no row. On Hopper the dK/dV
    kernel is the wgmma one (xattn/sm90.py) wherever it serves the call, with or without dQ. The launches share
    two parameter blocks (the row-wise kernels' and the others'): the Sequence patches each once
    per call, under one lock, so threads sharing the plan take turns."""
    device, arch, dtype = Q.device, _arch(Q.device), Q.dtype
    heads_q, total_q, head_dim = Q.shape[1], Q.shape[2], Q.shape[3]
    heads_k = K.shape[1]
    seqlen_q, seqlen_k = max_seqlen if varlen else (total_q, K.shape[2])
    var = launch.variant(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=slopes,
                   varlen=varlen, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_per_kv=heads_q // heads_k)
    has_right_edge = bool(var.defines["IS_CAUSAL"])
    simt = _backward_on_cuda_cores(dtype, arch, head_dim, has_right_edge)
    vec = vec and not simt
    # The row-wise kernels (delta, dQ conversion) see a packed batch as one entry of total_q rows.
    prep_batch = 1 if varlen else batch
    delta_floats = prep_batch * heads_q * total_q
    delta = launch.packed(launch.Array(0, (prep_batch, heads_q, total_q), (heads_q * total_q, total_q, 1),
                           "float32", device), varlen)
    scratch = _Scratch(delta_floats, None)
    tensors = {"q": Q, "k": K, "v": V, "o": O, "dout": dO, "lse": L, "dq": dQ, "dk": dK, "dv": dV,
               "delta": delta}
    accum = None
    if not simt and not deterministic:
        offset = -(-delta_floats // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
        scratch = _Scratch(offset + delta_floats * head_dim, offset)
        accum = launch.packed(launch.Array(0, (prep_batch, heads_q, total_q, head_dim),
                               (heads_q * total_q * head_dim, total_q * head_dim, head_dim),
                               "float32", device), varlen)
        tensors["dq_accum"] = accum
    main = _attn_params(var, tensors, heads_q=heads_q, head_dim=head_dim)
    # The prep kernels' block: every row of a packed batch in one entry (batch stride 0 there does
    # not matter: one entry).
    prep = main.copy()
    prep["seqlen_q"], prep["grad_scale"] = total_q, scale
    prep_sizes = kernels.Sizes(seqlen_q=total_q, heads_q=heads_q)
    sizes = kernels.Sizes(seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q, heads_k=heads_k)

    def prep_step(entry):  # no table row: the rows per block are the kernel description's
        kernel = kernels.cuda(entry)
        return kernel.launch(kernel.defines(None, dtype), prep_sizes, prep, prep_batch, device)

    def step(entry, vec, **extra):  # a table row's kernel on the main block
        kernel = kernels.cuda(entry)
        cfg = configs.select(entry, arch, head_dim, has_right_edge)
        defines = kernel.defines(cfg, dtype, causal=has_right_edge, vec=vec) | extra | var.defines
        return kernel.launch(defines, sizes, main, batch, device)

    steps = [prep_step("flash_bwd_preprocess")]
    if simt:  # deterministic by construction: no atomics anywhere
        steps += [step("flash_bwd_simt_dq", False), step("flash_bwd_simt_dkdv", False)]
        return (launch.Sequence(steps),), scratch
    if arch == 90 and SM90_BACKWARD and _sm90_backward(Q, K, V, dO, dQ, dK, dV, var, varlen, vec):
        from xattn import sm90  # Hopper: the wgmma/TMA kernel in place of the dK/dV one
        steps.append(sm90.plan_backward(Q, K, V, dO, dK, dV, accum, main, var, batch))
    else:
        steps.append(step("flash_bwd_dkdv", vec, COMPUTE_DQ=int(not deterministic)))
    steps.append(step("flash_bwd_dq", vec) if deterministic else prep_step("flash_bwd_convert_dq"))
    return (launch.Sequence(steps),), scratch


def _sm90_backward(Q, K, V, dO, dQ, dK, dV, var, varlen, aligned) -> bool:
    """Whether the Hopper backward (xattn/sm90.py) serves a plan. aligned: every pointer and
    stride of the plan is 16-byte aligned, for every call that its cache key admits (the `vec` of
    both backward paths says so)."""
    from xattn import sm90

    return sm90.supports_backward(Q, K, V, dO, dQ, dK, dV, var.defines, varlen=varlen,
                                  aligned=aligned)


def _backward_on_cuda_cores(dtype: str, arch: int, head_dim: int, causal: bool) -> bool:
    """Whether the backward runs on the CUDA-core pair (flash_bwd_simt.cu) rather than the tensor
    cores: float32 always (tf32 would lose its precision), fp16/bf16 only where the tensor-core
    table has no row for the head dim (every head dim up to 256 has one on sm_80/86/90 since the
    dK/dV kernel splits D > 128 over two warps)."""
    if dtype == "float32":
        return True
    try:
        configs.select("flash_bwd_dkdv", arch, head_dim, causal)
    except ValueError:  # no tensor-core row for this head dim (an older device fails the same way there)
        return True
    return False


def info() -> dict[str, str]:
    """Lines for `python -m xattn info`."""
    import cupy

    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    nvrtc = cupy.cuda.nvrtc.getVersion()
    return {
        "device": f"{props['name'].decode()} (cuda:{device.id})",
        "compute capability": f"{_arch(device.id) / 10:.1f}",
        "multiprocessors": str(props["multiProcessorCount"]),
        "compiler": f"NVRTC {nvrtc[0]}.{nvrtc[1]} (through CuPy RawModule)",
        "kernel cache": jit.cache_location(),
    }
