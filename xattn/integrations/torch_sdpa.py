"""xattn as the flash-attention implementation behind torch.nn.functional.scaled_dot_product_attention.

    import torch, xattn
    torch.nn.attention.activate_flash_attention_impl("xattn")   # opt in
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.nn.attention.restore_flash_attention_impl()           # back to torch's own

PyTorch keeps a registry of flash-attention implementations (`torch.nn.attention.
register_flash_attention_impl`, checked in torch 2.11 and 2.13; FA3 and FA4 register through
it). `import xattn` adds "xattn" to it (`register()`, run once torch is imported) and never
activates it. Activation replaces the CUDA kernels of the aten flash ops with the functions
below, which call xattn's public API; everything that reaches them keeps its aten meaning:

* `_scaled_dot_product_flash_attention` (+ backward): (B, H, S, D) tensors, what SDPA's flash
  backend and PyTorch's context parallelism call. `_flash_attention_forward` (+ backward,
  + `_no_dropout_inplace`): (B, S, H, D), or packed (total, H, D) with cumulative lengths
  (`attention_varlen`), window sizes, ALiBi slopes.
* is_causal: these ops are flash-attn's kernels underneath, so their is_causal is bottom-right
  aligned, which is xattn's `causal` as it is. SDPA's own top-left `is_causal` never reaches
  them with Sq != Sk: SDPA's backend selection refuses the flash backend for causal
  non-square shapes and runs efficient/math instead; torch's `causal_lower_right` bias, by
  contrast, calls `_scaled_dot_product_flash_attention(is_causal=True)` precisely because
  that op means lower-right (torch/nn/attention/bias.py). Nothing is copied or expanded:
  GQA goes in with Hk < Hq.
* logsumexp: float32 (B, H, Sq), or (H, total_q) when packed, as torch's meta functions
  define it; a row that sees no key has lse -inf (flash-attn's kernels write +inf there;
  either makes the backward skip the row). rng_state / unused: uint64 (2,) and () as torch's
  meta functions declare them; their contents mean nothing without dropout.
* Outputs and gradients have the strides torch's meta functions promise (empty_like of the
  input they belong to): xattn is called in whichever layout ("bhsd"/"bshd") makes its
  contiguous result have those strides, so the usual cases copy nothing.

What xattn does not do goes to the kernel that was registered before activation (torch's
FlashAttention-2), never to an error: dropout_p > 0, return_debug_mask, seqused_k, paged KV
(block_table), float8 and float64, head dims above 256, a GPU backend that is not usable.
The .quantized (float8) overloads are left alone.

The backward ops take (dout, q, k, v, out, lse) and run xattn's backward kernels on them
directly (xattn.integrations._torch_backward), without recomputing the forward.
"""

from __future__ import annotations

import functools
import warnings

import torch

from xattn.flash_attn_compat import flash_window

NAME = "xattn"
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# aten op name -> its override (filled by @_override below). Ops a torch version lacks are
# skipped at activation.
_OVERRIDES: dict = {}


def register() -> bool:
    """Add "xattn" to PyTorch's flash-attention registry (no activation). Returns whether this
    torch has the registry."""
    attention = torch.nn.attention
    if not hasattr(attention, "register_flash_attention_impl") or not hasattr(
            torch.library, "get_kernel"):
        return False
    attention.register_flash_attention_impl(NAME, register_fn=_activate)
    return True


# --------------------------------------------------------------------------------- activation

class Handle:
    """What activate_flash_attention_impl keeps while "xattn" is active; remove() restores the
    kernels that were there before (the registry calls it on restore or on a new activation)."""

    def __init__(self, library, previous):
        self.library = library
        self.previous = previous  # aten op name -> the kernel it had before, or None

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _activate() -> Handle:
    """register_fn of the registry: override the CUDA kernels of the aten flash ops."""
    reason = _gpu_unusable()
    if reason is not None:
        warnings.warn(f"activate_flash_attention_impl('xattn'): xattn's GPU backend is not "
                      f"usable here ({reason}); every call keeps going to torch's own kernels",
                      stacklevel=3)
    library = torch.library.Library("aten", "IMPL", "CUDA")
    previous = {}
    for name, override in _OVERRIDES.items():
        if not hasattr(torch.ops.aten, name.split(".")[0]):
            continue
        try:
            previous[name] = torch.library.get_kernel(f"aten::{name}", "CUDA")
        except RuntimeError:  # a build without CUDA kernels (torch's CPU wheels)
            previous[name] = None
        with warnings.catch_warnings():
            # Overriding torch's kernel is the point; torch warns about every override.
            warnings.filterwarnings("ignore", message=".*[Oo]verrid")
            library.impl(name, functools.partial(override, previous[name]), "CUDA",
                         with_keyset=True)
    return Handle(library, previous)


@functools.cache
def _gpu_unusable() -> str | None:
    """Why neither GPU backend of xattn can run here, or None."""
    import xattn
    statuses = xattn.available_backends()
    if any(statuses[name].usable for name in ("cuda", "hip") if name in statuses):
        return None
    return "; ".join(f"{name}: {statuses[name].reason}" for name in ("cuda", "hip")
                     if name in statuses)


def _fallback(previous, keyset, name, reason, args, kwargs):
    if previous is None:
        raise RuntimeError(f"aten::{name}: xattn does not serve this call ({reason}) and no "
                           f"kernel was registered before xattn's")
    return previous.call_boxed(keyset, *args, **kwargs)


def _override(name):
    def decorate(function):
        _OVERRIDES[name] = function
        return function
    return decorate


# ----------------------------------------------------------------------- the fallback decision

def forward_unsupported(query, key, value, *, dropout_p=0.0, return_debug_mask=False,
                        alibi_slopes=None, extra=None) -> str | None:
    """Why xattn cannot serve this aten flash forward (the previous kernel then does), or None.
    `extra`: keyword arguments beyond those xattn maps (seqused_k, block_table, ...)."""
    if dropout_p:
        return f"dropout_p={dropout_p} (xattn has no attention dropout)"
    if return_debug_mask:
        return "return_debug_mask=True (xattn never forms the attention matrix)"
    for name, value_ in (extra or {}).items():
        if value_ is not None and name != "num_splits":  # num_splits is a tuning hint only
            return f"{name} is given (xattn has no equivalent)"
    if alibi_slopes is not None and alibi_slopes.dtype != torch.float32:
        return f"alibi_slopes of dtype {alibi_slopes.dtype} (expected float32)"
    return _tensor_unsupported(query, key, value)


def backward_unsupported(query, key, value, *, dropout_p=0.0) -> str | None:
    """Why xattn cannot serve this aten flash backward, or None."""
    if dropout_p:
        return f"dropout_p={dropout_p} (xattn has no attention dropout)"
    return _tensor_unsupported(query, key, value)


def _tensor_unsupported(query, key, value) -> str | None:
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in DTYPES:
        return (f"dtypes {query.dtype}, {key.dtype}, {value.dtype} (xattn takes one of float16, "
                f"bfloat16, float32)")
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] != query.shape[-1]:
        return f"head dims {query.shape[-1]}, {value.shape[-1]} (xattn takes one D <= 256)"
    if query.is_cuda and _gpu_unusable() is not None:
        return f"xattn's GPU backend is unusable: {_gpu_unusable()}"
    return None


# ---------------------------------------------------------------------------- argument mapping

# aten's window_size_left/right are flash-attn's (None or negative: unbounded; causal sets the
# right side to 0); xattn.flash_attn_compat holds that mapping.
window = flash_window


def _swap(t):
    return t.transpose(1, 2)


def _like(x, result):
    """`result` if it already has the strides torch's meta function gives (empty_like(x)),
    else a copy that has them."""
    if result.stride() == torch.empty_like(x, device="meta").stride():
        return result
    return torch.empty_like(x).copy_(result)


def _layout_for(x, layout: str) -> str:
    """The xattn layout whose contiguous result has x's memory order: `layout` (the order of
    x's shape) unless x is stored with dimensions 1 and 2 swapped."""
    if x.dim() == 4 and x.stride(1) < x.stride(2) and x.shape[1] > 1 and x.shape[2] > 1:
        return "bshd" if layout == "bhsd" else "bhsd"
    return layout


def dense_forward(query, key, value, *, layout, is_causal, scale, window=(-1, -1),
                  alibi_slopes=None):
    """(out, lse) of a 4-d aten call in `layout`, out with empty_like(query)'s strides."""
    import xattn
    use = _layout_for(query, layout)
    q, k, v = (query, key, value) if use == layout else (_swap(t) for t in (query, key, value))
    with torch.no_grad():  # the aten autograd kernel above records the graph, not xattn
        out, lse = xattn.attention(q, k, v, causal=is_causal, scale=scale, window=window,
                                   alibi_slopes=alibi_slopes, layout=use, return_lse=True)
    return _like(query, out if use == layout else _swap(out)), lse


def dense_backward(grad_out, query, key, value, out, lse, *, layout, is_causal, scale,
                   window=(-1, -1)):
    """(dq, dk, dv) of a 4-d aten call in `layout`, each with empty_like(input)'s strides."""
    from xattn.integrations import _torch_backward
    use = _layout_for(query, layout)
    tensors = (grad_out, query, key, value, out)
    if use != layout:
        tensors = tuple(_swap(t) for t in tensors)
    grads = _torch_backward.backward(
        *tensors, lse, layout=use, causal=is_causal, scale=scale, window=window,
        deterministic=torch.are_deterministic_algorithms_enabled())
    if use != layout:
        grads = tuple(_swap(g) for g in grads)
    return tuple(_like(x, g) for x, g in zip((query, key, value), grads))


def _rng_outputs(query):
    """rng_state (2,) and unused () uint64, as torch's meta functions declare them (no dropout,
    so no state is consumed and their contents are never read)."""
    return (torch.empty((2,), dtype=torch.uint64, device=query.device),
            torch.empty((), dtype=torch.uint64, device=query.device))


def _empty_debug_mask(query):
    return torch.empty((0,), dtype=query.dtype, device=query.device)


# -------------------------------------------------------------------------------- the overrides

@_override("_scaled_dot_product_flash_attention")
def sdpa_flash_forward(previous, keyset, query, key, value, dropout_p=0.0, is_causal=False,
                       return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention: (B, H, S, D). Returns (out, logsumexp,
    cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)."""
    reason = forward_unsupported(query, key, value, dropout_p=dropout_p,
                                 return_debug_mask=return_debug_mask)
    if reason is not None:
        return _fallback(previous, keyset, "_scaled_dot_product_flash_attention", reason,
                         (query, key, value, dropout_p, is_causal, return_debug_mask),
                         dict(scale=scale))
    out, lse = dense_forward(query, key, value, layout="bhsd", is_causal=is_causal, scale=scale)
    rng_state, unused = _rng_outputs(query)
    return (out, lse, None, None, query.shape[2], key.shape[2], rng_state, unused,
            _empty_debug_mask(query))


@_override("_scaled_dot_product_flash_attention_backward")
def sdpa_flash_backward(previous, keyset, grad_out, query, key, value, out, logsumexp,
                        cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed,
                        philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward: (B, H, S, D) -> (dq, dk, dv)."""
    reason = backward_unsupported(query, key, value, dropout_p=dropout_p)
    if reason is not None:
        return _fallback(previous, keyset, "_scaled_dot_product_flash_attention_backward",
                         reason, (grad_out, query, key, value, out, logsumexp, cum_seq_q,
                                  cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed,
                                  philox_offset), dict(scale=scale))
    return dense_backward(grad_out, query, key, value, out, logsumexp, layout="bhsd",
                          is_causal=is_causal, scale=scale)


def _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, is_causal, scale,
                   window_size_left, window_size_right, alibi_slopes):
    """(out, lse) of aten::_flash_attention_forward's arguments, dense or packed."""
    import xattn
    band = window(is_causal, window_size_left, window_size_right)
    if cum_seq_q is None:
        return dense_forward(query, key, value, layout="bshd", is_causal=is_causal,
                             scale=scale, window=band, alibi_slopes=alibi_slopes)
    with torch.no_grad():
        out, lse = xattn.attention_varlen(
            query, key, value, cum_seq_q.to(torch.int32), cum_seq_k.to(torch.int32),
            int(max_q), int(max_k), causal=is_causal, scale=scale, window=band,
            alibi_slopes=alibi_slopes, return_lse=True)
    return _like(query, out), lse


_FLASH_FORWARD_EXTRA = ("seqused_k", "block_table", "num_splits")


@_override("_flash_attention_forward")
def flash_forward(previous, keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                  dropout_p, is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                  window_size_right=None, alibi_slopes=None, **extra):
    """aten::_flash_attention_forward: (B, S, H, D), or (total, H, D) with cum_seq_q/k.
    Returns (out, logsumexp, rng_state, unused, debug_attn_mask)."""
    reason = forward_unsupported(query, key, value, dropout_p=dropout_p,
                                 return_debug_mask=return_debug_mask,
                                 alibi_slopes=alibi_slopes, extra=extra)
    if reason is None and (cum_seq_q is None) != (cum_seq_k is None):
        reason = "only one of cum_seq_q, cum_seq_k is given"
    if reason is not None:
        return _fallback(previous, keyset, "_flash_attention_forward", reason,
                         (query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                          is_causal, return_debug_mask),
                         dict(scale=scale, window_size_left=window_size_left,
                              window_size_right=window_size_right, alibi_slopes=alibi_slopes,
                              **extra))
    out, lse = _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, is_causal,
                              scale, window_size_left, window_size_right, alibi_slopes)
    return (out, lse, *_rng_outputs(query), _empty_debug_mask(query))


@_override("_flash_attention_forward_no_dropout_inplace")
def flash_forward_inplace(previous, keyset, out, query, key, value, cum_seq_q, cum_seq_k,
                          max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None,
                          window_size_left=None, window_size_right=None, alibi_slopes=None,
                          **extra):
    """aten::_flash_attention_forward_no_dropout_inplace: writes `out`, returns logsumexp.
    xattn's API allocates its output, so the result is copied into `out` (one extra copy)."""
    reason = forward_unsupported(query, key, value, dropout_p=dropout_p,
                                 return_debug_mask=return_debug_mask,
                                 alibi_slopes=alibi_slopes, extra=extra)
    if reason is None and (cum_seq_q is None) != (cum_seq_k is None):
        reason = "only one of cum_seq_q, cum_seq_k is given"
    if reason is not None:
        return _fallback(previous, keyset, "_flash_attention_forward_no_dropout_inplace",
                         reason, (out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                                  dropout_p, is_causal, return_debug_mask),
                         dict(scale=scale, window_size_left=window_size_left,
                              window_size_right=window_size_right, alibi_slopes=alibi_slopes,
                              **extra))
    result, lse = _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                                 is_causal, scale, window_size_left, window_size_right,
                                 alibi_slopes)
    out.copy_(result)
    return lse


@_override("_flash_attention_backward")
def flash_backward(previous, keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q,
                   cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state, unused, *,
                   scale=None, window_size_left=None, window_size_right=None):
    """aten::_flash_attention_backward: (B, S, H, D) or packed -> (dq, dk, dv)."""
    reason = backward_unsupported(query, key, value, dropout_p=dropout_p)
    if reason is not None:
        return _fallback(previous, keyset, "_flash_attention_backward", reason,
                         (grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
                          max_q, max_k, dropout_p, is_causal, rng_state, unused),
                         dict(scale=scale, window_size_left=window_size_left,
                              window_size_right=window_size_right))
    band = window(is_causal, window_size_left, window_size_right)
    # aten hands undefined cum_seq tensors over as None for dense calls.
    if cum_seq_q is None or cum_seq_q.numel() == 0:
        return dense_backward(grad_out, query, key, value, out, logsumexp, layout="bshd",
                              is_causal=is_causal, scale=scale, window=band)
    from xattn.integrations import _torch_backward
    grads = _torch_backward.backward(
        grad_out, query, key, value, out, logsumexp, layout="bshd", causal=is_causal,
        scale=scale, window=band, cu_seqlens=(cum_seq_q, cum_seq_k), max_seqlen=(max_q, max_k),
        deterministic=torch.are_deterministic_algorithms_enabled())
    return tuple(_like(x, g) for x, g in zip((query, key, value), grads))
