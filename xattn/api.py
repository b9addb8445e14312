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


def attention(q, k, v, *, causal=False, scale=None, layout="bhsd", return_lse=False,
              backend=None, deterministic=False):
    """Scaled dot-product attention, softmax(scale * Q K^T) V, FlashAttention style.

    q: (B, Hq, Sq, D) for layout "bhsd" or (B, Sq, Hq, D) for "bshd"; k and v: (B, Hk, Sk, D)
    or (B, Sk, Hk, D), with Hq a multiple of Hk (GQA/MQA; K and V are never expanded).
    causal: query i sees key j iff j <= i + (Sk - Sq) (bottom-right aligned, as flash-attn).
    scale: defaults to 1/sqrt(D).
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
    chosen = backends.choose_backend(backend, info.device, arrays.device_label(info))
    if info.library == "torch" and _needs_torch_op(q, k, v):
        _check_dtype(info, REFERENCE_DTYPES if chosen == "reference" else GPU_DTYPES,
                     backend_name=chosen)
        from xattn import torch_ops
        out, lse = torch_ops.attention(q, k, v, causal=causal, scale=scale, layout=layout,
                                       deterministic=deterministic)
    elif chosen == "reference":
        _check_dtype(info, REFERENCE_DTYPES)
        out, lse = arrays.run_on_host(reference.flash_attention_forward, q, k, v, info,
                                      layout=layout, causal=causal, scale=scale, dims=dims)
    else:
        _check_dtype(info, GPU_DTYPES, backend_name=chosen)
        out, lse = arrays.run_on_gpu(backends.gpu_forward(chosen), q, k, v, info,
                                     layout=layout, causal=causal, scale=scale, dims=dims)
    return (out, lse) if return_lse else out


def _needs_torch_op(q, k, v) -> bool:
    """Whether torch tensors must go through the custom op: autograd will record this call,
    or torch.compile is tracing it. Otherwise the plain path is cheaper per call."""
    torch = sys.modules["torch"]
    return (((q.requires_grad or k.requires_grad or v.requires_grad)
             and torch.is_grad_enabled()) or torch.compiler.is_compiling())


def exact_attention(q, k, v, *, causal=False, scale=None, layout="bhsd"):
    """The float64 oracle: (out, lse) as float64 NumPy arrays, out in q's layout.

    Takes the same arguments and follows the same rules as attention(); arrays of any
    supported library are copied to the host. Materializes the full score matrix, so keep
    it to test-sized problems.
    """
    info, _, scale = _validate(q, k, v, causal, scale, layout, False)
    _check_dtype(info, REFERENCE_DTYPES)
    hq, hk, hv = (arrays.to_float64_numpy(a, info) for a in (q, k, v))
    if layout == "bshd":
        hq, hk, hv = (a.transpose(0, 2, 1, 3) for a in (hq, hk, hv))
    out, lse = reference.exact_attention_bhsd(hq, hk, hv, causal=causal, scale=scale)
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
        if other.library != info.library:
            raise TypeError(f"{name}: expected {arrays.library_label(info)} (as q), "
                            f"got {arrays.library_label(other)}")
        if (other.device, other.device_id) != (info.device, info.device_id):
            raise ValueError(f"{name}: expected an array on {arrays.device_label(info)} "
                             f"(as q), got one on {arrays.device_label(other)}")
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


def _check_bool(name, value):
    # numpy.bool_ is not a bool subclass, but it is an honest boolean.
    if not isinstance(value, bool) and type(value).__name__ != "bool":
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def _check_dtype(info, supported, backend_name="reference"):
    if info.dtype not in supported:
        listed = ", ".join(supported)
        raise TypeError(f"q: expected dtype {listed} for the {backend_name} backend, "
                        f"got {info.dtype}")
