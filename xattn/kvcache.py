"""xattn.attention_with_kvcache: attention of a few new query tokens against a KV cache.

The public function validates once, then runs on the reference backend (host arrays: the new
keys and values are written into the caches, then the NumPy reference attends per sequence) or on
the cuda backend (kernels_cuda/flash_decode.cu, flash_decode_f32.cu, flash_decode_merge.cu), or
on the hip backend (xattn.hip.decode: kernels_hip/flash_decode_mfma.hip on the matrix cores of
CDNA and RDNA3/4 for 16-bit dtypes, flash_decode_portable.hip otherwise and for paged and FP8
caches; sinks and FP8 caches included; its plans are cached per signature by
xattn.hip.launch_decode: `_run_hip`). The hip backend's sinks and FP8 caches have run only on
NVIDIA GPUs, through the portable HIP kernels compiled by NVRTC (tests/hip_on_cuda.h, the
hip-on-cuda test paths), and have been compiled for AMD targets by hiprtc and clang-19
(ci/hip_compile.py): no AMD GPU has run them.

The caches are contiguous per sequence, or paged (block_table=, flash-attn's convention);
cache_leftpad= starts each sequence's keys at its own row (left-padded batches). sinks= adds a
per-head sink logit to every row's softmax denominator.

The GPU path never reads cache_seqlens or block_table on the host and allocates only through the
caller's framework (torch's caching allocator, CuPy's pool) on the caller's stream, so a call can
be captured in a CUDA graph. One launch per call (the append is fused into the attention kernel),
two when the keys are split over several blocks per row tile (the merge).

The first GPU call of a signature (shapes, strides, dtypes, devices, options, 16-byte alignment)
validates, plans (table row, split count), compiles and packs a DecodeParams block; later calls
with the same signature look the plan up, patch the pointers into the block and launch
(`_Plan.run`).
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import os
import sys

import numpy as np

from xattn import arrays, backends, configs, kernels, launch, params, reference
from xattn.call import (GPU_DTYPES, LAYOUTS, REFERENCE_DTYPES, band, check_block_table, check_bool,
                        check_dtype, check_groups, check_head_dim, check_like_q, check_no_grad,
                        check_scale, check_sinks, check_softcap, check_vector)

_LIBRARIES = ("numpy", "torch", "cupy")  # the caches are written in place: real arrays only


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, k_new=None, v_new=None,
                           causal=True, scale=None, window=None, softcap=None, layout="bhsd",
                           return_lse=False, backend=None, block_table=None, sinks=None,
                           k_scale=None, v_scale=None, cache_leftpad=None):
    """Attention of q against a KV cache, after appending k_new/v_new to it in place.

    layout "bhsd": q (B, Hq, Sq, D), k_cache and v_cache (B, Hk, Smax, D), k_new and v_new
    (B, Hk, Snew, D); "bshd": (B, Sq, Hq, D), (B, Smax, Hk, D), (B, Snew, Hk, D). Hq must be a
    multiple of Hk (GQA: query head h reads kv head h // (Hq / Hk)).
    cache_seqlens: int32 array (B,) in q's library and on q's device, or one Python int for every
    sequence: the filled length of each cache. k_new/v_new (optional, together) are written IN
    PLACE into the caches at rows [cache_seqlens[b], cache_seqlens[b] + Snew); cache_seqlens
    itself is not updated. Sequence b then attends to cache rows [0, Sk_b), Sk_b =
    cache_seqlens[b] + Snew.
    causal: bottom-right aligned, query i sees key j iff j <= i + Sk_b - Sq.
    window=(left, right): query i sees keys [i + Sk_b - Sq - left, i + Sk_b - Sq + right], -1
    meaning unbounded; with causal=True the right side is 0 (-1 or 0 accepted, as in attention()).
    softcap=c: scores s = scale * q.k become c * tanh(s / c) before the softmax (None or 0: off).
    scale: defaults to 1/sqrt(D).
    Returns out (q's array type, device, dtype and layout), or (out, lse) with return_lse, lse
    float32 (B, Hq, Sq), natural log. Rows that see no key give 0 and -inf.

    Lengths out of range (cache_seqlens[b] < 0 or cache_seqlens[b] + Snew > Smax): a host value
    (int, NumPy array, CPU tensor) raises ValueError. A GPU array is not read on the host; the
    kernels clamp instead and never read or write outside the caches: cache_seqlens[b] is
    clamped to [0, Smax], new rows that would land at or past Smax are dropped, and Sk_b =
    min(clamped + Snew, Smax).

    cache_leftpad: int32 array (B,) in q's library and on q's device, or None (flash-attn's
    cache_leftpad): sequence b's keys start at cache row cache_leftpad[b], for batches padded on
    the left (as generate() pads prompts). Sequence b attends to rows [cache_leftpad[b], Sk_b),
    with causal masks and windows aligned with their end as above; new rows still land at
    cache_seqlens[b]. Host values outside [0, cache_seqlens[b]] raise ValueError; a GPU array is
    not read on the host, and the kernels clamp it to that range.

    block_table: int32 (B, max_pages) in q's library and device: paged caches (flash-attn's
    convention). k_cache and v_cache are then (num_pages, page_size, Hk, D) whatever the layout,
    page_size a multiple of 16, and row r of sequence b lives at page block_table[b, r //
    page_size], row r % page_size; Smax = max_pages * page_size. Pages may be shared between
    sequences (read-only: appends write only the pages of the rows they land in). Page ids out of
    [0, num_pages) raise ValueError for a host table; a GPU table is not read on the host and
    its ids are clamped (a wrong page, never memory outside the caches).

    sinks: float32 (Hq,) in q's library and device: each row's softmax denominator gains
    exp(sinks[h]) (a key of score sinks[h] and value 0, GPT-OSS); lse includes it, and a row
    that sees no key gives out 0 and lse sinks[h].

    FP8 caches (torch only: CuPy has no float8 dtype): k_cache and v_cache torch.float8_e4m3fn
    or torch.float8_e5m2 (both the same), with k_scale and v_scale float32 torch tensors on q's
    device, per tensor (shape () or (1,)) or per KV head (Hk,): the cache holds x / scale, and
    is read as fp8 * scale. q, k_new, v_new, out stay float16/bfloat16/float32. Appending
    quantizes k_new / v_new with the given scales: x / scale (float32) saturated to the format's
    largest finite value (448 for e4m3fn, 57344 for e5m2), then rounded to nearest even; NaN
    stays NaN. The new rows are attended as their quantized values. Every backend (the cuda and
    hip decode kernels read the codes and dequantize in the kernel, KV_FP8; on hip the portable
    decode serves FP8 caches).

    Inference only: not differentiable. A torch input that requires grad while grad mode is on
    raises TypeError (call it under torch.no_grad(), or pass detached tensors).
    """
    scales = (k_scale, v_scale)
    plan = _cached_plan(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window,
                        softcap, layout, return_lse, backend, block_table, sinks, scales, cache_leftpad)
    if plan is not None:  # a repeated GPU signature: look-up, patch, launch
        out, lse = plan.run(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks,
                            scales, leftpad=cache_leftpad)
        return (out, lse) if return_lse else out
    call = _validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window,
                     softcap, layout, return_lse, block_table, sinks, scales, cache_leftpad)
    info = call.info
    chosen = backends.choose_backend(backend, info.device, arrays.device_label(info))
    if chosen == "reference":
        check_dtype(info, REFERENCE_DTYPES)
        if call.kv_format is not None:
            return _fp8_reference(q, k_cache, v_cache, cache_seqlens, k_new, v_new, k_scale, v_scale,
                                  dict(causal=causal, scale=scale, window=window, softcap=softcap,
                                       layout=layout, return_lse=return_lse, backend=backend,
                                       block_table=block_table, sinks=sinks,
                                       cache_leftpad=cache_leftpad))
        out, lse = _run_reference(q, k_cache, v_cache, k_new, v_new, block_table, sinks, call)
    elif chosen == "hip" or backends.hip_on_cuda:  # on_cuda: the HIP decode serves CUDA memory
        check_dtype(info, GPU_DTYPES, backend_name="hip")
        if chosen == "hip":
            backends.gpu_forward(chosen)  # RuntimeError naming what to install where hip is unusable
        out, lse = _run_hip(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks, call,
                            scales=scales, leftpad=cache_leftpad)
    elif chosen == "cuda":
        check_dtype(info, GPU_DTYPES, backend_name=chosen)
        backends.gpu_forward(chosen)  # RuntimeError naming what to install where cuda is unusable
        plan = _new_plan(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks, call,
                         scales, cache_leftpad)
        _remember(plan, q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window,
                  softcap, layout, return_lse, backend, block_table, sinks, scales, cache_leftpad)
        out, lse = plan.run(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks,
                            scales, leftpad=cache_leftpad)
    else:
        raise ValueError(f"backend: attention_with_kvcache runs on the 'reference', 'cuda' and "
                         f"'hip' backends, got {chosen!r}")
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------- FP8 caches

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


def _fp8_format(cache):
    """The float8 dtype name of a torch cache, else None."""
    dtype = getattr(cache, "dtype", None)
    name = str(dtype).removeprefix("torch.")
    return name if type(cache).__module__.startswith("torch") and name in FP8_DTYPES else None


def quantize(x, scale, dtype):
    """x / scale in the float8 `dtype` (torch): rounded to nearest even (torch's conversion),
    saturated to the format's largest finite value first (the conversion alone would give NaN
    for e4m3fn, inf for e5m2); NaN stays NaN."""
    import torch
    largest = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-largest, largest).to(dtype)


def _scale_view(scale, cache, layout, paged):
    """The scale broadcast against the cache: per tensor as it is, per KV head on the head axis."""
    if scale.dim() == 0 or scale.shape[0] == 1:
        return scale.reshape(())
    return scale.reshape(-1, 1, 1) if layout == "bhsd" and not paged else scale.reshape(-1, 1)


def _check_fp8(q, k_cache, v_cache, k_scale, v_scale, layout, paged):
    """The FP8 arguments: float8 torch caches of one format, float32 scales () / (1,) / (Hk,) on
    q's device. Returns the format's name."""
    info = arrays.describe(q, "q")
    formats = [_fp8_format(k_cache), _fp8_format(v_cache)]
    for name, cache, fmt in (("k_cache", k_cache, formats[0]), ("v_cache", v_cache, formats[1])):
        if fmt is None:
            got = arrays.describe(cache, name)
            raise TypeError(f"{name}: expected a torch float8_e4m3fn or float8_e5m2 tensor with "
                            f"k_scale/v_scale, got {arrays.library_label(got)} of dtype {got.dtype}")
        check_like_q(name, arrays.describe(cache, name), info)
    if formats[0] != formats[1]:
        raise TypeError(f"v_cache: expected dtype {formats[0]} (as k_cache), got {formats[1]}")
    if len(k_cache.shape) != 4:
        raise ValueError(f"k_cache: expected a 4-d array, got shape {tuple(k_cache.shape)}")
    heads_k = k_cache.shape[1] if layout == "bhsd" and not paged else k_cache.shape[2]
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise TypeError(f"{name}: expected a float32 tensor () , (1,) or ({heads_k},) with a "
                            f"float8 cache, got None")
        try:
            described = arrays.describe(scale, name)
        except TypeError:
            raise TypeError(f"{name}: expected a float32 torch tensor, got "
                            f"{type(scale).__module__}.{type(scale).__qualname__}") from None
        check_like_q(name, described, info)
        if described.dtype != "float32":
            raise TypeError(f"{name}: expected dtype float32, got {described.dtype}")
        if tuple(described.shape) not in ((), (1,), (heads_k,)):
            raise ValueError(f"{name}: expected shape (), (1,) or ({heads_k},) (per tensor or "
                             f"per KV head), got {tuple(described.shape)}")
    return formats[0]


def _is_fp8_call(k_cache, v_cache, scales) -> bool:
    return any(s is not None for s in scales) or bool(_fp8_format(k_cache) or _fp8_format(v_cache))


def _fp8_reference(q, k_cache, v_cache, cache_seqlens, k_new, v_new, k_scale, v_scale, options):
    """FP8 caches on the reference backend (validated): dequantize into float32 copies, append
    k_new/v_new (quantized then dequantized, so the copies hold exactly what the FP8 caches will),
    attend in float32 with q in float32, and write the copies back quantized (rows already in FP8
    round-trip exactly: fp8 * s / s is within float32 rounding of the fp8 value, far inside half
    an FP8 step)."""
    paged, layout = options["block_table"] is not None, options["layout"]
    ks, vs = (_scale_view(s, k_cache, layout, paged) for s in (k_scale, v_scale))
    k32, v32 = k_cache.float() * ks, v_cache.float() * vs
    fmt = k_cache.dtype
    if k_new is not None and v_new is not None:  # (B, Hk, Snew, D) or (B, Snew, Hk, D): never paged
        ks_new, vs_new = (_scale_view(s, k_new, layout, False) for s in (k_scale, v_scale))
        k_new = quantize(k_new, ks_new, fmt).float() * ks_new
        v_new = quantize(v_new, vs_new, fmt).float() * vs_new
    result = attention_with_kvcache(q.float(), k32, v32, cache_seqlens=cache_seqlens, k_new=k_new,
                                    v_new=v_new, **options)
    k_cache.copy_(quantize(k32, ks, fmt))
    v_cache.copy_(quantize(v32, vs, fmt))
    if options["return_lse"]:
        return result[0].to(q.dtype), result[1]
    return result.to(q.dtype)


# ------------------------------------------------------------------------------- validation

class _Call:
    """A validated call: array info, sizes (bhsd), and the arguments in the kernels' terms."""

    __slots__ = ("info", "batch", "heads_q", "seqlen_q", "heads_k", "seqlen_max", "seqlen_new",
                 "head_dim", "layout", "causal", "scale", "window", "softcap", "lengths",
                 "uniform", "page_size", "num_pages", "pages", "return_lse", "kv_format", "leftpad")

    def __init__(self, **values):
        for name, value in values.items():
            setattr(self, name, value)


def _validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window, softcap,
              layout, return_lse, block_table=None, sinks=None, scales=(None, None),
              leftpad=None) -> _Call:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'bhsd' or 'bshd', got {layout!r}")
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    if (k_new is None) != (v_new is None):
        given, missing = ("k_new", "v_new") if v_new is None else ("v_new", "k_new")
        raise ValueError(f"{missing}: expected an array when {given} is given, got None")
    kv_format = None
    if _is_fp8_call(k_cache, v_cache, scales):  # the caches' dtype is theirs, not q's
        kv_format = _check_fp8(q, k_cache, v_cache, *scales, layout, block_table is not None)

    info = arrays.describe(q, "q")
    named = [("q", q, info)]
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if x is not None:
            named.append((name, x, arrays.describe(x, name)))
    for name, x, other in named:
        if other.library not in _LIBRARIES:
            raise TypeError(f"{name}: expected a NumPy array, torch tensor or CuPy array (the "
                            f"caches are written in place), got {arrays.library_label(other)}")
        check_like_q(name, other, info)
        if other.dtype != info.dtype and not (kv_format and name in ("k_cache", "v_cache")):
            raise TypeError(f"{name}: expected dtype {info.dtype} (as q), got {other.dtype}")
    if info.library == "torch":
        check_no_grad(named, "attention_with_kvcache is inference only, not differentiable")

    pattern = {"bhsd": "(B, H, S, D)", "bshd": "(B, S, H, D)"}[layout]
    for name, _, other in named:
        if len(other.shape) != 4:
            raise ValueError(f"{name}: expected a 4-d array {pattern} for layout {layout!r}, "
                             f"got shape {other.shape}")

    def bhsd(shape):
        return tuple(shape) if layout == "bhsd" else (shape[0], shape[2], shape[1], shape[3])

    shapes = {name: bhsd(other.shape) for name, _, other in named}
    paged = block_table is not None
    if paged:  # (num_pages, page_size, Hk, D) in every layout, seen here as (pages, Hk, rows, D)
        for name, _, other in named[1:3]:
            shapes[name] = tuple(other.shape[i] for i in (0, 2, 1, 3))
    batch, heads_q, seqlen_q, head_dim = shapes["q"]
    _, heads_k, seqlen_max, k_head_dim = shapes["k_cache"]
    page_size = num_pages = 0
    pages = None
    if paged:
        num_pages, page_size = shapes["k_cache"][0], seqlen_max
        pages, seqlen_max = check_block_table(block_table, info, batch, num_pages, page_size,
                                              "k_cache")
    check_head_dim(head_dim)
    if not paged and shapes["k_cache"][0] != batch:
        raise ValueError(f"k_cache: expected batch size {batch} (as q), got {shapes['k_cache'][0]}")
    check_head_dim(head_dim, ("k_cache", k_head_dim))
    check_groups(heads_q, heads_k, "k_cache")
    if shapes["v_cache"] != shapes["k_cache"]:
        want = tuple(named[1][2].shape) if paged else _in_layout(shapes['k_cache'], layout)
        raise ValueError(f"v_cache: expected shape {want} (as k_cache), got {tuple(named[2][2].shape)}")
    seqlen_new = 0
    if k_new is not None:
        kb, kh, seqlen_new, kd = shapes["k_new"]
        if (kb, kh, kd) != (batch, heads_k, head_dim):
            want = _in_layout((batch, heads_k, "Snew", head_dim), layout)
            raise ValueError(f"k_new: expected shape {want} (B, Hk and D as the caches), got "
                             f"{tuple(named[3][2].shape)}")
        if shapes["v_new"] != shapes["k_new"]:
            raise ValueError(f"v_new: expected shape {_in_layout(shapes['k_new'], layout)} (as "
                             f"k_new), got {tuple(named[4][2].shape)}")
        if seqlen_new > seqlen_max:
            raise ValueError(f"k_new: expected at most {seqlen_max} new tokens (the cache "
                             f"length), got {seqlen_new}")
        for name, x, _ in named[1:3]:
            if info.library == "numpy" and not x.flags.writeable:
                raise ValueError(f"{name}: expected a writable array (k_new and v_new are "
                                 f"written into it), got a read-only one")
    # Keeps the kernels' int arithmetic on lengths and window bounds far from overflow.
    if seqlen_max + 2 * seqlen_q >= 2**30:
        raise ValueError(f"k_cache: expected a cache length below {2**30 - 2 * seqlen_q} with "
                         f"{seqlen_q} query tokens, got {seqlen_max}")

    lengths, uniform = _check_seqlens(cache_seqlens, info, batch, seqlen_new, seqlen_max)
    leftpad = _check_leftpad(leftpad, info, batch, lengths)
    if sinks is not None:
        check_sinks(sinks, info, heads_q)
    # window and softcap follow attention()'s rules and messages (causal folds in as right = 0).
    window, softcap = band(causal, window), check_softcap(softcap)
    return _Call(info=info, batch=batch, heads_q=heads_q, seqlen_q=seqlen_q, heads_k=heads_k,
                 seqlen_max=seqlen_max, seqlen_new=seqlen_new, head_dim=head_dim, layout=layout,
                 causal=causal, scale=check_scale(scale, head_dim),
                 window=window, softcap=softcap,
                 lengths=lengths, uniform=uniform, page_size=page_size, num_pages=num_pages,
                 pages=pages, return_lse=return_lse, kv_format=kv_format, leftpad=leftpad)


def _in_layout(bhsd_shape, layout):
    b, h, s, d = bhsd_shape
    return (b, h, s, d) if layout == "bhsd" else (b, s, h, d)


def _check_seqlens(cache_seqlens, info, batch, seqlen_new, seqlen_max):
    """(lengths, uniform): host lengths as an int64 NumPy array (None for a GPU array, which is
    never read here), and the one length of an int argument (None otherwise)."""
    limit = f"0 <= cache_seqlens and cache_seqlens + Snew <= Smax (Snew = {seqlen_new}, Smax = {seqlen_max})"
    if isinstance(cache_seqlens, (numbers.Integral, np.integer)) and not isinstance(cache_seqlens, (bool, np.bool_)):
        n = int(cache_seqlens)
        if not (0 <= n and n + seqlen_new <= seqlen_max):
            raise ValueError(f"cache_seqlens: expected {limit}, got {n}")
        return np.full(batch, n, dtype=np.int64), n
    try:
        lens = arrays.describe(cache_seqlens, "cache_seqlens")
    except TypeError:
        raise TypeError(f"cache_seqlens: expected an int32 array (B,) or an int, got "
                        f"{type(cache_seqlens).__module__}.{type(cache_seqlens).__qualname__}") from None
    check_like_q("cache_seqlens", lens, info, or_else=" or an int")
    if lens.dtype != "int32":
        raise TypeError(f"cache_seqlens: expected dtype int32, got {lens.dtype}")
    if tuple(lens.shape) != (batch,):
        raise ValueError(f"cache_seqlens: expected shape ({batch},) (the batch size of q), got "
                         f"{tuple(lens.shape)}")
    if info.device != "cpu":
        return None, None
    values = np.asarray(arrays.to_host_numpy(cache_seqlens, lens), dtype=np.int64)
    bad = (values < 0) | (values + seqlen_new > seqlen_max)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"cache_seqlens: expected {limit}, got {int(values[b])} at batch {b}")
    return values, None


def _check_leftpad(cache_leftpad, info, batch, lengths):
    """cache_leftpad: None, or int32 (B,) in q's library and device. Host values (with host
    lengths) must lie in [0, cache_seqlens[b]] (ValueError); a GPU array is not read here: the
    kernels clamp it to that range. Returns the host values as int64 (zeros for None), or None
    for a GPU array."""
    if cache_leftpad is None:
        return np.zeros(batch, dtype=np.int64) if lengths is not None else None
    pads = check_vector("cache_leftpad", cache_leftpad, info, "int32", batch, "B", "the batch size of q")
    if info.device != "cpu":
        return None
    values = np.asarray(arrays.to_host_numpy(cache_leftpad, pads), dtype=np.int64)
    bad = (values < 0) | (values > lengths)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"cache_leftpad: expected 0 <= cache_leftpad <= cache_seqlens, got "
                         f"{int(values[b])} against {int(lengths[b])} at batch {b}")
    return values


# ------------------------------------------------------------------------------- reference

def _run_reference(q, k_cache, v_cache, k_new, v_new, block_table, sinks, call):
    """Append on the host in the caller's library (so the caller's caches change), then the
    NumPy reference forward per sequence over its first Sk_b cache rows (gathered from its pages
    when the caches are paged)."""
    if k_new is not None and call.seqlen_new:
        _append_on_host(k_cache, v_cache, k_new, v_new, call)
    seqlens_k = call.lengths + call.seqlen_new
    variant = {}
    if call.window != (-1, -1):
        variant["window"] = call.window
    if call.softcap:
        variant["softcap"] = call.softcap
    if sinks is not None:
        variant["sinks"] = np.asarray(arrays.to_host_numpy(sinks, arrays.describe(sinks, "sinks")),
                                      dtype=np.float32)

    def rows_of(cache, b, length):
        """Sequence b's rows [cache_leftpad[b], length) as (1, Hk, rows, D), from its pages if
        paged (the keys attended: the band is aligned with their end, `length`)."""
        start = int(call.leftpad[b])
        if call.pages is None:
            return cache[b:b + 1, :, start:length]
        # run_on_host handed the pages over as (P, page_size, Hk, D) ("bhsd") or transposed to
        # (P, Hk, page_size, D) ("bshd"); gather this sequence's pages in table order.
        pages = cache[call.pages[b]]
        if call.layout == "bshd":
            pages = pages.transpose(0, 2, 1, 3)
        rows = pages.reshape(-1, *pages.shape[2:])[start:length]  # (rows, Hk, D)
        return rows.transpose(1, 0, 2)[None]

    def forward(hq, hk, hv, *, causal, scale, out, lse):
        for b, length in enumerate(seqlens_k):
            reference.flash_attention_forward(
                hq[b:b + 1], rows_of(hk, b, length), rows_of(hv, b, length), causal=causal,
                scale=scale, out=out[b:b + 1], lse=lse[b:b + 1], **variant)

    dims = (call.batch, call.heads_q, call.seqlen_q, call.seqlen_max, call.head_dim)
    return arrays.run_on_host(forward, q, k_cache, v_cache, call.info, layout=call.layout,
                              causal=call.causal, scale=call.scale, dims=dims)


def _append_on_host(k_cache, v_cache, k_new, v_new, call):
    torch_library = call.info.library == "torch"

    def bhsd(x):
        if call.layout == "bhsd":
            return x
        return x.transpose(1, 2) if torch_library else x.transpose(0, 2, 1, 3)

    kn, vn = bhsd(k_new), bhsd(v_new)
    if call.pages is None:
        kc, vc = bhsd(k_cache), bhsd(v_cache)
        targets = [(kc[b, :, int(n):int(n) + call.seqlen_new], vc[b, :, int(n):int(n) + call.seqlen_new],
                    kn[b], vn[b]) for b, n in enumerate(call.lengths)]
    else:  # row r of sequence b: page pages[b, r // page_size], row r % page_size, (Hk, D)
        targets = []
        for b, n in enumerate(call.lengths):
            for t in range(call.seqlen_new):
                page, row = divmod(int(n) + t, call.page_size)
                page = int(call.pages[b, page])
                targets.append((k_cache[page, row], v_cache[page, row], kn[b, :, t], vn[b, :, t]))
    if torch_library:
        import torch
        with torch.no_grad():
            for kd, vd, ks, vs in targets:
                kd.copy_(ks)
                vd.copy_(vs)
    else:
        for kd, vd, ks, vs in targets:
            kd[...] = ks
            vd[...] = vs


# ------------------------------------------------------------------------------- cuda

DECODE_PARAMS = params.DECODE_PARAMS  # kernels_common/params.h's DecodeParams
MAX_GRID_YZ = launch.MAX_GRID_YZ
LOG2_E = math.log2(math.e)

# Splits of one (batch, kv head)'s keys at most: bounds the workspace and the merge's loop.
MAX_SPLITS = 128
# Tuning aid: XATTN_DECODE_SPLITS=n forces n splits (read once, at import).
_FORCED_SPLITS = int(os.environ.get("XATTN_DECODE_SPLITS", "0") or 0)
# The cache copies' L2 prefetch hint (0, 128 or 256 bytes; decode_common.h, L2_PREFETCH).
# ci/tune_decode.py compares them; XATTN_DECODE_L2_PREFETCH sets it (read once, at import).
L2_PREFETCH = int(os.environ.get("XATTN_DECODE_L2_PREFETCH", "0") or 0)
# Defines added to every decode variant: ci/tune_decode.py compares kernel switches with them.
EXTRA_DEFINES: dict = {}


@functools.lru_cache(maxsize=4096)
def num_splits(base_blocks: int, slots: int, steps: int, fixed_steps: int) -> int:
    """How many thread blocks share the keys of one (batch, kv head, row tile).

    base_blocks: blocks with one split (row tiles x kv heads x batch); slots: blocks the GPU
    runs at once (SMs x blocks per SM); steps: pipeline steps of keys per (batch, kv head);
    fixed_steps: a block's cost besides its steps (pipeline fill, epilogue), in steps.
    Minimizes waves x (steps per block + fixed_steps): enough splits to fill the GPU, not so
    many that the per-block overhead, or a last wave that is mostly empty, dominates."""
    if _FORCED_SPLITS:
        return max(1, min(_FORCED_SPLITS, steps, MAX_SPLITS))
    best, best_cost = 1, None
    for splits in range(1, max(1, min(steps, MAX_SPLITS)) + 1):
        waves = -(-base_blocks * splits // slots)
        cost = waves * (-(-steps // splits) + fixed_steps)
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


_device_attributes: dict[int, tuple[int, int]] = {}


def _device(device_id: int) -> tuple[int, int]:
    """(compute capability as major * 10 + minor, SM count) of a device, read once."""
    found = _device_attributes.get(device_id)
    if found is None:
        import cupy

        found = _device_attributes[device_id] = (int(cupy.cuda.Device(device_id).compute_capability),
                                                 launch.multiprocessors(device_id))
    return found


def _tile_rows(cfg, rows: int) -> int:
    """Query rows per tile: 16-bit kernels take 16, 32 or 64 (up to the row's block_m), the
    fewest that hold `rows`; float32 always its table's block_m."""
    if cfg.kernel == "flash_decode_f32":
        return cfg.block_m
    tile = 16
    while tile < rows and tile < cfg.block_m:
        tile *= 2
    return tile


def _plan(dtype: str, device: int, batch: int, heads_q: int, heads_k: int, seqlen_q: int,
          seqlen_max: int, head_dim: int, window):
    """(table row, query rows per tile, row tiles, splits, (left, right)) of one call.

    window: (left, right) with causal folded in; bounds past every possible key distance become
    -1 (unbounded), which also keeps the kernel's int arithmetic small."""
    arch, sm_count = _device(device)
    rows = (heads_q // heads_k) * seqlen_q
    cfg = configs.select(configs.DECODE_KERNEL_FOR_DTYPE[dtype], arch, head_dim, False)
    tile_rows = _tile_rows(cfg, rows)
    m_blocks = max(1, -(-rows // tile_rows))
    left, right = ((-1 if w >= seqlen_max + seqlen_q else w) for w in window)
    band = seqlen_max  # the keys one sequence's queries can see span at most left + right + Sq
    if left >= 0:
        band = min(band, left + seqlen_q + (right if right >= 0 else 0))
    splits = num_splits(m_blocks * heads_k * batch, sm_count * cfg.min_blocks,
                        max(1, -(-band // cfg.block_n)), cfg.stages)
    if seqlen_q == 0:
        splits = 1  # an append-only call: no attention, no merge
    if m_blocks * splits >= 2**31:
        raise ValueError(f"q: too many query rows per kv head ({rows})")
    return cfg, tile_rows, m_blocks, splits, (left, right)


def _pointer(x) -> int:
    return x.data_ptr() if hasattr(x, "data_ptr") else x.data.ptr


def _strides(x, library: str) -> tuple:
    """Strides in elements (torch and CuPy alike)."""
    if library == "torch":
        return tuple(x.stride())
    return tuple(st // x.itemsize for st in x.strides)


def _signature(x, library: str):
    """What a plan depends on of one array: shape, strides, dtype, device, and whether its
    address is 16-byte aligned (16-byte copies need it)."""
    if x is None:
        return None
    if library == "torch":
        return (tuple(x.shape), x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0)
    return (x.shape, x.strides, x.dtype, x.device.id, x.data.ptr % 16 == 0)


_plans: dict = {}
_MAX_PLANS = 4096  # forget them all past this many signatures (a bound, not an LRU)


def _plan_key(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window, softcap,
              layout, return_lse, backend, block_table, sinks, scales, leftpad):
    library = "torch" if type(q).__module__.startswith("torch") else "cupy"
    seqlens = ("int",) if isinstance(cache_seqlens, int) else _signature(cache_seqlens, library)
    return (library, backend, os.environ.get(backends.ENVIRONMENT_VARIABLE),
            _signature(q, library), _signature(k_cache, library), _signature(v_cache, library),
            _signature(k_new, library), _signature(v_new, library), seqlens,
            _signature(block_table, library), _signature(sinks, library),
            _signature(scales[0], library), _signature(scales[1], library),
            _signature(leftpad, library), causal, scale, window, softcap, layout, return_lse)


def _cached_plan(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window, softcap,
                 layout, return_lse, backend, block_table, sinks, scales, leftpad):
    """The plan of a GPU call seen before with the same signature, or None (then the full
    validation runs). Only torch CUDA tensors and CuPy arrays take this path; a torch input that
    requires grad under grad mode goes the long way, which raises."""
    module = type(q).__module__
    if module.startswith("torch"):
        if not q.is_cuda:
            return None
        torch = sys.modules["torch"]
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (q, k_cache, v_cache, k_new, v_new)):
            return None
    elif not module.startswith("cupy"):
        return None
    if not _plans or backends.hip_on_cuda:  # no plans under xattn.hip.on_cuda: the HIP decode
        return None
    try:
        key = _plan_key(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window,
                        softcap, layout, return_lse, backend, block_table, sinks, scales, leftpad)
        plan = _plans.get(key)
    except (AttributeError, TypeError):  # an argument of another kind: validation says what
        return None
    if plan is not None and plan.uniform is not None and cache_seqlens != plan.uniform:
        return plan.with_uniform(cache_seqlens)  # checked against the plan's limits there
    return plan


def _remember(plan, *arguments):
    try:
        key = _plan_key(*arguments)
    except (AttributeError, TypeError):
        return
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[key] = plan


class _Plan:
    """Everything of one GPU call signature but its pointers: the packed parameter block, the
    decode's launch and, with several splits, the merge's on it (one launch.Sequence: a call
    patches the block under its lock), and how to allocate out, lse and the workspace."""

    def __init__(self, call, params, launches, merged, workspace_floats, lse_part_offset, device):
        self.call, self.params, self.launches, self.merged = call, params, launches, merged
        self.workspace_floats, self.lse_part_offset, self.device = workspace_floats, lse_part_offset, device
        self.uniform = call.uniform
        self.library = call.info.library
        self.out_shape = _in_layout((call.batch, call.heads_q, call.seqlen_q, call.head_dim), call.layout)
        self.lse_shape = (call.batch, call.heads_q, call.seqlen_q)

    copied = ()  # names of the inputs copied contiguous before each launch

    def with_uniform(self, length):
        """This plan for another int cache_seqlens (a host value: checked here, as validation
        would): the same launches, whose block takes the length as a per-call scalar (run)."""
        if isinstance(length, bool) or not isinstance(length, int):
            return None
        if not (0 <= length and length + self.call.seqlen_new <= self.call.seqlen_max):
            return None  # the full validation raises the ValueError
        other = copy.copy(self)
        other.uniform = length
        return other

    def run(self, q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks,
            scales=(None, None), outputs=None, leftpad=None):
        """Launch on these arrays; outputs=(out, lse, workspace) are given by kernel checks
        (poisoned beforehand), else allocated here."""
        call = self.call
        if self.copied:  # the inputs whose last dimension is strided: one contiguous copy each
            q, k_new, v_new = (_contiguous(x, self.library) if name in self.copied else x
                               for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new)))
        if outputs is not None:
            out, lse, part = outputs
            stream = (launch.torch_stream(q.device.index) if self.library == "torch"
                      else sys.modules["cupy"].cuda.get_current_stream().ptr)
        elif self.library == "torch":
            import torch

            out = torch.empty(self.out_shape, dtype=q.dtype, device=q.device)
            lse = (torch.empty(self.lse_shape, dtype=torch.float32, device=q.device)
                   if call.return_lse or self.merged else None)
            part = (torch.empty(self.workspace_floats, dtype=torch.float32, device=q.device)
                    if self.workspace_floats else None)
            stream = launch.torch_stream(q.device.index)
        else:
            import cupy

            with cupy.cuda.Device(self.device):
                out = cupy.empty(self.out_shape, dtype=q.dtype)
                lse = (cupy.empty(self.lse_shape, dtype=cupy.float32)
                       if call.return_lse or self.merged else None)
                part = cupy.empty(self.workspace_floats, dtype=cupy.float32) if self.workspace_floats else None
            stream = cupy.cuda.get_current_stream().ptr
        pointers = {name: 0 if x is None else _pointer(x) for name, x in (
            ("q", q), ("k", k_cache), ("v", v_cache), ("o", out), ("lse", lse), ("k_new", k_new),
            ("v_new", v_new), ("block_table", block_table), ("sinks", sinks),
            ("k_scale", scales[0]), ("v_scale", scales[1]), ("cache_leftpad", leftpad))}
        pointers["cache_seqlens"] = 0 if self.uniform is not None else _pointer(cache_seqlens)
        if part is not None:
            base = _pointer(part)
            pointers["o_part"], pointers["lse_part"] = base, base + self.lse_part_offset
        scalars = {"uniform_seqlen": self.uniform} if self.uniform is not None else None
        self._launch(pointers, stream, scalars)
        if lse is not None and not call.return_lse:
            lse = None
        return out, lse

    def _launch(self, pointers: dict, stream: int, scalars) -> None:
        """The decode (and the merge) on `stream`, on the plan's device; batches past 65535
        entries go in chunks, each chunk's first entry in the block (launch.Launch)."""
        import cupy

        if cupy.cuda.runtime.getDevice() == self.device:
            self.launches(pointers, stream, scalars)
            return
        with cupy.cuda.Device(self.device):
            self.launches(pointers, stream, scalars)


def _bhsd_strides(x, library: str, layout: str) -> tuple:
    st = _strides(x, library)
    return st if layout == "bhsd" else (st[0], st[2], st[1], st[3])


def _new_plan(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks, call,
              scales=(None, None), leftpad=None) -> _Plan:
    """Validate what only the GPU path needs, choose the kernels and pack the parameter block."""
    library, layout = call.info.library, call.layout
    paged = block_table is not None
    _check_cache_strides(k_cache, v_cache, call)
    # q, k_new and v_new whose last dimension is strided (or a negative-bit torch view) are
    # copied contiguous before each launch (Plan.run); the block holds the copy's strides.
    copied = tuple(name for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new))
                   if _needs_copy(x, call))
    device = call.info.device_id
    itemsize = 4 if call.info.dtype == "float32" else 2
    dtype = call.info.dtype
    batch, heads_q, heads_k, seqlen_q = call.batch, call.heads_q, call.heads_k, call.seqlen_q
    cfg, tile_rows, m_blocks, splits, (left, right) = _plan(
        dtype, device, batch, heads_q, heads_k, seqlen_q, call.seqlen_max, call.head_dim, call.window)
    if heads_k > MAX_GRID_YZ:
        raise ValueError(f"k_cache: at most {MAX_GRID_YZ} heads are supported, got {heads_k}")

    kv_fp8 = configs.DECODE_FP8_FORMATS.get(call.kv_format, 0)
    # 16-byte copies: of elements for q, k_new, v_new; of cache elements (1-byte codes) for FP8
    per_vector = {name: 16 // (1 if kv_fp8 and name in ("k_cache", "v_cache") else itemsize)
                  for name in ("q", "k_cache", "v_cache", "k_new", "v_new")}

    def strides_of(name, x):  # (B, H, S) strides the kernels see, in the layout's terms
        if name in copied:
            return _contiguous_strides(tuple(x.shape))[:3]
        return _strides(x, library)[:3]

    strided = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    strided += [("k_new", k_new), ("v_new", v_new)] if k_new is not None else []
    vec = all(call.head_dim % per_vector[name] == 0 and (name in copied or _pointer(x) % 16 == 0)
              and all(st % per_vector[name] == 0 for st in strides_of(name, x)) for name, x in strided)
    params = np.zeros(1, DECODE_PARAMS)
    p = params[0]
    for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        if x is not None:
            st = strides_of(name, x)
            p[name]["batch_stride"], p[name]["head_stride"], p[name]["row_stride"] = \
                st if layout == "bhsd" else (st[0], st[2], st[1])
    for name, x in (("k", k_cache), ("v", v_cache)):
        st = _strides(x, library)
        if paged:  # (pages, page_size, Hk, D): batch_stride is the page stride
            p[name]["batch_stride"], p[name]["head_stride"], p[name]["row_stride"] = st[0], st[2], st[1]
        else:
            p[name]["batch_stride"], p[name]["head_stride"], p[name]["row_stride"] = \
                _bhsd_strides(x, library, layout)[:3]
    ob, oh, os_, _ = (st for st in _contiguous_strides(
        _in_layout((batch, heads_q, seqlen_q, call.head_dim), layout)))
    p["o"]["batch_stride"], p["o"]["head_stride"], p["o"]["row_stride"] = \
        (ob, oh, os_) if layout == "bhsd" else (ob, os_, oh)
    p["lse"]["batch_stride"], p["lse"]["head_stride"], p["lse"]["row_stride"] = heads_q * seqlen_q, seqlen_q, 1
    if call.uniform is None:
        p["seqlens_stride"] = _strides(cache_seqlens, library)[0]
    else:
        p["uniform_seqlen"] = call.uniform
    if leftpad is not None:
        p["leftpad_stride"] = _strides(leftpad, library)[0]
    if paged:
        p["block_table_stride"] = _strides(block_table, library)[0]
        p["num_pages"] = call.num_pages
    p["heads_q"], p["heads_per_kv"], p["seqlen_q"] = heads_q, heads_q // heads_k, seqlen_q
    p["seqlen_new"] = call.seqlen_new if k_new is not None else 0
    p["seqlen_max"], p["head_dim"] = call.seqlen_max, call.head_dim
    p["window_left"], p["window_right"] = left, right
    p["num_splits"], p["m_blocks"] = splits, m_blocks
    p["scale_log2"] = call.scale * LOG2_E
    p["softcap_log2"] = call.softcap * LOG2_E
    p["scale_over_softcap"] = call.scale / call.softcap if call.softcap else 0.0
    if kv_fp8:  # one scale per tensor (stride 0) or per kv head
        for name, x in zip(("k_scale_stride", "v_scale_stride"), scales):
            p[name] = 0 if x.numel() == 1 else x.stride(0)

    rows_bhs = heads_q * seqlen_q
    workspace = batch * rows_bhs * splits * (cfg.head_dim + 1) if splits > 1 else 0
    lse_part_offset = 4 * batch * rows_bhs * splits * cfg.head_dim
    decode = kernels.cuda(cfg.kernel)
    defines = decode.defines(cfg, dtype, rows=tile_rows, vec=vec, softcap=bool(call.softcap),
                             page_size=call.page_size, kv_fp8=kv_fp8, l2_prefetch=L2_PREFETCH) | EXTRA_DEFINES
    sizes = kernels.Sizes(seqlen_q=seqlen_q, heads_q=heads_q, heads_k=heads_k, m_blocks=m_blocks,
                          splits=splits)
    steps = [decode.launch(defines, sizes, params, batch, device)]
    if splits > 1:
        merge = kernels.cuda("flash_decode_merge")
        steps.append(merge.launch(merge.defines(cfg, dtype), sizes, params, batch, device))
    plan = _Plan(call, params, launch.Sequence(steps), splits > 1, workspace, lse_part_offset,
                 device)
    plan.copied = copied
    return plan


def _check_cache_strides(k_cache, v_cache, call) -> None:
    """The caches are written in place and read without a copy: unit stride along D."""
    library = call.info.library
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        stride = _strides(cache, library)[-1]
        empty = (cache.numel() if library == "torch" else cache.size) == 0  # any strides will do
        if call.head_dim > 1 and stride != 1 and not empty:
            raise ValueError(f"{name}: expected unit stride along D (the cache is written in place "
                             f"and read without a copy), got stride {stride}")
        if library == "torch" and cache.is_neg():
            raise ValueError(f"{name}: expected a tensor whose memory holds its values, got a "
                             f"negative-bit view; pass a resolved tensor (.resolve_neg())")


def _needs_copy(x, call) -> bool:
    """q, k_new or v_new whose last dimension is strided (or a negative-bit torch view): the
    kernels read it through a contiguous copy."""
    return x is not None and call.head_dim > 1 and (
        _strides(x, call.info.library)[-1] != 1 or (call.info.library == "torch" and x.is_neg()))


# ------------------------------------------------------------------------------- hip

def _run_hip(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks, call,
             outputs=None, scales=(None, None), leftpad=None):
    """(out, lse) of the HIP decode (xattn.hip.decode: append, split-KV decode, merge) on
    contiguous or paged caches (paged and FP8 caches: the portable decode), with sinks or
    without; the launch plan is cached per signature below this (xattn.hip.launch_decode), this
    function only checks the caches' strides and allocates. outputs=(out, lse, workspace) are
    the kernel checks' (launch_for_check), else allocated here; scales: (k_scale, v_scale) of FP8
    caches."""
    from xattn import hip

    _check_cache_strides(k_cache, v_cache, call)
    library = call.info.library
    q, k_new, v_new = (_contiguous(x, library) if _needs_copy(x, call) else x for x in (q, k_new, v_new))
    out_shape = _in_layout((call.batch, call.heads_q, call.seqlen_q, call.head_dim), call.layout)
    lse_shape = (call.batch, call.heads_q, call.seqlen_q)
    if library == "torch":
        import torch

        def empty(shape, dtype=torch.float32):
            return torch.empty(shape, dtype=dtype, device=q.device)
        stream = launch.torch_stream(q.device.index)

        def swap(x):  # the middle axes
            return x.transpose(1, 2)
    else:
        import cupy

        def empty(shape, dtype=cupy.float32):
            with cupy.cuda.Device(call.info.device_id):
                return cupy.empty(shape, dtype=dtype)
        stream = cupy.cuda.get_current_stream().ptr

        def swap(x):  # the middle axes
            return x.transpose(0, 2, 1, 3)
    if outputs is not None:
        out, lse, workspace = outputs
    else:
        out, lse, workspace = empty(out_shape, q.dtype), empty(lse_shape), empty
    bhsd = (lambda x: x) if call.layout == "bhsd" else swap
    with_new = k_new is not None and call.seqlen_new
    # Paged caches are (num_pages, page_size, Hk, D) in every layout: seen as (pages, Hk, rows, D).
    cache_view = bhsd if block_table is None else swap
    hip.decode(bhsd(q), cache_view(k_cache), cache_view(v_cache), bhsd(k_new) if with_new else None,
               bhsd(v_new) if with_new else None, bhsd(out), lse,
               None if call.uniform is not None else cache_seqlens, call, workspace, stream,
               block_table, sinks, scales if call.kv_format is not None else (None, None), leftpad)
    return out, lse


def _contiguous(x, library: str):
    """A contiguous copy on the caller's current stream (torch's, or CuPy's)."""
    if library == "torch":
        return x.resolve_neg().contiguous()
    return sys.modules["cupy"].ascontiguousarray(x)


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def launch_for_check(q, k_cache, v_cache, cache_seqlens, out, lse, workspace, *, k_new=None,
                     v_new=None, causal=True, scale=None, window=None, softcap=None,
                     layout="bhsd", block_table=None, sinks=None, k_scale=None, v_scale=None,
                     cache_leftpad=None):
    """The GPU launch below the public function, for kernel checks: validates as the public
    function does (cache_seqlens a device array, never read here), plans, and launches into the
    caller's out (layout's shape) and lse ((B, Hq, Sq) float32); workspace(n) returns n float32
    elements (poisoned by the caller) for the split partials."""
    scales, leftpad = (k_scale, v_scale), cache_leftpad
    call = _validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window,
                     softcap, layout, True, block_table, sinks, scales, leftpad)
    if backends.hip_on_cuda:  # the HIP decode serves CUDA memory (xattn.hip.on_cuda): no plan
        _run_hip(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks, call,
                 outputs=(out, lse, workspace), scales=scales, leftpad=leftpad)
        return None
    plan = _new_plan(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks, call,
                     scales, leftpad)
    o = plan.params[0]["o"]  # the caller's out, whatever its strides (the plan assumed contiguous)
    st = _bhsd_strides(out, call.info.library, layout)
    o["batch_stride"], o["head_stride"], o["row_stride"] = st[:3]
    part = workspace(plan.workspace_floats) if plan.workspace_floats else None
    plan.run(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks, scales,
             outputs=(out, lse, part), leftpad=leftpad)
    return plan
