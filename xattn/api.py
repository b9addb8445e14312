"""Public functions: attention and exact_attention. Validation happens here, once."""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np

from xattn import arrays, backends, reference

LAYOUTS = ("bhsd", "bshd")
MAX_HEAD_DIM = 256
GPU_DTYPES = ("float16", "bfloat16", "float32")
# The reference backend also takes float64: the tiled == exact property is checked in it.
REFERENCE_DTYPES = GPU_DTYPES + ("float64",)
# Kernels take scale * log2(e) as a float32: a larger scale would reach them as inf.
MAX_SCALE = float(np.finfo(np.float32).max) / math.log2(math.e)


def attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None, alibi_slopes=None,
              layout="bhsd", return_lse=False, backend=None, deterministic=False):
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
    info, dims, scale = _validate(q, k, v, causal, scale, layout, return_lse)
    _check_bool("deterministic", deterministic)
    options = dict(causal=causal, scale=scale,
                   **_variant_options(info, dims, causal, window, softcap, alibi_slopes))
    out, lse = _dispatch(q, k, v, info, dims, layout, backend, deterministic, options)
    return (out, lse) if return_lse else out


def _dispatch(q, k, v, info, dims, layout, backend, deterministic, options):
    """Run the forward on the chosen backend: (out, lse) in q's library."""
    chosen = backends.choose_backend(backend, info.device, arrays.device_label(info))
    if info.library == "torch" and _needs_torch_op(q, k, v):
        _check_dtype(info, REFERENCE_DTYPES if chosen == "reference" else GPU_DTYPES,
                     backend_name=chosen)
        from xattn import torch_ops
        return torch_ops.attention(q, k, v, layout=layout, deterministic=deterministic, **options)
    if chosen == "reference":
        _check_dtype(info, REFERENCE_DTYPES)
        return arrays.run_on_host(reference.forward, q, k, v, info, layout=layout, dims=dims,
                                  **options)
    _check_dtype(info, GPU_DTYPES, backend_name=chosen)
    return arrays.run_on_gpu(backends.gpu_forward(chosen), q, k, v, info, layout=layout,
                             dims=dims, **options)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     causal=False, scale=None, window=None, softcap=None, alibi_slopes=None,
                     return_lse=False, backend=None, deterministic=False):
    """Attention over a packed batch of sequences of different lengths, in one launch, no padding.

    q: (total_q, Hq, D), k and v: (total_k, Hk, D): the sequences one after another. Sequence b
    is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q and cu_seqlens_k[b] .. cu_seqlens_k[b + 1]
    of k and v; cu_seqlens_* are int32 (B + 1,) arrays of q's library and device, starting at 0,
    non-decreasing, ending at the total (empty sequences are allowed). max_seqlen_q/k: at least
    the longest sequence (they size the launch). Each sequence attends only to itself, with
    causal/window/softcap/alibi_slopes as in attention() (bottom-right alignment per sequence;
    alibi_slopes (Hq,) or (B, Hq)). Returns out (total_q, Hq, D), or (out, lse) with lse float32
    (Hq, total_q). Differentiable in torch like attention().

    The cumulative lengths are checked on the host, which reads them back from a GPU (one small
    copy and a synchronization per call).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        shape = arrays.describe(x, name).shape
        if len(shape) != 3:
            raise ValueError(f"{name}: expected a 3-d array (total_tokens, H, D), got shape {shape}")
    # The packed tensors are one batch entry in the (B, S, H, D) layout: (1, total, H, D) views.
    q4, k4, v4 = q[None], k[None], v[None]
    info, dims, scale = _validate(q4, k4, v4, causal, scale, "bshd", return_lse)
    _check_bool("deterministic", deterministic)
    cu_seqlens, max_seqlen, sequences = _validate_cu_seqlens(
        info, dims, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = dict(causal=causal, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                   **_variant_options(info, (sequences,) + dims[1:], causal, window, softcap,
                                      alibi_slopes))
    out, lse = _dispatch(q4, k4, v4, info, dims, "bshd", backend, deterministic, options)
    out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _validate_cu_seqlens(info, dims, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Check the cumulative lengths (on the host) and the maxima. Returns the arrays as the
    backends take them (arrays.index_array), (max_seqlen_q, max_seqlen_k) and the number of
    sequences."""
    _, _, total_q, total_k, _ = dims
    lengths = {}
    prepared = []
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, total_q),
                            ("cu_seqlens_k", cu_seqlens_k, total_k)):
        cu_info = arrays.describe(cu, name)
        check_like_q(name, cu_info, info)
        if cu_info.dtype != "int32":
            raise ValueError(f"{name}: expected dtype int32, got {cu_info.dtype}")
        if len(cu_info.shape) != 1 or cu_info.shape[0] < 1:
            raise ValueError(f"{name}: expected a 1-d array (B + 1,), got shape {cu_info.shape}")
        host = _host_ints(cu, cu_info)
        if host[0] != 0:
            raise ValueError(f"{name}: expected first entry 0, got {int(host[0])}")
        if (np.diff(host) < 0).any():
            raise ValueError(f"{name}: expected non-decreasing entries, got {host.tolist()}")
        if host[-1] != total:
            raise ValueError(f"{name}: expected last entry {total} (the total number of rows), "
                             f"got {int(host[-1])}")
        lengths[name] = np.diff(host)
        prepared.append(arrays.index_array(cu, cu_info, host))
    if len(lengths["cu_seqlens_q"]) != len(lengths["cu_seqlens_k"]):
        raise ValueError(f"cu_seqlens_k: expected {len(lengths['cu_seqlens_q']) + 1} entries "
                         f"(as cu_seqlens_q), got {len(lengths['cu_seqlens_k']) + 1}")
    maxima = []
    for name, value, key in (("max_seqlen_q", max_seqlen_q, "cu_seqlens_q"),
                             ("max_seqlen_k", max_seqlen_k, "cu_seqlens_k")):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name}: expected an int, got {value!r}")
        longest = int(lengths[key].max(initial=0))
        if value < longest:
            raise ValueError(f"{name}: expected at least {longest} (the longest sequence in "
                             f"{key}), got {value}")
        maxima.append(int(value))
    return tuple(prepared), tuple(maxima), len(lengths["cu_seqlens_q"])


# Host copies of GPU torch tensors of cumulative lengths, by id: (weak reference, version counter,
# pointer, copy). A model passes the same cu_seqlens to every layer; reading it back once instead
# of per layer saves a device synchronization each time. torch bumps a tensor's version on every
# in-place change made through torch; writes that bypass torch (DLPack, raw pointers) are not seen.
_cu_seqlens_seen: dict[int, tuple] = {}


def _host_ints(x, info):
    if info.library != "torch" or info.device == "cpu":
        return arrays.to_host_ints(x, info)
    try:
        version = x._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter: read it every time
        return arrays.to_host_ints(x, info)
    seen = _cu_seqlens_seen.get(id(x))
    if seen is not None and seen[0]() is x and seen[1:3] == (version, x.data_ptr()):
        return seen[3]
    import weakref
    host = arrays.to_host_ints(x, info)
    if len(_cu_seqlens_seen) > 64:  # stale entries (their tensors are gone) are dropped now
        for key in [k for k, v in _cu_seqlens_seen.items() if v[0]() is None]:
            del _cu_seqlens_seen[key]
    _cu_seqlens_seen[id(x)] = (weakref.ref(x), version, x.data_ptr(), host)
    return host


def _variant_options(info, dims, causal, window, softcap, alibi_slopes):
    """Validate the mask and score modifiers; returns the backends' keyword arguments."""
    batch, q_heads = dims[0], dims[1]
    if window is None:
        window = (-1, -1)
    if not isinstance(window, (tuple, list)) or len(window) != 2 or not all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window):
        raise TypeError(f"window: expected None or a pair of ints (left, right), got {window!r}")
    left, right = (int(w) for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"window: expected each side >= 0, or -1 for unbounded, got {window!r}")
    if causal:
        if right > 0:
            raise ValueError(f"window: with causal=True the right side must be 0 or -1 (causal "
                             f"hides every key right of the diagonal), got {window!r}")
        right = 0
    if softcap is None:
        softcap = 0.0
    elif not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        raise TypeError(f"softcap: expected a positive number or None, got {softcap!r}")
    else:
        softcap = float(softcap)
        if softcap == 0.0:
            pass  # flash-attn's spelling of "no softcap"
        elif not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap: expected a finite positive number, got {softcap!r}")
    slopes = None
    if alibi_slopes is not None:
        if softcap:
            raise ValueError("alibi_slopes: cannot be combined with softcap in xattn (the backward "
                             "keeps only tanh's value); use one or the other")
        slope_info = arrays.describe(alibi_slopes, "alibi_slopes")
        check_like_q("alibi_slopes", slope_info, info)
        if slope_info.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"alibi_slopes: expected a float dtype, got {slope_info.dtype}")
        if slope_info.shape not in ((q_heads,), (batch, q_heads)):
            raise ValueError(f"alibi_slopes: expected shape ({q_heads},) or ({batch}, {q_heads}) "
                             f"(Hq or (B, Hq)), got {slope_info.shape}")
        slopes = arrays.slopes_array(alibi_slopes, slope_info)
    return dict(window=(left, right), softcap=softcap, alibi_slopes=slopes)


def _needs_torch_op(q, k, v) -> bool:
    """Whether torch tensors must go through the custom op: autograd will record this call,
    or torch.compile is tracing it. Otherwise the plain path is cheaper per call."""
    torch = sys.modules["torch"]
    return (((q.requires_grad or k.requires_grad or v.requires_grad)
             and torch.is_grad_enabled()) or torch.compiler.is_compiling())


def exact_attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None,
                    alibi_slopes=None, layout="bhsd"):
    """The float64 oracle: (out, lse) as float64 NumPy arrays, out in q's layout.

    Takes the same arguments and follows the same rules as attention(); arrays of any
    supported library are copied to the host. Materializes the full score matrix, so keep
    it to test-sized problems.
    """
    info, dims, scale = _validate(q, k, v, causal, scale, layout, False)
    _check_dtype(info, REFERENCE_DTYPES)
    variant = _variant_options(info, dims, causal, window, softcap, alibi_slopes)
    if variant["alibi_slopes"] is not None:
        variant["alibi_slopes"] = arrays.to_float64_numpy(alibi_slopes, arrays.describe(
            alibi_slopes, "alibi_slopes"))
    hq, hk, hv = (arrays.to_float64_numpy(a, info) for a in (q, k, v))
    if layout == "bshd":
        hq, hk, hv = (a.transpose(0, 2, 1, 3) for a in (hq, hk, hv))
    out, lse = reference.exact_attention_bhsd(hq, hk, hv, causal=causal, scale=scale, **variant)
    if layout == "bshd":
        out = out.transpose(0, 2, 1, 3)
    return out, lse


def _validate(q, k, v, causal, scale, layout, return_lse):
    """Check everything but the dtype's fit to the backend. Returns (info, dims, scale)."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'bhsd' or 'bshd', got {layout!r}")
    _check_bool("causal", causal)
    _check_bool("return_lse", return_lse)

    info = arrays.describe(q, "q")
    k_info = arrays.describe(k, "k")
    v_info = arrays.describe(v, "v")
    for name, other in (("k", k_info), ("v", v_info)):
        check_like_q(name, other, info)
        if other.dtype != info.dtype:
            raise TypeError(f"{name}: expected dtype {info.dtype} (as q), got {other.dtype}")

    pattern = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
    for name, array_info in (("q", info), ("k", k_info), ("v", v_info)):
        if len(array_info.shape) != 4:
            raise ValueError(f"{name}: expected a 4-d array {pattern} for layout {layout!r}, "
                             f"got shape {array_info.shape}")

    def bhsd(shape):
        return shape if layout == "bhsd" else (shape[0], shape[2], shape[1], shape[3])

    batch, q_heads, sq, head_dim = bhsd(info.shape)
    _, kv_heads, sk, k_head_dim = bhsd(k_info.shape)
    v_batch, v_heads, v_len, v_head_dim = bhsd(v_info.shape)

    if k_info.shape[0] != batch:
        raise ValueError(f"k: expected batch size {batch} (as q), got {k_info.shape[0]}")
    if v_batch != batch:
        raise ValueError(f"v: expected batch size {batch} (as q), got {v_batch}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim D in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if k_head_dim != head_dim:
        raise ValueError(f"k: expected head dim {head_dim} (as q), got {k_head_dim}")
    if v_head_dim != head_dim:
        raise ValueError(f"v: expected head dim {head_dim} (as q), got {v_head_dim}")
    if v_len != sk:
        raise ValueError(f"v: expected sequence length {sk} (as k), got {v_len}")
    if v_heads != kv_heads:
        raise ValueError(f"v: expected {kv_heads} heads (as k), got {v_heads}")
    if kv_heads < 1:
        raise ValueError(f"k: expected at least 1 head, got {kv_heads}")
    if q_heads % kv_heads:
        raise ValueError(f"q: expected a number of heads divisible by k's {kv_heads} heads "
                         f"(GQA), got {q_heads}")

    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a finite positive number or None, "
                        f"got {type(scale).__name__}")
    else:
        try:
            scale = float(scale)
        except OverflowError:  # an int beyond float range, e.g. 10**400
            scale = math.inf
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite positive number, got {scale!r}")
        if scale > MAX_SCALE:
            raise ValueError(f"scale: expected at most {MAX_SCALE:.3g} (scale * log2(e) must fit "
                             f"a float32), got {scale!r}")
    return info, (batch, q_heads, sq, sk, head_dim), scale


def check_like_q(name, other, info, or_else=""):
    """other (an ArrayInfo) must be of q's library and on q's device."""
    if other.library != info.library:
        raise TypeError(f"{name}: expected {arrays.library_label(info)} (as q){or_else}, "
                        f"got {arrays.library_label(other)}")
    if (other.device, other.device_id) != (info.device, info.device_id):
        raise ValueError(f"{name}: expected an array on {arrays.device_label(info)} (as q), "
                         f"got one on {arrays.device_label(other)}")


def _check_bool(name, value):
    # numpy.bool_ is not a bool subclass, but it is an honest boolean.
    if not isinstance(value, bool) and type(value).__name__ != "bool":
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def _check_dtype(info, supported, backend_name="reference"):
    if info.dtype not in supported:
        listed = ", ".join(supported)
        raise TypeError(f"q: expected dtype {listed} for the {backend_name} backend, "
                        f"got {info.dtype}")
