"""The one place where the integrations call xattn's backward on tensors they already hold.

PyTorch's aten backward ops and flash-attn's `_flash_attn_backward` hand over (dout, q, k, v,
out, lse) and want (dq, dk, dv) without re-running the forward, which the public API cannot
express (its gradients come from autograd). Both go through `backward` below, which calls
`xattn.torch_ops.backward_impl` with its documented contract: (B, H, S, D) or (B, S, H, D)
tensors with `layout`, lse float32 (B, Hq, Sq); a packed (varlen) batch as (1, total, H, D)
views in "bshd" with lse (1, Hq, total) and the int32 cumulative lengths. It returns the
gradients contiguous in `layout`.
"""

from __future__ import annotations

import math

import torch


def backward(dout, q, k, v, out, lse, *, layout, causal, scale, window=(-1, -1), softcap=0.0,
             alibi_slopes=None, cu_seqlens=None, max_seqlen=None, deterministic=False):
    """(dq, dk, dv) of out = attention(q, k, v, ...) for the upstream gradient dout.

    Dense: every tensor in `layout` ("bhsd" or "bshd"), lse (B, Hq, Sq). Packed: q, k, v,
    out, dout (total, H, D), lse (Hq, total_q), cu_seqlens = (cu_q, cu_k) int32,
    max_seqlen = (max_q, max_k); the gradients come back (total, H, D).
    window: (left, right), -1 unbounded; with causal the right side is 0 (as xattn.api folds it).
    """
    from xattn import torch_ops

    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    left, right = window
    if causal:
        right = 0
    if alibi_slopes is not None:  # as xattn.api prepares them for the backends
        from xattn import arrays
        alibi_slopes = arrays.slopes_array(alibi_slopes,
                                           arrays.describe(alibi_slopes, "alibi_slopes"))
    packed = cu_seqlens is not None
    if packed:
        dout, q, k, v, out, lse = (t[None] for t in (dout, q, k, v, out, lse))
        cu_q, cu_k = (c.detach().to(torch.int32).contiguous() for c in cu_seqlens)
        max_q, max_k = (int(m) for m in max_seqlen)
        layout = "bshd"
    else:
        cu_q = cu_k = None
        max_q = max_k = 0
    grads = torch_ops.backward_impl(
        dout, q, k, v, out, lse.float(), cu_q, cu_k, alibi_slopes, bool(causal), float(scale),
        int(left), int(right), float(softcap or 0.0), max_q, max_k, layout, bool(deterministic))
    return tuple(g[0] for g in grads) if packed else tuple(grads)
