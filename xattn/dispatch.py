"""Which backend serves a validated Call (xattn/call.py), forward and backward.

Arrays arrive in the call's layout, as the caller holds them; outputs come back in the caller's
library. The reference backend runs host arrays, the cuda backend GPU torch tensors straight from
their pointers (xattn/cuda.py: a plan per call), and every other GPU array (CuPy, DLPack, the hip
backend) goes through arrays.run_on_gpu's (B, H, S, D) views.
"""

from __future__ import annotations

import importlib

from xattn import arrays, backends, reference


def forward(call, q, k, v, alibi_slopes=None, cu_seqlens=None, sinks=None, pages=None):
    """(out, lse) of `call` on its backend. pages: (block_table, seqused_k) of paged keys and
    values (k and v the (num_pages, page_size, Hk, D) caches, which the array helpers see in
    "bshd" as (num_pages, Hk, page_size, D) views: the batch axis is the pages)."""
    slopes, sinks = _slopes(alibi_slopes), _slopes(sinks, "sinks")
    if call.backend == "cuda" and call.library == "torch" and pages is None and not backends.hip_on_cuda:
        from xattn import cuda  # the hot path: the Call's own plan, no keyword arguments built
        out, lse = cuda.attention(call, q, k, v, slopes, cu_seqlens, sinks)
    else:
        options = call.options(slopes, cu_seqlens, sinks, pages)
        if call.backend == "reference":  # exact, sinks included, whatever the lengths
            return arrays.run_on_host(reference.forward, q, k, v, info(call), layout=call.layout,
                                      dims=call.dims, **options)
        # the hip backend also serves CUDA memory under the test hook xattn.hip.on_cuda; paged
        # calls plan in the backend's forward (the table's pointer is patched there)
        on_cuda = backends.hip_on_cuda and call.backend == "cuda"
        backend_forward = (importlib.import_module("xattn.hip").forward if on_cuda
                           else backends.gpu_forward(call.backend))
        out, lse = arrays.run_on_gpu(backend_forward, q, k, v, info(call), layout=call.layout,
                                     dims=call.dims, **options)
    if sinks is not None and call.seqlen_k == 0:  # no key anywhere: no kernel ran
        from xattn import cuda
        cuda.fold_sinks(out.swapaxes(1, 2) if call.layout == "bshd" else out, lse, sinks)
    return out, lse


def backward(call, dout, q, k, v, out, lse, alibi_slopes=None, cu_seqlens=None):
    """(dq, dk, dv) of `call` for torch tensors (the only differentiable library), each contiguous
    in the layout of the tensor it belongs to; dk and dv summed over each GQA group. With sinks
    the backward kernels are the same: given the forward's lse (which holds the sink) and out they
    produce the gradients of the sink-softmax (xattn/torch_ops.py adds dsinks)."""
    slopes = _slopes(alibi_slopes)
    if call.device == "cpu":
        from xattn import torch_ops
        # The reference backward runs in sequence: deterministic whatever the flag says.
        return torch_ops.backward_host(dout, q, k, v, out, lse, call, slopes, cu_seqlens)
    if call.backend == "cuda" and not backends.hip_on_cuda:  # see xattn.hip.on_cuda
        from xattn import cuda
        return cuda.attention_backward(call, dout, q, k, v, out, lse, slopes, cu_seqlens)
    from xattn import torch_ops
    # "cuda" here: the hip backend serves it (the test hook xattn.hip.on_cuda)
    backward_fn = importlib.import_module("xattn.hip").backward if call.backend == "cuda" \
        else gpu_backward(call.backend)
    return torch_ops.backward_gpu(backward_fn, dout, q, k, v, out, lse,
                                  layout=call.layout, deterministic=call.deterministic,
                                  **call.options(slopes, cu_seqlens))


def gpu_backward(name: str):
    """backward of GPU backend `name`, or RuntimeError saying why there is none."""
    backends.gpu_forward(name)  # raises, with the reason, where the backend is unusable
    backward_fn = getattr(importlib.import_module(f"xattn.{name}"), "backward", None)
    if backward_fn is None:
        raise RuntimeError(f"backend: {name!r} has no backward kernels in this version; "
                           f"gradients of xattn.attention need them")
    return backward_fn


def info(call) -> arrays.ArrayInfo:
    """The ArrayInfo of q, from the call (what the array helpers read of it)."""
    return arrays.ArrayInfo(call.library, call.device, call.device_id, call.dtype,
                            call.q_shape)


def _slopes(alibi_slopes, name="alibi_slopes"):
    """ALiBi slopes (or sinks) as the backends take them: contiguous, float64 on the host, float32
    on a GPU, in their own library (arrays.slopes_array); already prepared ones pass through."""
    if alibi_slopes is None:
        return None
    return arrays.slopes_array(alibi_slopes, arrays.describe(alibi_slopes, name))
