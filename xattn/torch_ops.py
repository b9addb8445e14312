"""xattn as PyTorch operators: torch.library custom ops, fake implementations, autograd.

    xattn::attention_forward(q, k, v, cu_seqlens_q?, cu_seqlens_k?, alibi_slopes?, causal, scale,
                             window_left, window_right, softcap, max_seqlen_q, max_seqlen_k,
                             layout, deterministic, sinks?=None) -> (out, lse)
    xattn::attention_backward(dout, q, k, v, out, lse, cu_seqlens_q?, cu_seqlens_k?,
                              alibi_slopes?, <the scalars>) -> (dq, dk, dv)
    xattn::paged_attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k?, block_table,
                                          seqused_k?, alibi_slopes?, sinks?, <the scalars>)
                                          -> (out, lse)      (forward only: no autograd)

Sinks need nothing of the backward op: given the forward's lse (which holds the sink) and out,
the backward kernels' dq, dk, dv are those of the sink-softmax (tests/test_attention_sinks.py
checks this against the gradient oracle), and dsinks is a row reduction done here in torch ops
(sinks_grad).

A packed (varlen) batch arrives as (1, total, H, D) views in layout "bshd" with the cumulative
lengths; window -1 means unbounded, softcap 0 none (xattn.api documents them all).

xattn.attention routes torch tensors here when autograd needs a graph (an input requires grad
and grad mode is on) or torch.compile is tracing; otherwise it takes its plain path, which
skips the dispatcher. Calls arrive as a validated xattn.call.Call; the ops' flat arguments are
converted to and from it in one place (Call.op_scalars, Call.from_op), and xattn.dispatch runs
it on its backend, so nothing is checked twice.

Tensors are in `layout` ("bhsd" or "bshd"); out and the gradients are allocated contiguous in
the layout of the tensor they belong to (out and dq like q, dk like k, dv like v), and lse is
float32 (B, Hq, Sq), natural log. lse is not differentiable. CPU tensors run the reference
backend (NumPy) both ways; CUDA tensors the cuda backend, whose backward is
xattn.cuda.backward (contract below, in _backward_gpu).
"""

from __future__ import annotations

import numpy as np
import torch

from xattn import arrays, dispatch, reference
from xattn.call import Call


def _sizes(q, k, layout):
    """(B, Hq, Sq, Sk, D) from q and k in `layout`."""
    if layout == "bhsd":
        batch, q_heads, sq, head_dim = q.shape
        sk = k.shape[2]
    else:
        batch, sq, q_heads, head_dim = q.shape
        sk = k.shape[1]
    return batch, q_heads, sq, sk, head_dim


# ------------------------------------------------------------------------------- forward op

def forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                      alibi_slopes: torch.Tensor | None, causal: bool, scale: float,
                      window_left: int, window_right: int, softcap: float, max_seqlen_q: int,
                      max_seqlen_k: int, layout: str, deterministic: bool,
                      sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse). `deterministic` is unused here: it is an input only so that autograd
    can hand it to the backward."""
    call = Call.from_op(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, causal, scale,
                        window_left, window_right, softcap, max_seqlen_q, max_seqlen_k, layout,
                        deterministic, sinks)
    return dispatch.forward(call, q, k, v, alibi_slopes, _cu(cu_seqlens_q, cu_seqlens_k), sinks)


def _cu(cu_seqlens_q, cu_seqlens_k):
    return None if cu_seqlens_q is None else (cu_seqlens_q, cu_seqlens_k)


attention_forward = torch.library.custom_op("xattn::attention_forward", forward_impl,
                                            mutates_args=())


@attention_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, causal, scale, window_left,
      window_right, softcap, max_seqlen_q, max_seqlen_k, layout, deterministic, sinks=None):
    batch, q_heads, sq, _, _ = _sizes(q, k, layout)
    out = q.new_empty(q.shape)  # contiguous in q's layout, as the real one
    lse = q.new_empty((batch, q_heads, sq), dtype=torch.float32)
    return out, lse


# ------------------------------------------------------------------------ paged forward op
# attention_varlen with block_table: forward only (flash-attn's paged varlen is inference-only
# too). Validation refuses inputs that require grad, so the op has no autograd formula; eager
# calls skip it (xattn.api.run) and torch.compile traces it.

def paged_forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None,
                       block_table: torch.Tensor, seqused_k: torch.Tensor | None,
                       alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None, causal: bool,
                       scale: float, window_left: int, window_right: int, softcap: float,
                       max_seqlen_q: int, max_seqlen_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of a paged packed batch: q (1, total_q, Hq, D), k and v (num_pages, page_size,
    Hk, D); out (1, total_q, Hq, D), lse (1, Hq, total_q)."""
    call = Call.from_paged_op(q, k, v, cu_seqlens_q, block_table, alibi_slopes, sinks, causal,
                              scale, window_left, window_right, softcap, max_seqlen_q, max_seqlen_k)
    return dispatch.forward(call, q, k, v, alibi_slopes, (cu_seqlens_q, cu_seqlens_k), sinks,
                            (block_table, seqused_k))


paged_attention_forward = torch.library.custom_op("xattn::paged_attention_varlen_forward",
                                                  paged_forward_impl, mutates_args=())


@paged_attention_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqused_k, alibi_slopes, sinks, causal,
      scale, window_left, window_right, softcap, max_seqlen_q, max_seqlen_k):
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


def paged_attention(call, q, k, v, alibi_slopes, cu_seqlens, sinks, pages):
    """(out, lse) of a validated paged Call through the op (torch.compile)."""
    if alibi_slopes is not None:
        alibi_slopes = arrays.slopes_array(alibi_slopes, arrays.describe(alibi_slopes,
                                                                         "alibi_slopes"))
    max_q, max_k = call.max_seqlen
    return paged_attention_forward(q, k, v, *cu_seqlens, *pages, alibi_slopes, sinks, call.causal,
                                   call.scale, call.window[0], call.window[1], call.softcap,
                                   max_q, max_k)


# ------------------------------------------------------------------------------ backward op

def backward_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                       cu_seqlens_k: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                       causal: bool, scale: float, window_left: int, window_right: int,
                       softcap: float, max_seqlen_q: int, max_seqlen_k: int, layout: str,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the upstream gradient dout of out = attention_forward(...)[0]."""
    call = Call.from_op(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, causal, scale,
                        window_left, window_right, softcap, max_seqlen_q, max_seqlen_k, layout,
                        deterministic)
    return dispatch.backward(call, dout, q, k, v, out, lse, alibi_slopes,
                             _cu(cu_seqlens_q, cu_seqlens_k))


attention_backward = torch.library.custom_op("xattn::attention_backward", backward_impl,
                                             mutates_args=())


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, *_options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _bhsd(x, layout):
    return x if layout == "bhsd" else x.transpose(1, 2)


def backward_host(dout, q, k, v, out, lse, call, alibi_slopes, cu_seqlens):
    """The reference backward on CPU tensors; gradients come back in the inputs' dtype."""
    info = dispatch.info(call)
    host = tuple(arrays.to_host_numpy(x, info) for x in (q, k, v, out, dout))
    # Gradients are allocated in the host dtype (float32 for bfloat16, which NumPy lacks),
    # contiguous in the caller's layout, and handed to the reference as (B, H, S, D) views.
    grads = tuple(np.empty(x.shape, dtype=x.dtype) for x in host[:3])
    if call.layout == "bshd":
        host = tuple(x.transpose(0, 2, 1, 3) for x in host)
    dq, dk, dv = (g.transpose(0, 2, 1, 3) if call.layout == "bshd" else g for g in grads)
    reference.backward(*host, lse.numpy(), dq=dq, dk=dk, dv=dv,
                       **call.options(alibi_slopes, cu_seqlens))
    return tuple(torch.from_numpy(g).to(q.dtype) for g in grads)


def backward_gpu(backward, dout, q, k, v, out, lse, *, layout, deterministic, **options):
    """Launch a GPU backend's backward (torch tensors on the GPU).

    Contract: backward(q, k, v, out, dout, lse, dq, dk, dv, *, deterministic, stream, causal,
    scale, window, softcap, alibi_slopes, cu_seqlens, max_seqlen) gets (B, H, S, D) views with any B/H/S strides and element stride 1 in D, lse
    float32 (B, Hq, Sq) contiguous, and writes every element of dq, dk, dv (dk and dv summed
    over the query heads of their group). Empty problems never reach it: the gradients are
    zero-filled here.
    """
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    if dq.numel() == 0 or dk.numel() == 0:  # B, Hq, Sq or Sk is 0: no gradient flows
        for grad in (dq, dk, dv):
            grad.zero_()
        return dq, dk, dv

    def kernel_view(t):
        # A strided D (e.g. dout of out.sum(), an expanded tensor of stride 0) is copied once;
        # the copy runs on torch's current stream, as the kernel does.
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            t = t.contiguous()
        return _bhsd(t, layout)

    backward(*(kernel_view(t) for t in (q, k, v, out, dout)), lse.contiguous(),
             *(kernel_view(g) for g in (dq, dk, dv)), deterministic=deterministic,
             stream=torch.cuda.current_stream(q.device).cuda_stream, **options)
    return dq, dk, dv



# --------------------------------------------------------------------------------- autograd

def sinks_grad(out, dout, lse, sinks, layout):
    """dsinks (Hq,) float32: the sink's probability in row r is p_r = exp(sink_h - lse_r), and
    d lse_r / d sink_h = p_r; out_r = sum_j p_rj v_j depends on the sink only through lse_r, so
    dsinks_h = -sum over every row of head h (all batch entries and sequences) of p_r * delta_r,
    delta_r = rowsum(dout_r * out_r) as the backward kernels compute it. Torch ops, no kernel."""
    compute = torch.promote_types(out.dtype, torch.float32)  # float64 stays float64
    delta = (dout.to(compute) * out.to(compute)).sum(-1)  # (B, Hq, S) or (B, S, Hq)
    if layout == "bshd":
        delta = delta.transpose(1, 2)
    sink = sinks.to(compute)[None, :, None]
    # A row of lse -inf (no key and a sink of -inf) has no sink probability: 0, not exp(nan).
    p_sink = torch.where(torch.isneginf(lse), 0.0, torch.exp(sink - lse))
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *scalars = inputs
    sinks = scalars.pop() if len(scalars) > 9 else None  # the optional last input
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks)
    ctx.scalars = scalars  # causal .. deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *index_and_slopes, sinks = ctx.saved_tensors
    if dout is None:  # out was not used: nothing flows back
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, *index_and_slopes, *ctx.scalars)
    layout = ctx.scalars[7]
    dsinks = None if sinks is None or not ctx.needs_input_grad[-1] else sinks_grad(
        out, dout, lse, sinks, layout)
    grads = (dq, dk, dv) + (None,) * (3 + len(ctx.scalars))
    return grads + (dsinks,) if len(ctx.needs_input_grad) > len(grads) else grads


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _eager_forward(ctx, call, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, sinks):
    """(out, lse), with what the backward needs saved on ctx."""
    out, lse = dispatch.forward(call, q, k, v, alibi_slopes, _cu(cu_seqlens_q, cu_seqlens_k), sinks)
    optional = (alibi_slopes, cu_seqlens_q, cu_seqlens_k, sinks)
    # Only the tensors there are: each saved slot costs the autograd engine host time.
    ctx.save_for_backward(q, k, v, out, lse, *(t for t in optional if t is not None))
    ctx.present = tuple(t is not None for t in optional)
    ctx.call = call
    return out, lse


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager autograd, on the Call itself:
    torch's custom-op wrapper costs about half a millisecond of host time per call on its own
    (measured by `python -m xattn bench --overhead`), so only torch.compile, which needs the op,
    pays it. Its one output is out: each output of a Function costs the autograd engine host time
    in the forward and the backward (15 µs of 104 per forward+backward of an empty Function on
    the CPU machine), so lse is an output only of _EagerAttentionWithLse, for return_lse."""

    @staticmethod
    def forward(ctx, call, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, sinks):
        return _eager_forward(ctx, call, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                              sinks)[0]

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *given = ctx.saved_tensors
        given = iter(given)
        alibi_slopes, cu_q, cu_k, sinks = (next(given) if there else None
                                           for there in ctx.present)
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = dispatch.backward(ctx.call, dout, q, k, v, out, lse, alibi_slopes,
                                       None if cu_q is None else (cu_q, cu_k))
        dsinks = None if sinks is None or not ctx.needs_input_grad[7] else sinks_grad(
            out, dout, lse, sinks, ctx.call.layout)
        return None, dq, dk, dv, None, None, None, dsinks


class _EagerAttentionWithLse(_EagerAttention):
    """_EagerAttention with lse as a second, non-differentiable output."""

    @staticmethod
    def forward(ctx, call, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, sinks):
        out, lse = _eager_forward(ctx, call, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                                  sinks)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        return _EagerAttention.backward(ctx, dout)


def attention(call, q, k, v, alibi_slopes=None, cu_seqlens=None, sinks=None):
    """(out, lse) of a validated Call: through the custom op under torch.compile, through an
    autograd.Function running the same code otherwise (lse None there unless call.return_lse)."""
    cu_q, cu_k = cu_seqlens if cu_seqlens is not None else (None, None)
    if alibi_slopes is not None:  # the op takes tensors as the backends do (float32 on a GPU)
        alibi_slopes = arrays.slopes_array(alibi_slopes, arrays.describe(alibi_slopes,
                                                                         "alibi_slopes"))
    if torch.compiler.is_compiling():
        return attention_forward(q, k, v, cu_q, cu_k, alibi_slopes, *call.op_scalars(), sinks)
    if call.return_lse:
        return _EagerAttentionWithLse.apply(call, q, k, v, alibi_slopes, cu_q, cu_k, sinks)
    return _EagerAttention.apply(call, q, k, v, alibi_slopes, cu_q, cu_k, sinks), None
