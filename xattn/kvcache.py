"""xattn.attention_with_kvcache: attention of a few new query tokens against a KV cache.

The public function validates once, then runs on the reference backend (host arrays: the new
keys and values are written into the caches, then the NumPy reference attends per sequence) or on
the cuda backend (kernels_cuda/flash_decode.cu: kvcache_append, flash_decode, flash_decode_merge).

The GPU path never reads cache_seqlens on the host and allocates only through the caller's
framework (torch's caching allocator, CuPy's pool) on the caller's stream, so a call can be
captured in a CUDA graph. Launch arithmetic lives in `_launch_decode`.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import sys

import numpy as np

from xattn import api, arrays, backends, configs, reference

_LIBRARIES = ("numpy", "torch", "cupy")  # the caches are written in place: real arrays only


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, k_new=None, v_new=None,
                           causal=True, scale=None, window=None, softcap=None, layout="bhsd",
                           return_lse=False, backend=None):
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

    Inference only: not differentiable. A torch input that requires grad while grad mode is on
    raises TypeError (call it under torch.no_grad(), or pass detached tensors).
    """
    call = _validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window,
                     softcap, layout, return_lse)
    info = call.info
    chosen = backends.choose_backend(backend, info.device, arrays.device_label(info))
    if chosen == "reference":
        api._check_dtype(info, api.REFERENCE_DTYPES)
        out, lse = _run_reference(q, k_cache, v_cache, k_new, v_new, call)
    elif chosen == "cuda":
        api._check_dtype(info, api.GPU_DTYPES, backend_name=chosen)
        backends.gpu_forward(chosen)  # RuntimeError naming what to install where cuda is unusable
        out, lse = _run_cuda(q, k_cache, v_cache, k_new, v_new, cache_seqlens, call)
    else:
        raise ValueError(f"backend: attention_with_kvcache runs on the 'reference' and 'cuda' "
                         f"backends, got {chosen!r}")
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------- validation

class _Call:
    """A validated call: array info, sizes (bhsd), and the arguments in the kernels' terms."""

    __slots__ = ("info", "batch", "heads_q", "seqlen_q", "heads_k", "seqlen_max", "seqlen_new",
                 "head_dim", "layout", "causal", "scale", "window", "softcap", "lengths",
                 "uniform")

    def __init__(self, **values):
        for name, value in values.items():
            setattr(self, name, value)


def _validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, window, softcap,
              layout, return_lse) -> _Call:
    if not isinstance(layout, str) or layout not in api.LAYOUTS:
        raise ValueError(f"layout: expected 'bhsd' or 'bshd', got {layout!r}")
    api._check_bool("causal", causal)
    api._check_bool("return_lse", return_lse)
    if (k_new is None) != (v_new is None):
        given, missing = ("k_new", "v_new") if v_new is None else ("v_new", "k_new")
        raise ValueError(f"{missing}: expected an array when {given} is given, got None")

    info = arrays.describe(q, "q")
    named = [("q", q, info)]
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if x is not None:
            named.append((name, x, arrays.describe(x, name)))
    for name, x, other in named:
        if other.library not in _LIBRARIES:
            raise TypeError(f"{name}: expected a NumPy array, torch tensor or CuPy array (the "
                            f"caches are written in place), got {arrays.library_label(other)}")
        api.check_like_q(name, other, info)
        if other.dtype != info.dtype:
            raise TypeError(f"{name}: expected dtype {info.dtype} (as q), got {other.dtype}")
    if info.library == "torch":
        _check_no_grad(named)

    pattern = {"bhsd": "(B, H, S, D)", "bshd": "(B, S, H, D)"}[layout]
    for name, _, other in named:
        if len(other.shape) != 4:
            raise ValueError(f"{name}: expected a 4-d array {pattern} for layout {layout!r}, "
                             f"got shape {other.shape}")

    def bhsd(shape):
        return tuple(shape) if layout == "bhsd" else (shape[0], shape[2], shape[1], shape[3])

    shapes = {name: bhsd(other.shape) for name, _, other in named}
    batch, heads_q, seqlen_q, head_dim = shapes["q"]
    _, heads_k, seqlen_max, k_head_dim = shapes["k_cache"]
    if not 1 <= head_dim <= api.MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim D in 1..{api.MAX_HEAD_DIM}, got {head_dim}")
    if shapes["k_cache"][0] != batch:
        raise ValueError(f"k_cache: expected batch size {batch} (as q), got {shapes['k_cache'][0]}")
    if k_head_dim != head_dim:
        raise ValueError(f"k_cache: expected head dim {head_dim} (as q), got {k_head_dim}")
    if heads_k < 1:
        raise ValueError(f"k_cache: expected at least 1 head, got {heads_k}")
    if heads_q % heads_k:
        raise ValueError(f"q: expected a number of heads divisible by k_cache's {heads_k} heads "
                         f"(GQA), got {heads_q}")
    if shapes["v_cache"] != shapes["k_cache"]:
        raise ValueError(f"v_cache: expected shape {_in_layout(shapes['k_cache'], layout)} (as "
                         f"k_cache), got {tuple(named[2][2].shape)}")
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
    # window and softcap follow attention()'s rules and messages (causal folds in as right = 0).
    variant = api._variant_options(info, (batch, heads_q), causal, window, softcap, None)
    return _Call(info=info, batch=batch, heads_q=heads_q, seqlen_q=seqlen_q, heads_k=heads_k,
                 seqlen_max=seqlen_max, seqlen_new=seqlen_new, head_dim=head_dim, layout=layout,
                 causal=causal, scale=_check_scale(scale, head_dim),
                 window=variant["window"], softcap=variant["softcap"],
                 lengths=lengths, uniform=uniform)


def _in_layout(bhsd_shape, layout):
    b, h, s, d = bhsd_shape
    return (b, h, s, d) if layout == "bhsd" else (b, s, h, d)


def _check_no_grad(named):
    torch = sys.modules["torch"]
    if not torch.is_grad_enabled():
        return
    for name, x, _ in named:
        if x.requires_grad:
            raise TypeError(f"{name}: expected a tensor that does not require grad "
                            f"(attention_with_kvcache is inference only, not differentiable), "
                            f"got one with requires_grad=True; call it under torch.no_grad() "
                            f"or pass .detach()")


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
    api.check_like_q("cache_seqlens", lens, info, or_else=" or an int")
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


def _check_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a finite positive number or None, got {type(scale).__name__}")
    try:
        scale = float(scale)
    except OverflowError:  # an int beyond float range
        scale = math.inf
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite positive number, got {scale!r}")
    if scale > api.MAX_SCALE:
        raise ValueError(f"scale: expected at most {api.MAX_SCALE:.3g} (scale * log2(e) must fit "
                         f"a float32), got {scale!r}")
    return scale


# ------------------------------------------------------------------------------- reference

def _run_reference(q, k_cache, v_cache, k_new, v_new, call):
    """Append on the host in the caller's library (so the caller's caches change), then the
    NumPy reference forward per sequence over its first Sk_b cache rows."""
    if k_new is not None and call.seqlen_new:
        _append_on_host(k_cache, v_cache, k_new, v_new, call)
    seqlens_k = call.lengths + call.seqlen_new
    variant = {}
    if call.window != (-1, -1):
        variant["window"] = call.window
    if call.softcap:
        variant["softcap"] = call.softcap

    def forward(hq, hk, hv, *, causal, scale, out, lse):
        for b, length in enumerate(seqlens_k):
            reference.flash_attention_forward(
                hq[b:b + 1], hk[b:b + 1, :, :length], hv[b:b + 1, :, :length], causal=causal,
                scale=scale, out=out[b:b + 1], lse=lse[b:b + 1], **variant)

    dims = (call.batch, call.heads_q, call.seqlen_q, call.seqlen_max, call.head_dim)
    return arrays.run_on_host(forward, q, k_cache, v_cache, call.info, layout=call.layout,
                              causal=call.causal, scale=call.scale, dims=dims)


def _append_on_host(k_cache, v_cache, k_new, v_new, call):
    def bhsd(x):
        if call.layout == "bhsd":
            return x
        return x.transpose(1, 2) if call.info.library == "torch" else x.transpose(0, 2, 1, 3)

    kc, vc, kn, vn = (bhsd(x) for x in (k_cache, v_cache, k_new, v_new))
    rows = slice(None)
    if call.info.library == "torch":
        import torch
        with torch.no_grad():
            for b, start in enumerate(call.lengths):
                rows = slice(int(start), int(start) + call.seqlen_new)
                kc[b, :, rows].copy_(kn[b])
                vc[b, :, rows].copy_(vn[b])
    else:
        for b, start in enumerate(call.lengths):
            rows = slice(int(start), int(start) + call.seqlen_new)
            kc[b, :, rows] = kn[b]
            vc[b, :, rows] = vn[b]


# ------------------------------------------------------------------------------- cuda

def _run_cuda(q, k_cache, v_cache, k_new, v_new, cache_seqlens, call):
    """Allocate out (and lse) in the caller's library, make kernel views, launch."""
    library = call.info.library
    out_shape = _in_layout((call.batch, call.heads_q, call.seqlen_q, call.head_dim), call.layout)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        stride = cache.stride(-1) if library == "torch" else cache.strides[-1] // cache.itemsize
        empty = (cache.numel() if library == "torch" else cache.size) == 0  # any strides will do
        if call.head_dim > 1 and stride != 1 and not empty:
            raise ValueError(f"{name}: expected unit stride along D (the cache is written in place "
                             f"and read without a copy), got stride {stride}")
        if library == "torch" and cache.is_neg():
            raise ValueError(f"{name}: expected a tensor whose memory holds its values, got a "
                             f"negative-bit view; pass a resolved tensor (.resolve_neg())")

    if library == "torch":
        import torch

        def view(t, copy_ok=True):
            if copy_ok:
                t = t.resolve_neg()
                if t.shape[-1] > 1 and t.stride(-1) != 1:
                    t = t.contiguous()  # on torch's current stream, like the kernels
            return t.transpose(1, 2) if call.layout == "bshd" else t

        device = q.device
        out = torch.empty(out_shape, dtype=q.dtype, device=device)
        lse = torch.empty((call.batch, call.heads_q, call.seqlen_q), dtype=torch.float32, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream

        def workspace(n):
            return torch.empty(n, dtype=torch.float32, device=device)

        _launch_decode(view(q), view(k_cache, False), view(v_cache, False),
                       None if k_new is None else view(k_new), None if v_new is None else view(v_new),
                       view(out, False), lse, None if call.uniform is not None else cache_seqlens,
                       call, workspace, stream)
        return out, lse

    import cupy

    def view(x, copy_ok=True):
        if copy_ok and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
            x = cupy.ascontiguousarray(x)
        return x.transpose(0, 2, 1, 3) if call.layout == "bshd" else x

    with cupy.cuda.Device(call.info.device_id):
        out = cupy.empty(out_shape, dtype=q.dtype)
        lse = cupy.empty((call.batch, call.heads_q, call.seqlen_q), dtype=cupy.float32)

        def workspace(n):
            return cupy.empty(n, dtype=cupy.float32)

        _launch_decode(view(q), view(k_cache, False), view(v_cache, False),
                       None if k_new is None else view(k_new), None if v_new is None else view(v_new),
                       view(out, False), lse, None if call.uniform is not None else cache_seqlens,
                       call, workspace, cupy.cuda.get_current_stream().ptr)
    return out, lse


# Splits of one (batch, kv head)'s keys at most: bounds the workspace and the merge's loop.
MAX_SPLITS = 128
# Tuning aid: XATTN_DECODE_SPLITS=n forces n splits (read once, at import).
_FORCED_SPLITS = int(os.environ.get("XATTN_DECODE_SPLITS", "0") or 0)


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


_sm_counts: dict[int, int] = {}


def _sm_count(device_id: int) -> int:
    count = _sm_counts.get(device_id)
    if count is None:
        import cupy

        count = _sm_counts[device_id] = int(
            cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])
    return count


def _tile_rows(cfg, rows: int) -> int:
    """Query rows per tile: 16-bit kernels take 16, 32 or 64 (up to the row's block_m), the
    fewest that hold `rows`; float32 always its table's block_m."""
    if cfg.kernel == "flash_decode_f32":
        return cfg.block_m
    tile = 16
    while tile < rows and tile < cfg.block_m:
        tile *= 2
    return tile


@functools.lru_cache(maxsize=None)  # on every call's path: defines and lookups once per variant
def _kernels(cfg, dtype: str, rows: int, vec: bool, softcap: bool, device: int):
    """The decode, merge and append entry points of one compiled variant (one module)."""
    from xattn import cuda, jit

    defines = configs.decode_defines(cfg, dtype, rows, vec, softcap)
    get = functools.partial(jit.get_function, "cuda", "flash_decode.cu", defines=defines, device_id=device)
    decode, merge, append = get(entry=cfg.kernel), get(entry="flash_decode_merge"), get(entry="kvcache_append")
    smem = configs.decode_shared_memory_bytes(cfg, rows)
    cuda._prepare(decode, (device, id(decode)), smem)
    return decode, merge, append, smem


_MERGE_WARPS = 4      # MERGE_WARPS in flash_decode.cu
_APPEND_THREADS = 128  # APPEND_THREADS there


def _plan(dtype: str, device: int, batch: int, heads_q: int, heads_k: int, seqlen_q: int,
          seqlen_max: int, head_dim: int, window):
    """(table row, query rows per tile, row tiles, splits, (left, right)) of one call.

    window: (left, right) with causal folded in; bounds past every possible key distance become
    -1 (unbounded), which also keeps the kernel's int arithmetic small."""
    from xattn import cuda

    rows = (heads_q // heads_k) * seqlen_q
    cfg = configs.select(configs.DECODE_KERNEL_FOR_DTYPE[dtype], cuda._arch(device), head_dim, False)
    tile_rows = _tile_rows(cfg, rows)
    m_blocks = max(1, -(-rows // tile_rows))
    left, right = ((-1 if w >= seqlen_max + seqlen_q else w) for w in window)
    band = seqlen_max  # the keys one sequence's queries can see span at most left + right + Sq
    if left >= 0:
        band = min(band, left + seqlen_q + (right if right >= 0 else 0))
    splits = num_splits(m_blocks * heads_k * batch, _sm_count(device) * cfg.min_blocks,
                        max(1, -(-band // cfg.block_n)), cfg.stages)
    if m_blocks * splits >= 2**31:
        raise ValueError(f"q: too many query rows per kv head ({rows})")
    return cfg, tile_rows, m_blocks, splits, (left, right)


def _launch_decode(q, k_cache, v_cache, k_new, v_new, out, lse, cache_seqlens, call, workspace,
                   stream: int) -> None:
    """All launch arithmetic of one call. Views are (B, H, S, D) with D contiguous (caches: unit
    stride along D, checked by the caller). cache_seqlens: an int32 device array, or None to use
    call.uniform. workspace(n): n float32 elements from the caller's framework."""
    import cupy

    from xattn import cuda

    Q, Kc, Vc, O, L = (cuda._describe(a) for a in (q, k_cache, v_cache, out, lse))
    batch, heads_q, seqlen_q, head_dim = Q.shape
    heads_k, seqlen_max = Kc.shape[1], Kc.shape[2]
    seqlen_new = call.seqlen_new
    if batch == 0:
        return
    if heads_k > cuda.MAX_GRID_YZ:
        raise ValueError(f"k_cache: at most {cuda.MAX_GRID_YZ} heads are supported, got {heads_k}")
    device, size = Q.device, cuda._itemsize(Q.dtype)
    null = cuda._Array(0, (), (0,), "", device)
    if cache_seqlens is not None:
        S = cuda._describe(cache_seqlens)
        seqlens, seqlens_stride, uniform = (S, 4), np.int64(S.strides[0]), np.int32(0)
    else:
        seqlens, seqlens_stride, uniform = (null, 4), np.int64(0), np.int32(call.uniform)

    plan = _plan(Q.dtype, device, batch, heads_q, heads_k, seqlen_q, seqlen_max, head_dim, call.window)
    cfg, tile_rows, m_blocks, splits, (left, right) = plan
    vec = cuda._vec_loads([Q, Kc, Vc], head_dim, size)
    decode, merge, append, smem = _kernels(cfg, Q.dtype, tile_rows, vec, bool(call.softcap), device)

    with cupy.cuda.Device(device), cuda._external_stream(stream, device):
        if seqlen_new and k_new is not None:
            Kn, Vn = cuda._describe(k_new), cuda._describe(v_new)
            append_vec = cuda._vec_loads([Kn, Vn, Kc, Vc], head_dim, size)
            units = heads_k * seqlen_new * (head_dim // (16 // size) if append_vec else head_dim)
            cuda._launch(append, (-(-units // _APPEND_THREADS), 1), _APPEND_THREADS, 0,
                     [(Kn, size), (Vn, size), (Kc, size), (Vc, size), seqlens,
                      *cuda._strides(Kn, Vn, Kc, Vc), seqlens_stride, uniform, np.int32(heads_k),
                      np.int32(seqlen_new), np.int32(seqlen_max), np.int32(head_dim),
                      np.int32(append_vec)], batch)
        if seqlen_q == 0:
            return

        rows_bhs = heads_q * seqlen_q
        if splits > 1:  # partial O and LSE of every split, merged below. Freed when this
            # function returns: the stream-ordered caching allocators hand it out again only to
            # work queued after these launches on this stream.
            part = workspace(batch * rows_bhs * splits * (cfg.head_dim + 1))
            P = cuda._describe(part)
            o_part = cuda._Array(P.ptr, (batch,), (rows_bhs * splits * cfg.head_dim,), "float32", device)
            lse_part = cuda._Array(P.ptr + 4 * batch * rows_bhs * splits * cfg.head_dim, (batch,),
                                   (rows_bhs * splits,), "float32", device)
            parts = [(o_part, 4), (lse_part, 4)]
        else:
            parts = [(null, 4), (null, 4)]

        scale, softcap = call.scale, call.softcap
        scale_log2 = scale * cuda.LOG2_E
        cuda._launch(decode, (m_blocks * splits, heads_k), cfg.warps * 32, smem,
                 [(Q, size), (Kc, size), (Vc, size), (O, size), (L, 4), *parts, seqlens,
                  *cuda._strides(Q, Kc, Vc, O), *cuda._strides(L, dims=2), seqlens_stride,
                  uniform, np.int32(seqlen_q), np.int32(seqlen_new), np.int32(seqlen_max),
                  np.int32(head_dim), np.int32(heads_q // heads_k), np.int32(left), np.int32(right),
                  np.int32(splits), np.int32(m_blocks), np.float32(scale_log2),
                  np.float32(softcap * cuda.LOG2_E), np.float32(scale / softcap if softcap else 0.0)],
                 batch)
        if splits > 1:
            cuda._launch(merge, (-(-rows_bhs // _MERGE_WARPS), 1), _MERGE_WARPS * 32, 0,
                     [*parts, (O, size), (L, 4), *cuda._strides(O), *cuda._strides(L, dims=2),
                      np.int32(heads_q), np.int32(seqlen_q), np.int32(head_dim), np.int32(splits)],
                     batch)
