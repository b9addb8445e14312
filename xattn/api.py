"""The public functions: attention, attention_varlen and exact_attention.

Each builds (or finds, by signature) one validated Call (xattn/call.py) and hands it to the layer
that serves it: the torch ops when autograd or torch.compile needs them, else the backend.
"""

from __future__ import annotations

import sys

from xattn import arrays, call as calls, dispatch, reference

# The validation rules' constants, where callers have always found them.
LAYOUTS, MAX_HEAD_DIM, MAX_SCALE = calls.LAYOUTS, calls.MAX_HEAD_DIM, calls.MAX_SCALE
GPU_DTYPES, REFERENCE_DTYPES = calls.GPU_DTYPES, calls.REFERENCE_DTYPES
check_like_q = calls.check_like_q


def attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None, alibi_slopes=None,
              layout="bhsd", return_lse=False, backend=None, deterministic=False, sinks=None):
    """Scaled dot-product attention, softmax(scale * Q K^T) V, FlashAttention style.

    q: (B, Hq, Sq, D) for layout "bhsd" or (B, Sq, Hq, D) for "bshd"; k and v: (B, Hk, Sk, D)
    or (B, Sk, Hk, D), with Hq a multiple of Hk (GQA/MQA; K and V are never expanded).
    causal: query i sees key j iff j <= i + (Sk - Sq) (bottom-right aligned, as flash-attn).
    scale: defaults to 1/sqrt(D).
    window: (left, right) sliding window: query i sees keys [i + Sk - Sq - left,
    i + Sk - Sq + right], -1 meaning unbounded on that side; None is (-1, -1). With causal=True
    the right side is 0 (a right of -1 or 0 is accepted). Key tiles outside the band are skipped.
    softcap: c > 0 turns each score s = scale * q.k into c * tanh(s / c) (Gemma-2); None: none.
    alibi_slopes: float array (Hq,) or (B, Hq), in q's library and on its device: adds
    -slope * |i + Sk - Sq - j| to the score of query i and key j (after the softcap; the two are
    not combined). The slopes are not differentiable.
    sinks: float32 (Hq,), in q's library and on its device (GPT-OSS): each row's softmax
    denominator gains exp(sinks[h]), a key of score sinks[h] and value 0; lse includes it, and a
    row that sees no key gives out 0 and lse sinks[h]. Differentiable in torch (dsinks summed
    over batch and rows). Reference and cuda backends.
    Returns out (q's array type, device, dtype and layout), or (out, lse) with return_lse,
    lse being float32 (B, Hq, Sq), natural log. Rows that see no key give 0 and -inf.
    backend: None picks from the data ("reference" for host memory, "cuda" or "hip" for
    GPU arrays); the XATTN_BACKEND environment variable overrides None.
    deterministic: make the backward pass bitwise reproducible (no float atomics); the
    forward always is.

    torch tensors are differentiable: when an input requires grad (and grad mode is on), or
    under torch.compile, the call goes through the xattn::attention_forward custom op, whose
    backward runs the backend's backward kernels. lse is never differentiable.
    """
    call = calls.lookup(q, k, v, alibi_slopes, (causal, scale, window, softcap, layout, return_lse,
                                                backend, deterministic), sinks)
    out, lse = run(call, q, k, v, alibi_slopes, sinks=sinks)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     causal=False, scale=None, window=None, softcap=None, alibi_slopes=None,
                     return_lse=False, backend=None, deterministic=False, sinks=None,
                     block_table=None, seqused_k=None):
    """Attention over a packed batch of sequences of different lengths, in one launch, no padding.

    q: (total_q, Hq, D), k and v: (total_k, Hk, D): the sequences one after another. Sequence b
    is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q and cu_seqlens_k[b] .. cu_seqlens_k[b + 1]
    of k and v; cu_seqlens_* are int32 (B + 1,) arrays of q's library and device, starting at 0,
    non-decreasing, ending at the total (empty sequences are allowed). max_seqlen_q/k: at least
    the longest sequence (they size the launch). Each sequence attends only to itself, with
    causal/window/softcap/alibi_slopes as in attention() (bottom-right alignment per sequence;
    alibi_slopes (Hq,) or (B, Hq); sinks (Hq,), dsinks summed over the sequences). Returns out (total_q, Hq, D), or (out, lse) with lse float32
    (Hq, total_q). Differentiable in torch like attention().

    The cumulative lengths are checked on the host, which reads them back from a GPU (one small
    copy and a synchronization per call; a GPU torch tensor is read once per version).

    Paged keys and values (flash-attn's flash_attn_varlen_func convention; the mixed prefill and
    decode batch of a serving step): with block_table, int32 (B, max_pages) in q's library and
    device, k and v are (num_pages, page_size, Hk, D) caches, page_size a multiple of 16, and key
    row r of sequence b lives at page block_table[b, r // page_size], row r % page_size. Sequence
    b has seqused_k[b] keys where seqused_k (int32 (B,), q's library and device) is given, else
    cu_seqlens_k[b + 1] - cu_seqlens_k[b] (cu_seqlens_k may then be None; given, its first entry
    is 0 and it does not decrease, with no total to end at). Pages may be shared between
    sequences. A GPU block table or seqused_k is never read on the host (no synchronization: a
    CUDA graph can capture the call once cu_seqlens_q has been seen); page ids out of
    [0, num_pages) and lengths past max_pages * page_size raise ValueError where they are host
    arrays, and are clamped by the kernels otherwise (a wrong page, never memory outside the
    caches or the table). Every variant above applies. Forward only: torch inputs that require
    grad while grad mode is on raise TypeError. Served by flash_fwd.cu's mma.sync kernel on
    NVIDIA (the sm90 TMA kernel takes no packed batch), by the portable forward on AMD, and by the
    reference on the host.
    """
    call, cu_seqlens, pages = calls.build_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
        return_lse=return_lse, backend=backend, deterministic=deterministic, sinks=sinks,
        block_table=block_table, seqused_k=seqused_k)
    if pages is not None:  # the pages are (num_pages, page_size, Hk, D) already
        out, lse = run(call, q[None], k, v, alibi_slopes, cu_seqlens, sinks, pages)
    else:
        out, lse = run(call, q[None], k[None], v[None], alibi_slopes, cu_seqlens, sinks)
    return (out[0], lse[0]) if return_lse else out[0]  # lse is None on the eager autograd path


def run(call, q, k, v, alibi_slopes=None, cu_seqlens=None, sinks=None, pages=None):
    """(out, lse) of a validated call, in q's library: through the torch ops when autograd
    records the call or torch.compile traces it, else on the call's backend directly. pages:
    (block_table, seqused_k) of paged keys, a forward-only call (validation refused gradients),
    which needs the op only under torch.compile."""
    if call.library == "torch":
        if pages is not None and sys.modules["torch"].compiler.is_compiling():
            from xattn import torch_ops
            return torch_ops.paged_attention(call, q, k, v, alibi_slopes, cu_seqlens, sinks, pages)
        if pages is None and _needs_torch_op(q, k, v, sinks):
            from xattn import torch_ops
            return torch_ops.attention(call, q, k, v, alibi_slopes, cu_seqlens, sinks)
    return dispatch.forward(call, q, k, v, alibi_slopes, cu_seqlens, sinks, pages)


def _needs_torch_op(q, k, v, sinks=None) -> bool:
    """Whether torch tensors must go through the custom op: autograd will record this call,
    or torch.compile is tracing it. Otherwise the plain path is cheaper per call."""
    torch = sys.modules["torch"]
    wants_grad = (q.requires_grad or k.requires_grad or v.requires_grad
                  or (sinks is not None and sinks.requires_grad))
    return (wants_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling()


def exact_attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None,
                    alibi_slopes=None, layout="bhsd"):
    """The float64 oracle: (out, lse) as float64 NumPy arrays, out in q's layout.

    Takes the same arguments and follows the same rules as attention(); arrays of any
    supported library are copied to the host. Materializes the full score matrix, so keep
    it to test-sized problems.
    """
    call = calls.build(q, k, v, alibi_slopes, causal, scale, window, softcap, layout, False,
                       calls.ORACLE, False)
    info = arrays.describe(q, "q")
    slopes = None
    if alibi_slopes is not None:
        slopes = arrays.to_float64_numpy(alibi_slopes, arrays.describe(alibi_slopes,
                                                                       "alibi_slopes"))
    hq, hk, hv = (arrays.to_float64_numpy(a, info) for a in (q, k, v))
    if layout == "bshd":
        hq, hk, hv = (a.transpose(0, 2, 1, 3) for a in (hq, hk, hv))
    out, lse = reference.exact_attention_bhsd(hq, hk, hv, causal=call.causal, scale=call.scale,
                                              window=call.window, softcap=call.softcap,
                                              alibi_slopes=slopes)
    if layout == "bshd":
        out = out.transpose(0, 2, 1, 3)
    return out, lse

