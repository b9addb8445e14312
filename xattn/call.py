"""The call object: one frozen, validated description of an attention call, and the only place
its arguments are checked.

`Call.build` validates the arrays and options of attention() / attention_varlen() once and
returns a `Call`: library, device, dtype, layout, the sizes, the band (causal folded into the
window's right edge here and nowhere else), softcap, ALiBi, sinks, the packed-batch maxima, scale. Every
layer below (the torch ops, the backends, the launch plans) takes a Call and checks nothing again.

Calls are cached by signature (`lookup`): what validation reads of each array (its type, shape,
strides, dtype, device) and the options. A repeated call of the same signature skips validation
and goes straight to the plan its backend keeps for that Call. Values that change per call
(pointers, the contents of cu_seqlens) are never part of a signature; arrays whose signature
cannot be read cheaply (other DLPack producers) are validated on every call.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from xattn import arrays, backends, configs

LAYOUTS = ("bhsd", "bshd")
MAX_HEAD_DIM = 256
GPU_DTYPES = ("float16", "bfloat16", "float32")
# The reference backend also takes float64: the tiled == exact property is checked in it.
REFERENCE_DTYPES = GPU_DTYPES + ("float64",)
# Kernels take scale * log2(e) as a float32: a larger scale would reach them as inf.
MAX_SCALE = float(np.finfo(np.float32).max) / math.log2(math.e)
UNBOUNDED = (-1, -1)
ORACLE = object()  # build()'s backend for exact_attention: the float64 oracle on the host


@dataclass(frozen=True)
class Call:
    """A validated attention call. Sizes are (B, Hq, Hk, Sq, Sk, D); for a packed batch B is the
    number of sequences, Sq/Sk the totals of rows and max_seqlen the longest sequences."""
    library: str            # "numpy", "torch", "cupy" or "dlpack"
    device: str             # "cpu", "cuda" or "rocm"
    device_id: int
    backend: str            # "reference", "cuda" or "hip"
    dtype: str
    layout: str             # "bhsd" or "bshd" (a packed batch: "bshd", one batch entry)
    batch: int
    heads_q: int
    heads_k: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    scale: float
    causal: bool
    window: tuple           # (left, right), -1 unbounded; causal folded in: right is 0
    softcap: float          # 0.0: none
    alibi: tuple | None     # the slopes' shape, (Hq,) or (B, Hq); None: no ALiBi
    sinks: bool             # a sink logit per query head (GPT-OSS), float32 (Hq,)
    varlen: bool
    max_seqlen: tuple | None  # packed batches: (max_seqlen_q, max_seqlen_k)
    deterministic: bool
    return_lse: bool
    # Paged keys and values of a packed batch (attention_varlen's block_table): (page_size,
    # num_pages, max_pages); seqlen_k is then a sequence's capacity, max_pages * page_size.
    paged: tuple | None = None
    # A backend's launch plans for this call, filled on first use (xattn/cuda.py). A Call found
    # by signature serves arrays of one set of strides, which its plans bake in.
    plans: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    # ---- what the layers below read ----------------------------------------------------------
    @property
    def dims(self) -> tuple:
        """(B, Hq, Sq, Sk, D) as the host and array helpers take them (B = 1 when packed)."""
        batch = 1 if self.varlen else self.batch
        return (batch, self.heads_q, self.seqlen_q, self.seqlen_k, self.head_dim)

    @property
    def q_shape(self) -> tuple:
        """out's shape: q's, in q's layout."""
        b, h, s, _, d = self.dims
        return (b, s, h, d) if self.layout == "bshd" else (b, h, s, d)

    @property
    def lse_shape(self) -> tuple:
        b, h, s, _, _ = self.dims
        return (b, h, s)

    def options(self, alibi_slopes=None, cu_seqlens=None, sinks=None, pages=None) -> dict:
        """The backends' keyword arguments (forward/backward of reference, cuda, hip). sinks
        only where given: the forwards take them; the backwards never need them (the forward's
        lse already holds the sink; xattn/torch_ops.py: sinks_grad). pages: (block_table,
        seqused_k) of a paged call (the forwards take them)."""
        options = dict(causal=self.causal, scale=self.scale, window=self.window,
                       softcap=self.softcap, alibi_slopes=alibi_slopes)
        if self.varlen:
            options.update(cu_seqlens=cu_seqlens, max_seqlen=self.max_seqlen)
        if sinks is not None:
            options["sinks"] = sinks
        if pages is not None:
            options["block_table"], options["seqused_k"] = pages
        return options

    # ---- the torch op boundary: one place converts a Call to and from op arguments -------------
    def op_scalars(self) -> tuple:
        """The custom op's non-tensor inputs, in its schema's order (xattn/torch_ops.py)."""
        max_q, max_k = self.max_seqlen if self.varlen else (0, 0)
        return (self.causal, self.scale, self.window[0], self.window[1], self.softcap, max_q, max_k,
                self.layout, self.deterministic)

    @staticmethod
    def from_paged_op(q, k, v, cu_seqlens_q, block_table, alibi_slopes, sinks, causal, scale,
                      window_left, window_right, softcap, max_seqlen_q, max_seqlen_k) -> "Call":
        """The Call of the paged forward op's inputs (xattn/torch_ops.py), validated when the op
        was entered: q is the (1, total_q, Hq, D) view, k and v the (num_pages, page_size, Hk, D)
        pages."""
        return build(q, k, v, alibi_slopes, causal, scale, (window_left, window_right), softcap,
                     "bshd", True, None, False,
                     varlen=((max_seqlen_q, max_seqlen_k), cu_seqlens_q.shape[0] - 1), sinks=sinks,
                     paged=(k.shape[1], k.shape[0], block_table.shape[1]))

    @staticmethod
    def from_op(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, causal, scale, window_left,
                window_right, softcap, max_seqlen_q, max_seqlen_k, layout, deterministic,
                sinks=None) -> "Call":
        """The Call of the custom op's inputs (already validated once, when the op was entered:
        this rebuilds the description, through the signature cache)."""
        options = (causal, scale, (window_left, window_right), softcap, layout, True, None,
                   deterministic)
        if cu_seqlens_q is None:
            return lookup(q, k, v, alibi_slopes, options, sinks)
        # A packed batch: its lengths were checked when the op was entered; not read again here.
        return build(q, k, v, alibi_slopes, *options,
                     varlen=((max_seqlen_q, max_seqlen_k), cu_seqlens_q.shape[0] - 1), sinks=sinks)


# ---- the signature cache ----------------------------------------------------------------------------

_calls: dict = {}
_MAX_CALLS = 4096  # a process that cycles through more signatures validates them again


def _signature(x):
    """What validation reads of an array, cheaply, or None where that is not cheap (then the
    call is validated every time)."""
    kind = type(x)
    if kind is _TORCH_TENSOR:  # the common case first: a plain torch.Tensor
        # a negative-bit view reads as -x: its memory is not what the kernels would see
        return (x.shape, x.stride(), x.dtype, x.device, x.is_neg())
    if kind is np.ndarray:
        return (kind, x.shape, x.strides, x.dtype)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):  # subclasses (nn.Parameter, ...)
        return (kind, x.shape, x.stride(), x.dtype, x.device, x.layout, x.is_neg())
    cupy = sys.modules.get("cupy")
    if cupy is not None and kind is cupy.ndarray:
        return (kind, x.shape, x.strides, x.dtype, x.device.id)
    return None


_TORCH_TENSOR = None  # torch.Tensor once torch is imported (xattn never imports it itself)


def _optional_signatures(*arrays_or_none) -> tuple:
    """Signatures of optional arrays: "absent" for one not given, None for one whose signature
    cannot be read cheaply."""
    return tuple("absent" if x is None else _signature(x) for x in arrays_or_none)


def lookup(q, k, v, alibi_slopes, options: tuple, sinks=None) -> Call:
    """The Call of attention(q, k, v, alibi_slopes=..., sinks=..., *options): cached by
    signature, built (validated) on the first call. options: (causal, scale, window, softcap,
    layout, return_lse, backend, deterministic) as passed."""
    global _TORCH_TENSOR
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.compiler.is_compiling():  # traced: no Python-side caches
            return build(q, k, v, alibi_slopes, *options, sinks=sinks)
        _TORCH_TENSOR = torch.Tensor
    signatures = tuple(_signature(x) for x in (q, k, v)) + _optional_signatures(alibi_slopes, sinks)
    if None in signatures:
        return build(q, k, v, alibi_slopes, *options, sinks=sinks)
    key = (signatures, options, os.environ.get(backends.ENVIRONMENT_VARIABLE))
    try:
        call = _calls.get(key)
    except TypeError:  # an unhashable option (a window given as a list): validate every time
        return build(q, k, v, alibi_slopes, *options, sinks=sinks)
    if call is None:
        call = build(q, k, v, alibi_slopes, *options, sinks=sinks)  # raises on bad input
        if len(_calls) >= _MAX_CALLS:
            _calls.clear()
        _calls[key] = call
    return call


# ---- validation -------------------------------------------------------------------------------------

def build(q, k, v, alibi_slopes, causal, scale, window, softcap, layout, return_lse, backend,
          deterministic, *, varlen=None, sinks=None, paged=None) -> Call:
    """Validate attention()'s arguments and describe the call. varlen: (max_seqlen, sequences)
    for a packed batch, whose (1, total, H, D) views arrive here; paged: (page_size, num_pages,
    max_pages) when its keys and values are (num_pages, page_size, Hk, D) pages."""
    info, dims, scale, heads_k = _validate(q, k, v, causal, scale, layout, return_lse,
                                           paged=paged is not None)
    check_bool("deterministic", deterministic)
    batch, heads_q, sq, sk, head_dim = dims
    if paged is not None:
        sk = paged[0] * paged[2]  # a sequence's capacity: the table's width in rows
    window, softcap, alibi = _variant(info, (varlen[1] if varlen else batch, heads_q), causal,
                                      window, softcap, alibi_slopes)
    if backend is ORACLE:  # exact_attention: copied to the host, whatever the arrays' backend
        chosen = "reference"
    else:
        chosen = backends.choose_backend(backend, info.device, arrays.device_label(info))
    check_dtype(info, REFERENCE_DTYPES if chosen == "reference" else GPU_DTYPES,
                backend_name=chosen)
    if sinks is not None:
        check_sinks(sinks, info, heads_q)
    return Call(library=info.library, device=info.device, device_id=info.device_id,
                backend=chosen, dtype=info.dtype, layout=layout,
                batch=varlen[1] if varlen else batch, heads_q=heads_q, heads_k=heads_k,
                seqlen_q=sq, seqlen_k=sk, head_dim=head_dim, scale=scale, causal=bool(causal),
                window=window, softcap=softcap, alibi=alibi, sinks=sinks is not None,
                varlen=varlen is not None,
                max_seqlen=varlen[0] if varlen else None, deterministic=bool(deterministic),
                return_lse=bool(return_lse), paged=paged)


def build_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal,
                 scale, window, softcap, alibi_slopes, return_lse, backend, deterministic,
                 sinks=None, block_table=None, seqused_k=None):
    """Validate attention_varlen()'s arguments: (Call, cu_seqlens as the backends take them,
    pages): pages is (block_table, seqused_k) as the backends take them for paged keys and values,
    else None. The cumulative lengths are checked on the host (a GPU array is read back; a GPU
    torch tensor once per version); a block table and seqused_k only where they are host arrays.
    The Call is cached by signature as attention()'s is; the values of the lengths and the table
    are checked on every call."""
    paged = block_table is not None or seqused_k is not None
    options = (causal, scale, window, softcap, return_lse, backend, deterministic)
    signatures = tuple(_signature(x) for x in (q, k, v, cu_seqlens_q))
    signatures += _optional_signatures(cu_seqlens_k, alibi_slopes, sinks, block_table, seqused_k)
    key = None
    torch = sys.modules.get("torch")
    if None not in signatures and not (torch is not None and torch.compiler.is_compiling()):
        key = ("varlen", signatures, options, max_seqlen_q, max_seqlen_k,
               os.environ.get(backends.ENVIRONMENT_VARIABLE))
    try:
        call = _calls.get(key) if key is not None else None
    except TypeError:  # an unhashable option: validate every time
        call, key = None, None
    if call is not None:
        info = arrays.ArrayInfo(call.library, call.device, call.device_id, call.dtype, None)
        cu_seqlens, _, sequences, lengths_k = _validate_cu_seqlens(
            info, call.dims, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, paged)
        pages = None
        if paged:
            _, pages = _validate_pages(info, (q, k, v), sequences, block_table, seqused_k,
                                       lengths_k, max_seqlen_q, max_seqlen_k)
        return call, cu_seqlens, pages
    kv_shape, kv_pattern = ((4, "(num_pages, page_size, Hk, D) (paged: block_table is given)")
                            if paged else (3, "(total_tokens, H, D)"))
    for name, x in (("q", q), ("k", k), ("v", v)):
        shape = arrays.describe(x, name).shape
        rank, pattern = (3, "(total_tokens, H, D)") if name == "q" else (kv_shape, kv_pattern)
        if len(shape) != rank:
            raise ValueError(f"{name}: expected a {rank}-d array {pattern}, got shape {shape}")
    # The packed tensors are one batch entry in the (B, S, H, D) layout: (1, total, H, D) views.
    # Paged keys and values are (num_pages, page_size, Hk, D) already: pages in that layout.
    q4 = q[None]
    k4, v4 = (k, v) if paged else (k[None], v[None])
    info, dims, _, _ = _validate(q4, k4, v4, causal, scale, "bshd", return_lse, paged=paged)
    cu_seqlens, max_seqlen, sequences, lengths_k = _validate_cu_seqlens(
        info, dims, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, paged)
    pages = layout = None
    if paged:
        layout, pages = _validate_pages(info, (q, k, v), sequences, block_table, seqused_k,
                                        lengths_k, max_seqlen_q, max_seqlen_k)
    call = build(q4, k4, v4, alibi_slopes, causal, scale, window, softcap, "bshd", return_lse,
                 backend, deterministic, varlen=(max_seqlen, sequences), sinks=sinks,
                 paged=layout)
    if key is not None:
        if len(_calls) >= _MAX_CALLS:
            _calls.clear()
        _calls[key] = call
    return call, cu_seqlens, pages


def _validate_cu_seqlens(info, dims, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         paged=False):
    """Check the cumulative lengths (on the host) and the maxima. Returns the arrays as the
    backends take them (arrays.index_array), (max_seqlen_q, max_seqlen_k), the number of
    sequences and the key lengths (None where cu_seqlens_k is not given). paged: the keys are in
    pages, so cu_seqlens_k has no total to end at, may be None (seqused_k gives the lengths), and
    its maximum is checked by _validate_pages."""
    _, _, total_q, total_k, _ = dims
    lengths = {}
    prepared = []
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, total_q),
                            ("cu_seqlens_k", cu_seqlens_k, None if paged else total_k)):
        if cu is None and paged and name == "cu_seqlens_k":
            prepared.append(None)
            continue
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
        if total is not None and host[-1] != total:
            raise ValueError(f"{name}: expected last entry {total} (the total number of rows), "
                             f"got {int(host[-1])}")
        lengths[name] = np.diff(host)
        prepared.append(arrays.index_array(cu, cu_info, host))
    if "cu_seqlens_k" in lengths and len(lengths["cu_seqlens_q"]) != len(lengths["cu_seqlens_k"]):
        raise ValueError(f"cu_seqlens_k: expected {len(lengths['cu_seqlens_q']) + 1} entries "
                         f"(as cu_seqlens_q), got {len(lengths['cu_seqlens_k']) + 1}")
    maxima = []
    for name, value, key in (("max_seqlen_q", max_seqlen_q, "cu_seqlens_q"),
                             ("max_seqlen_k", max_seqlen_k, "cu_seqlens_k")):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name}: expected an int, got {value!r}")
        longest = 0 if paged and key == "cu_seqlens_k" else int(lengths[key].max(initial=0))
        if value < longest:
            raise ValueError(f"{name}: expected at least {longest} (the longest sequence in "
                             f"{key}), got {value}")
        maxima.append(int(value))
    return tuple(prepared), tuple(maxima), len(lengths["cu_seqlens_q"]), lengths.get("cu_seqlens_k")


def _validate_pages(info, qkv, sequences, block_table, seqused_k, lengths_k, max_seqlen_q,
                    max_seqlen_k):
    """The paged keys of attention_varlen: the block table (check_block_table), seqused_k (int32
    (B,), its values checked only where it is a host array), the key lengths (seqused_k's, else
    cu_seqlens_k's) against the table's capacity and max_seqlen_k where they are known on the
    host, and no gradients. Returns ((page_size, num_pages, max_pages), (block_table, seqused_k)
    as the backends take them)."""
    q, k, v = qkv
    if info.library == "torch":
        check_no_grad([("q", q, None), ("k", k, None), ("v", v, None)],
                      "attention_varlen with block_table is inference only: its paged forward "
                      "has no backward")
    if block_table is None:
        raise ValueError("block_table: expected an int32 array (B, max_pages) with seqused_k "
                         "(seqused_k describes paged keys), got None")
    num_pages, page_size = arrays.describe(k, "k").shape[:2]
    ids, capacity = check_block_table(block_table, info, sequences, num_pages, page_size, "k")
    if capacity + 2 * max_seqlen_q >= 2**30:  # the kernels' int arithmetic on rows and bands
        raise ValueError(f"block_table: expected a capacity (max_pages * page_size) below "
                         f"{2**30 - 2 * max_seqlen_q} with max_seqlen_q {max_seqlen_q}, got "
                         f"{capacity}")
    table_info = arrays.describe(block_table, "block_table")
    table = arrays.index_array(block_table, table_info, ids)
    known, source = lengths_k, "cu_seqlens_k"
    used = None
    if seqused_k is not None:
        used_info = check_vector("seqused_k", seqused_k, info, "int32", sequences, "B",
                                 "one length per sequence of cu_seqlens_q")
        host = None
        if info.device == "cpu":  # a GPU array is never read on the host: the kernels clamp
            host = np.asarray(arrays.to_host_ints(seqused_k, used_info), dtype=np.int64)
            bad = (host < 0) | (host > capacity)
            if bad.any():
                b = int(np.argmax(bad))
                raise ValueError(f"seqused_k: expected lengths in [0, {capacity}] (max_pages * "
                                 f"page_size of block_table), got {int(host[b])} at {b}")
        known, source = host, "seqused_k"
        used = arrays.index_array(seqused_k, used_info, host)
    if known is not None and len(known):
        longest = int(known.max())
        if longest > capacity:
            raise ValueError(f"block_table: expected at least {-(-longest // page_size)} pages "
                             f"per sequence ({page_size} rows each) for the longest sequence of "
                             f"{source} ({longest} keys), got {capacity // page_size}")
        if max_seqlen_k < longest:
            raise ValueError(f"max_seqlen_k: expected at least {longest} (the longest sequence "
                             f"in {source}), got {max_seqlen_k}")
    return (page_size, num_pages, capacity // page_size), (table, used)


def check_block_table(block_table, info, batch, num_pages, page_size, cache_name):
    """A block table of paged keys and values (attention_with_kvcache, attention_varlen): int32
    (batch, max_pages) in q's library and device, over pages of `cache_name` (num_pages,
    page_size, Hk, D). Returns (the host page ids as an int64 NumPy array, or None for a GPU table,
    the capacity max_pages * page_size). The ids are checked only on the host (a GPU table is
    never read there: the kernels clamp them to [0, num_pages))."""
    if page_size < 1 or page_size % configs.DECODE_PAGE_MULTIPLE:
        raise ValueError(f"{cache_name}: expected (num_pages, page_size, Hk, D) with page_size a "
                         f"positive multiple of {configs.DECODE_PAGE_MULTIPLE} (paged caches), got "
                         f"page_size {page_size}")
    try:
        table = arrays.describe(block_table, "block_table")
    except TypeError:
        raise TypeError(f"block_table: expected an int32 array (B, max_pages), got "
                        f"{type(block_table).__module__}.{type(block_table).__qualname__}") from None
    check_like_q("block_table", table, info)
    if table.dtype != "int32":
        raise TypeError(f"block_table: expected dtype int32, got {table.dtype}")
    if len(table.shape) != 2 or table.shape[0] != batch:
        raise ValueError(f"block_table: expected shape ({batch}, max_pages) (the batch size of q), "
                         f"got {tuple(table.shape)}")
    if num_pages < 1 and table.shape[1] > 0:  # the kernels' clamp needs a page to land on
        raise ValueError(f"{cache_name}: expected at least one page for a block table of "
                         f"{table.shape[1]} columns, got shape ({num_pages}, ...)")
    capacity = table.shape[1] * page_size
    if info.device != "cpu":
        return None, capacity
    ids = np.asarray(arrays.to_host_numpy(block_table, table), dtype=np.int64)
    bad = (ids < 0) | (ids >= num_pages)
    if bad.any():
        b, j = np.argwhere(bad)[0]
        raise ValueError(f"block_table: expected page ids in [0, {num_pages}) (the pages of "
                         f"{cache_name}), got {int(ids[b, j])} at [{b}, {j}]")
    return ids, capacity


def check_no_grad(named, why: str) -> None:
    """Inference-only calls on torch tensors: none of (name, tensor, _) requires grad while grad
    mode is on (TypeError naming it; `why` says why)."""
    torch = sys.modules["torch"]
    if not torch.is_grad_enabled():
        return
    for name, x, _ in named:
        if x.requires_grad:
            raise TypeError(f"{name}: expected a tensor that does not require grad ({why}), got "
                            f"one with requires_grad=True; call it under torch.no_grad() or pass "
                            f".detach()")


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


def band(causal, window) -> tuple:
    """The window with causal folded in, validated: (left, right), -1 unbounded. The one place
    `causal` becomes the band's right edge."""
    if window is None:
        window = UNBOUNDED
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
    return (left, right)


def check_softcap(softcap) -> float:
    """softcap as the kernels take it: 0.0 for none. None and 0.0 both mean no softcap (0.0 is
    flash-attn's spelling, which its callers pass; the README says so)."""
    if softcap is None:
        return 0.0
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        raise TypeError(f"softcap: expected a positive number, 0.0 or None, got {softcap!r}")
    softcap = float(softcap)
    if softcap != 0.0 and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected a finite positive number (or 0.0 / None for none), "
                         f"got {softcap!r}")
    return softcap


def _variant(info, batch_heads, causal, window, softcap, alibi_slopes):
    """Validate the mask and score modifiers: (window, softcap, the ALiBi slopes' shape)."""
    batch, q_heads = batch_heads
    window = band(causal, window)
    softcap = check_softcap(softcap)
    if alibi_slopes is None:
        return window, softcap, None
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
    return window, softcap, tuple(slope_info.shape)


def check_scale(scale, head_dim: int) -> float:
    """The attention scale as a float: 1/sqrt(D) by default, else finite, positive and small
    enough that scale * log2(e) fits a float32."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, np.ndarray) and scale.shape == ():  # a 0-d array is a number
        scale = scale[()]
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a finite positive number or None, "
                        f"got {type(scale).__name__}")
    try:
        scale = float(scale)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        scale = math.inf
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite positive number, got {scale!r}")
    if scale > MAX_SCALE:
        raise ValueError(f"scale: expected at most {MAX_SCALE:.3g} (scale * log2(e) must fit "
                         f"a float32), got {scale!r}")
    return scale


def _validate(q, k, v, causal, scale, layout, return_lse, paged=False):
    """Check everything but the dtype's fit to the backend. Returns (q's info, (B, Hq, Sq, Sk, D),
    scale, Hk). paged: k and v are (num_pages, page_size, Hk, D) pages (their batch is the
    pages, their length the page size)."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'bhsd' or 'bshd', got {layout!r}")
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)

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

    if paged:
        if tuple(v_info.shape) != tuple(k_info.shape):
            raise ValueError(f"v: expected shape {tuple(k_info.shape)} (as k: (num_pages, "
                             f"page_size, Hk, D)), got {tuple(v_info.shape)}")
    elif k_info.shape[0] != batch:
        raise ValueError(f"k: expected batch size {batch} (as q), got {k_info.shape[0]}")
    elif v_batch != batch:
        raise ValueError(f"v: expected batch size {batch} (as q), got {v_batch}")
    check_head_dim(head_dim, ("k", k_head_dim), ("v", v_head_dim))
    if v_len != sk:
        raise ValueError(f"v: expected sequence length {sk} (as k), got {v_len}")
    if v_heads != kv_heads:
        raise ValueError(f"v: expected {kv_heads} heads (as k), got {v_heads}")
    check_groups(q_heads, kv_heads, "k")
    return info, (batch, q_heads, sq, sk, head_dim), check_scale(scale, head_dim), kv_heads


def check_head_dim(head_dim: int, *others) -> None:
    """q's head dim within 1..MAX_HEAD_DIM, and each (name, head dim) of `others` equal to it."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim D in 1..{MAX_HEAD_DIM}, got {head_dim}")
    for name, other in others:
        if other != head_dim:
            raise ValueError(f"{name}: expected head dim {head_dim} (as q), got {other}")


def check_groups(q_heads: int, kv_heads: int, kv_name: str) -> None:
    """GQA/MQA: at least one key/value head, and q's heads a multiple of them."""
    if kv_heads < 1:
        raise ValueError(f"{kv_name}: expected at least 1 head, got {kv_heads}")
    if q_heads % kv_heads:
        raise ValueError(f"q: expected a number of heads divisible by {kv_name}'s {kv_heads} "
                         f"heads (GQA), got {q_heads}")


def check_sinks(sinks, info, heads_q):
    """sinks (attention, attention_varlen, attention_with_kvcache): float32 (Hq,), in q's
    library and on its device. Their values are not read (a GPU array would need a sync)."""
    check_vector("sinks", sinks, info, "float32", heads_q, "Hq", "the query heads of q")


def check_vector(name, x, info, dtype: str, length: int, symbol: str, meaning: str):
    """A one-dimensional `dtype` array of `length` elements (`symbol` in the messages, `meaning`
    what its length counts) in q's library and on its device: its ArrayInfo."""
    try:
        described = arrays.describe(x, name)
    except TypeError:
        article = "an" if dtype[0] in "aeiou" else "a"
        raise TypeError(f"{name}: expected {article} {dtype} array ({symbol},), got "
                        f"{type(x).__module__}.{type(x).__qualname__}") from None
    check_like_q(name, described, info)
    if described.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {described.dtype}")
    if tuple(described.shape) != (length,):
        raise ValueError(f"{name}: expected shape ({length},) ({meaning}), got "
                         f"{tuple(described.shape)}")
    return described


def check_like_q(name, other, info, or_else=""):
    """other (an ArrayInfo) must be of q's library and on q's device."""
    if other.library != info.library:
        raise TypeError(f"{name}: expected {arrays.library_label(info)} (as q){or_else}, "
                        f"got {arrays.library_label(other)}")
    if (other.device, other.device_id) != (info.device, info.device_id):
        raise ValueError(f"{name}: expected an array on {arrays.device_label(info)} (as q), "
                         f"got one on {arrays.device_label(other)}")


def check_bool(name, value):
    # numpy.bool_ is not a bool subclass, but it is an honest boolean.
    if not isinstance(value, bool) and type(value).__name__ != "bool":
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def check_dtype(info, supported, backend_name="reference"):
    if info.dtype not in supported:
        listed = ", ".join(supported)
        raise TypeError(f"q: expected dtype {listed} for the {backend_name} backend, "
                        f"got {info.dtype}")
