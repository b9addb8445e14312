"""flash-attn 2.8's Python functions on xattn, for code written against flash-attn.

    import xattn.flash_attn_compat as flash_attn_interface
    out = flash_attn_interface.flash_attn_func(q, k, v, causal=True)      # (B, S, H, D)

Same names, argument names and order, defaults, shapes and return values as
flash_attn/flash_attn_interface.py of flash-attn 2.8:

* flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
  alibi_slopes, deterministic, return_attn_probs) -> out, or (out, softmax_lse (B, H, Sq),
  S_dmask) with return_attn_probs; differentiable.
* flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...,
  block_table) on packed (total, H, D) tensors; softmax_lse (H, total_q); differentiable.
* flash_attn_with_kvcache(q, k_cache, v_cache, k, v, ..., cache_seqlens, ...,
  return_softmax_lse): inference, writes k/v into the caches in place.
* The private _flash_attn_forward / _flash_attn_backward and their _varlen_ forms, as
  ring-flash-attention and other sequence-parallel libraries call them: forward returns
  (out, softmax_lse, S_dmask, rng_state); backward writes dq, dk, dv in place and returns
  softmax_d = rowsum(dout * out), flash-attn's shape (B, H, Sq rounded up to 128) or
  (H, total_q + 128 B), padding zero.

Conventions are flash-attn's and xattn's alike: causal and windows bottom-right aligned,
window -1 unbounded (any negative side is taken as -1, and causal sets the right side to 0,
as flash-attn does), softcap 0.0 off, ALiBi slopes (H,) or (B, H) float32, GQA with
H % Hk == 0 and K/V not expanded, D any value up to 256 (no padding to a multiple of 8).

What xattn does not have raises a ValueError naming the argument: dropout_p > 0, rotary
embeddings, cache_batch_idx, leftpad_k (and paged K/V or seqused_k in the private
_flash_attn_varlen_forward), and ALiBi in flash_attn_with_kvcache. S_dmask is always empty, as flash-attn returns it without
dropout; rng_state means nothing without dropout.
"""

from __future__ import annotations

import torch

import xattn

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
           "_flash_attn_forward", "_flash_attn_backward", "_flash_attn_varlen_forward",
           "_flash_attn_varlen_backward"]


def flash_window(causal: bool, left, right) -> tuple[int, int]:
    """flash-attn's (window_size_left, window_size_right) as xattn's window: None or any
    negative side is unbounded (-1); causal sets the right side to 0, as flash-attn does."""
    left = -1 if left is None or left < 0 else int(left)
    right = -1 if right is None or right < 0 else int(right)
    return left, 0 if causal else right


def _no_dropout(dropout_p) -> None:
    if dropout_p:
        raise ValueError(f"dropout_p: xattn has no attention dropout, got {dropout_p} (use 0.0; "
                         f"during training, move dropout out of the attention call)")


def _refuse(**arguments) -> None:
    for name, value in arguments.items():
        if value is not None:
            raise ValueError(f"{name}: not supported by xattn (expected None, got "
                             f"{type(value).__name__})")


def _window_pair(window_size) -> tuple:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size: expected a pair (left, right), got {window_size!r}")
    return tuple(window_size)


def _empty_probs(q):
    return torch.empty((0,), dtype=q.dtype, device=q.device)


def _rng_state(q):
    return torch.empty((2,), dtype=torch.int64, device=q.device)


# ------------------------------------------------------------------------------ public functions

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """q (B, Sq, H, D), k and v (B, Sk, Hk, D) -> out (B, Sq, H, D), or (out, softmax_lse,
    S_dmask) with return_attn_probs (softmax_lse float32 (B, H, Sq), S_dmask empty)."""
    _no_dropout(dropout_p)
    out, lse = xattn.attention(q, k, v, causal=causal, scale=softmax_scale,
                               window=flash_window(causal, *_window_pair(window_size)),
                               softcap=softcap, alibi_slopes=alibi_slopes, layout="bshd",
                               return_lse=True, deterministic=deterministic)
    return (out, lse, _empty_probs(q)) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None, seqused_k=None):
    """q (total_q, H, D), k and v (total_k, Hk, D), cu_seqlens_* int32 (B + 1,) -> out
    (total_q, H, D), or (out, softmax_lse (H, total_q), S_dmask) with return_attn_probs.
    block_table int32 (B, max_pages): k and v are paged caches (num_pages, page_size, Hk, D) and
    cu_seqlens_k gives each sequence's key count (flash-attn's paged varlen), or seqused_k int32
    (B,) does (vLLM's spelling; cu_seqlens_k may then be None). Paged calls are forward only."""
    _no_dropout(dropout_p)
    out, lse = xattn.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        scale=softmax_scale, window=flash_window(causal, *_window_pair(window_size)),
        softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True, deterministic=deterministic,
        block_table=block_table, seqused_k=seqused_k)
    return (out, lse, _empty_probs(q)) if return_attn_probs else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """q (B, Sq, H, D), caches (B, Smax, Hk, D), k/v (B, Snew, Hk, D) or None (written into the
    caches at rows cache_seqlens[b]..), cache_seqlens int or int32 (B,) (None: the whole cache).
    block_table int32 (B, max_pages): the caches are pages (num_pages, page_size, Hk, D), as in
    flash-attn, and cache_seqlens is needed. cache_leftpad int32 (B,): sequence b's keys start at
    cache row cache_leftpad[b] (left-padded batches). Returns out (B, Sq, H, D), or (out,
    softmax_lse (B, H, Sq)). num_splits and rotary_interleaved are accepted and ignored (xattn
    picks its own split count)."""
    _refuse(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx,
            alibi_slopes=alibi_slopes)
    if cache_seqlens is None:
        if k is not None or v is not None:
            raise ValueError("cache_seqlens: needed when k and v are given (where to write "
                             "them), got None")
        if block_table is not None:
            raise ValueError("cache_seqlens: needed with block_table (a paged cache has no "
                             "length of its own), got None")
        cache_seqlens = k_cache.shape[1]
    return xattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens, k_new=k, v_new=v, causal=causal,
        scale=softmax_scale, window=flash_window(causal, *_window_pair(window_size)),
        softcap=softcap, layout="bshd", return_lse=return_softmax_lse, block_table=block_table,
        cache_leftpad=cache_leftpad)


# -------------------------------------------------------------- the private forward / backward

def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
                        window_size_right, softcap, alibi_slopes, return_softmax):
    """(out, softmax_lse (B, H, Sq), S_dmask (empty), rng_state); records no autograd graph."""
    _no_dropout(dropout_p)
    with torch.no_grad():
        out, lse = xattn.attention(q, k, v, causal=causal, scale=softmax_scale,
                                   window=flash_window(causal, window_size_left,
                                                       window_size_right),
                                   softcap=softcap, alibi_slopes=alibi_slopes, layout="bshd",
                                   return_lse=True)
    return out, lse, _empty_probs(q), _rng_state(q)


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, softmax_scale, causal, window_size_left=-1,
                               window_size_right=-1, softcap=0.0, alibi_slopes=None,
                               return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None):
    """(out, softmax_lse (H, total_q), S_dmask (empty), rng_state); records no graph."""
    _no_dropout(dropout_p)
    _refuse(block_table=block_table, leftpad_k=leftpad_k, seqused_k=seqused_k)
    with torch.no_grad():
        out, lse = xattn.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
            scale=softmax_scale, window=flash_window(causal, window_size_left, window_size_right),
            softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
    return out, lse, _empty_probs(q), _rng_state(q)


def _write_grads(grads, dq, dk, dv):
    for given, grad in zip((dq, dk, dv), grads):
        if given is not None:
            given.copy_(grad)


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
                         causal, window_size_left, window_size_right, softcap, alibi_slopes,
                         deterministic, rng_state=None):
    """Writes dq, dk, dv (B, S, H, D) in place; returns softmax_d (B, H, round128(Sq))."""
    from xattn.integrations import _torch_backward
    _no_dropout(dropout_p)
    grads = _torch_backward.backward(
        dout, q, k, v, out, softmax_lse, layout="bshd", causal=causal, scale=softmax_scale,
        window=flash_window(causal, window_size_left, window_size_right), softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic)
    _write_grads(grads, dq, dk, dv)
    batch, sq, heads, _ = q.shape
    softmax_d = torch.zeros((batch, heads, -(-sq // 128) * 128), dtype=torch.float32,
                            device=q.device)
    softmax_d[:, :, :sq] = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    return softmax_d


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, deterministic, rng_state=None):
    """Writes dq, dk, dv (total, H, D) in place; returns softmax_d (H, total_q + 128 B)."""
    from xattn.integrations import _torch_backward
    _no_dropout(dropout_p)
    grads = _torch_backward.backward(
        dout, q, k, v, out, softmax_lse, layout="bshd", causal=causal, scale=softmax_scale,
        window=flash_window(causal, window_size_left, window_size_right), softcap=softcap,
        alibi_slopes=alibi_slopes, cu_seqlens=(cu_seqlens_q, cu_seqlens_k),
        max_seqlen=(max_seqlen_q, max_seqlen_k), deterministic=deterministic)
    _write_grads(grads, dq, dk, dv)
    total_q, heads, _ = q.shape
    batch = cu_seqlens_q.numel() - 1
    softmax_d = torch.zeros((heads, total_q + 128 * batch), dtype=torch.float32, device=q.device)
    softmax_d[:, :total_q] = (dout.float() * out.float()).sum(-1).transpose(0, 1)
    return softmax_d
