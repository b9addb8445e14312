"""xattn as an attention implementation of Hugging Face transformers (5.x).

    import xattn.integrations.transformers
    xattn.integrations.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="xattn")
    model.set_attn_implementation("xattn")          # or switch a loaded model

register() adds two entries under one name, as transformers' own "sdpa" and
"flash_attention_2" have: the attention function (AttentionInterface) and the mask function
(AttentionMaskInterface). The mask entry matters: transformers builds no mask at all for a name
the mask interface does not know, so padding would be silently ignored.

What transformers builds and what xattn receives:
* Masks are never materialized. The mask function returns None when no token is padding, else
  the 2-d boolean padding mask (B, Sk) of the keys the layer sees. With a padding mask the
  attention function unpads the real tokens, makes one xattn.attention_varlen call over all
  sequences, and pads the result back with zeros (FlashAttention-2's approach in transformers).
* Decoding steps (at most FEW_QUERIES query tokens, no gradient, not under torch.compile) make
  one xattn.attention_with_kvcache call on the layer's keys and values as they are: the
  split-KV decode kernel, which spreads a long cache over the whole GPU. In causal layers with
  padding that is all on the left (generate()'s prompts) it takes cache_leftpad = the pad counts: no gathers, no
  scatter, no host synchronization in the layers; the mask function reads the mask on the host
  once per forward (is there padding, is it left padding). Other padding is unpadded as above.
* Causal masking comes from `is_causal` (the module's, or the call's), bottom-right aligned:
  the queries are the last Sq of the Sk keys, which is how transformers' dynamic caches lay
  out keys (checked in the mask function: q_offset + Sq == kv_offset + Sk).
* sliding_window=W (Mistral, Gemma-2's local layers): transformers lets query i see the keys
  j with i - W < j <= i, W keys including itself; that is window=(W - 1, 0) here.
* softcap (Gemma-2's attn_logit_softcapping) and scaling go through as they are; K and V
  arrive un-repeated for GQA, which xattn serves without expanding them.
* Static caches (`generate(..., cache_implementation="static")`, which transformers compiles
  with torch.compile(mode="reduce-overhead") on a GPU): every layer sees the whole preallocated
  cache, of which the first q_offset + Sq rows are filled (q_offset: the cache's length before
  this step, a device tensor after the first step). The mask function returns an int32 4-d
  tensor instead (transformers passes 4-d masks through unchanged): the filled length of each
  sequence, computed on the device (the compiled step reads nothing on the host, so it can be
  captured in a CUDA graph), and, when a padding mask is present, each sequence's first key
  where all padding is on the left (generate()'s prompts; checked on the host once per step,
  before the compiled step), else the order that puts each sequence's real keys first. The
  attention function then calls xattn.attention_with_kvcache on the cache (through the torch op
  xattn_transformers::static_cache_attention, so torch.compile traces it as one node), with
  cache_leftpad for left padding; other padding costs one gather of the cache per layer. Only
  causal layers (no sliding window) are served this way.
* What xattn cannot express raises rather than being dropped: attention dropout in training
  (ValueError), mask patterns other than causal, bidirectional, sliding window and padding
  (packed sequences, custom or/and mask functions, 4-d masks), static caches with
  sliding-window or bidirectional layers or with attention sinks, position biases
  (NotImplementedError, naming attn_implementation="sdpa" as the way out).
* GPT-OSS's attention sinks (s_aux) go through as xattn's sinks= (cast to float32; the sink
  parameters get their gradients).
"""

from __future__ import annotations

import math
import warnings

import torch

import xattn

NAME = "xattn"


def register(name: str = NAME) -> None:
    """Make `attn_implementation=name` available to every transformers model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)


# ------------------------------------------------------------------------- mask function

def _mask_parts(function) -> list:
    """The leaves of transformers' and_masks(...) combinations (each holds its functions in
    the closure variable `mask_functions`)."""
    code = getattr(function, "__code__", None)
    if code is not None and function.__closure__ and "mask_functions" in code.co_freevars:
        parts = function.__closure__[code.co_freevars.index("mask_functions")].cell_contents
        if function.__qualname__.startswith("and_masks."):
            return [leaf for part in parts for leaf in _mask_parts(part)]
    return [function]


def _check_mask_pattern(mask_function) -> None:
    """Accept the patterns the attention function reproduces from is_causal and sliding_window:
    causal, bidirectional, and either one intersected with a sliding window."""
    from transformers import masking_utils as mu

    known = {mu.causal_mask_function, mu.bidirectional_mask_function}
    overlays = ("sliding_window_overlay.", "sliding_window_bidirectional_overlay.")
    for part in _mask_parts(mask_function):
        if part in known or getattr(part, "__qualname__", "").startswith(overlays):
            continue
        raise NotImplementedError(
            f"attn_implementation='xattn': the model asks for the mask pattern "
            f"{getattr(part, '__qualname__', part)!r}, which xattn cannot express (it knows "
            f"causal, bidirectional, sliding-window and padding masks; packed sequences and "
            f"custom mask functions are not supported); use attn_implementation='sdpa'")


def _static_cache_mask(batch_size, q_length, kv_length, q_offset, mask_function, attention_mask,
                       device) -> torch.Tensor:
    """The mask of a static cache, whose keys are the cache rows [0, kv_length), of which rows
    [0, q_offset + q_length) are filled, the queries being its last q_length filled rows.

    transformers passes a 4-d tensor mask through the model unchanged (generate() builds the
    mask of a compilable cache before the compiled step, and the model's own mask call must then
    leave it alone), so the mask is one, int32, in one of three forms. [b, 0, 0, 0] is always
    the number of cache rows of sequence b (its keys end there).
      (B, 1, 1, 1): no padding mask: the keys are rows [0, [b, 0, 0, 0]).
      (B, 1, 2, 1): padding on the left only (generate()'s prompts): [b, 0, 1, 0] is sequence
        b's first key (attention_with_kvcache's cache_leftpad).
      (B, 1, 1, 1 + L): any other padding (L = kv_length): [b, 0, 0, 1:] is the order of the
        cache rows that puts sequence b's real keys first (one gather of the cache per layer).
    Computed on the device from the cache's position. Outside torch.compile, whether the padding
    is all on the left is read on the host (once per step: this runs before the compiled step)."""
    from transformers import masking_utils as mu

    if mask_function is not None and _mask_parts(mask_function) != [mu.causal_mask_function]:
        raise NotImplementedError(
            "attn_implementation='xattn' serves static caches (cache_implementation='static') "
            "for causal layers only, not sliding-window or bidirectional ones; use the default "
            "dynamic cache or attn_implementation='sdpa'")
    filled = q_offset + q_length  # a 0-d device tensor after the first step
    if attention_mask is None:
        lengths = torch.zeros(batch_size, dtype=torch.int32, device=device) + filled
        return lengths.view(batch_size, 1, 1, 1)
    if attention_mask.ndim != 2:
        raise NotImplementedError(f"attn_implementation='xattn' takes a 2-d padding mask "
                                  f"(batch, keys), got shape {tuple(attention_mask.shape)}")
    # Real keys: unpadded and filled. The mask may be shorter than the cache (one column per
    # token seen so far) or longer; unfilled rows are never real.
    columns = min(attention_mask.shape[-1], kv_length)
    real = torch.zeros(batch_size, kv_length, dtype=torch.bool, device=device)
    real[:, :columns] = attention_mask[:, :columns].to(device=device, dtype=torch.bool)
    real &= torch.arange(kv_length, device=device) < filled
    if not torch.compiler.is_compiling():
        pads, left_only = _left_padding(real, filled)
        if bool(left_only):
            lengths = torch.zeros(batch_size, dtype=torch.int32, device=device) + filled
            return torch.stack([lengths, pads], dim=1).view(batch_size, 1, 2, 1)
    # A stable sort of "not real" puts the real rows first, in their order. The queries are then
    # the last rows of each sequence's real keys (bottom-right aligned), which holds when the
    # padding precedes them, as generate()'s left padding does.
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices
    plan = torch.cat([real.sum(dim=1, dtype=torch.int32)[:, None], order.to(torch.int32)], dim=1)
    return plan.view(batch_size, 1, 1, 1 + kv_length)


def _left_padding(real, end):
    """(pads, left_only) of a boolean (B, L) mask of real keys, none at or past `end` (an int or a
    0-d tensor): pads int32 (B,), each row's keys before its first real one if its real keys are
    one run ending at `end`, and left_only, a 0-d device tensor: whether every row's are (padding
    all on the left, as generate() pads prompts). Nothing is read on the host here."""
    pads = end - real.sum(dim=1, dtype=torch.int32)
    rows = torch.arange(real.shape[1], device=real.device)
    return pads, (real == ((rows >= pads[:, None]) & (rows < end))).all()


def _is_static_cache_mask(mask) -> bool:
    return (mask.ndim == 4 and mask.dtype == torch.int32 and mask.shape[1] == 1
            and (mask.shape[2] == 1 or mask.shape[2:] == (2, 1)))


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """transformers' mask hook for "xattn": None, or the boolean padding mask (B, kv_length)
    of the keys this layer sees, or for a static cache the int32 mask of _static_cache_mask.
    Nothing of size q_length x kv_length is ever built."""
    if mask_function is not None:
        _check_mask_pattern(mask_function)
    if isinstance(kv_offset, torch.Tensor):
        raise NotImplementedError("attn_implementation='xattn' does not support caches whose "
                                  "key offset is a tensor; use attn_implementation='sdpa'")
    static = isinstance(q_offset, torch.Tensor) or q_offset + q_length < kv_offset + kv_length
    if static and kv_offset == 0:
        # A preallocated cache (StaticCache): at the first step q_offset is still the int 0.
        return _static_cache_mask(batch_size, q_length, kv_length, q_offset, mask_function,
                                  attention_mask, kwargs.get("device"))
    if q_offset + q_length != kv_offset + kv_length:
        # The queries are not the last q_length keys: an offset scheme (e.g. multi-token
        # prediction) that bottom-right alignment would get wrong.
        raise NotImplementedError(
            f"attn_implementation='xattn' needs the queries to be the last keys, as in the "
            f"default dynamic cache and static caches; got queries "
            f"{q_offset}..{q_offset + q_length} against keys {kv_offset}..{kv_offset + kv_length}")
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2:
        raise NotImplementedError(f"attn_implementation='xattn' takes a 2-d padding mask "
                                  f"(batch, keys), got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[-1] < kv_offset + kv_length:
        raise ValueError(f"attention_mask: expected at least {kv_offset + kv_length} columns "
                         f"(one per token seen so far), got {attention_mask.shape[-1]}")
    mask = attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    if torch.compiler.is_compiling():
        return mask
    # One read of the mask on the host per forward: is there padding at all, and is it all on
    # the left (each row's keys a run that ends with the last key, as generate() pads prompts)?
    pads, left = _left_padding(mask, kv_length)
    unpadded, left_only = torch.stack([pads.max() == 0, left]).tolist()
    if unpadded:
        return None  # no padding: the dense path, no unpadding
    if left_only:
        setattr(mask, _LEFT_PADDING, pads)  # attention_forward's decoding path (_few_queries)
    return mask


# -------------------------------------------------------------------- attention function

def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention hook for "xattn".

    query (B, H, Sq, D), key and value (B, Hk, Sk, D) with Hk dividing H (not repeated),
    attention_mask None or the (B, Sk) boolean padding mask of padding_mask().
    Returns (output (B, Sq, H, D), None): xattn never forms the attention weights.
    """
    if dropout and dropout > 0:
        raise ValueError(f"dropout: xattn has no attention dropout, got {dropout} (the model "
                         f"is training with attention_dropout > 0); set the config's "
                         f"attention_dropout to 0.0 or use attn_implementation='eager'")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("attn_implementation='xattn' does not support position_bias "
                                  "(position biases); use attn_implementation='eager'")
    # GPT-OSS's per-head sink logits (s_aux, a parameter in the model's dtype): xattn takes them
    # as float32 (Hq,); the cast is differentiable, so the parameter still gets its gradient.
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        sinks = sinks.float()
    if kwargs.get("output_attentions"):
        warnings.warn("attn_implementation='xattn' never forms attention weights: "
                      "output_attentions=True returns None for them", stacklevel=2)
    if all(kwargs.get(name) is not None for name in ("cu_seq_lens_q", "cu_seq_lens_k")):
        raise NotImplementedError("attn_implementation='xattn' does not take padding-free "
                                  "batches (cu_seq_lens_*) yet")

    # The call's is_causal wins over the module's, as in transformers' sdpa and flash paths.
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = None
    if sliding_window is not None:
        if not causal:
            raise NotImplementedError("attn_implementation='xattn': a sliding window without "
                                      "causal masking (bidirectional) is not supported")
        window = (int(sliding_window) - 1, 0)  # W keys: itself and the W - 1 before it
    options = dict(causal=causal, scale=scaling, window=window,
                   softcap=softcap if softcap else None, sinks=sinks)
    # A decoding step (few queries, nothing to differentiate): the split-KV decode kernel, which
    # spreads a long cache over the GPU where the forward kernel has one block per query tile.
    # Not under torch.compile, which traces attention() as one op.
    few_queries = (query.shape[2] <= FEW_QUERIES and not torch.compiler.is_compiling()
                   and not _records_grad(query, key, value, sinks))

    if attention_mask is None:
        if few_queries:
            return _few_queries(query, key, value, None, options), None
        # transformers' projections make (B, S, H, D) tensors and hand over (B, H, S, D) views of
        # them: taken as "bshd", the output is allocated (B, S, H, D), the layout the hook
        # returns, so no copy of it is made and the tensor autograd saves for xattn's backward
        # is the one o_proj saves (one activation per layer fewer than out.transpose().contiguous()).
        out = xattn.attention(*(x.transpose(1, 2) for x in (query, key, value)), layout="bshd",
                              **options)
        return out, None
    if _is_static_cache_mask(attention_mask):
        if sinks is not None:
            raise NotImplementedError("attn_implementation='xattn': static caches with attention "
                                      "sinks (s_aux) are not served yet; use the dynamic cache")
        if not causal:
            raise NotImplementedError("attn_implementation='xattn': static caches are served "
                                      "for causal layers only")
        scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
        out = static_cache_attention(query, key, value, attention_mask, float(scale),
                                     -1 if window is None else window[0],
                                     float(softcap) if softcap else 0.0)
        return out, None
    pads = getattr(attention_mask, _LEFT_PADDING, None)
    if pads is not None and few_queries and causal:  # causal: padded query rows see no key
        return _few_queries(query, key, value, pads, options), None
    if attention_mask.dtype != torch.bool or attention_mask.ndim != 2:
        raise NotImplementedError(
            f"attn_implementation='xattn' takes the 2-d boolean padding mask its mask function "
            f"builds, got a {attention_mask.ndim}-d {attention_mask.dtype} mask (a custom mask "
            f"passed to the model?); use attn_implementation='sdpa'")
    return _padded(query, key, value, attention_mask, options), None


# A padding mask whose padding is all on the left carries its per-row pad counts (int32 (B,), on
# the device) under this attribute (padding_mask sets it): decoding steps of a left-padded batch
# then need no unpadding.
_LEFT_PADDING = "_xattn_left_padding"
# Up to this many query tokens per layer, without gradients, a layer makes one
# attention_with_kvcache call straight on its keys and values (with cache_leftpad under left
# padding: no gathers, no scatter, no host synchronization); longer queries (a prompt's forward)
# take attention() or the unpadding path, where the prefill kernels are the fast ones.
FEW_QUERIES = 16


def _records_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _few_queries(query, key, value, pads, options):
    """Attention of (B, H, Sq, D) queries against (B, Hk, Sk, D) keys and values, the queries
    the last Sq tokens, through the decode kernels. pads: None, or int32 (B,) on the device:
    row b starts with pads[b] padding keys (the sequence's keys are its last Sk - pads[b]).
    Output (B, Sq, H, D); under a causal mask a padded query row sees no key and gets zeros, as
    the unpadding path gives it."""
    return xattn.attention_with_kvcache(
        *(x.transpose(1, 2) for x in (query, key, value)), cache_seqlens=key.shape[2],
        cache_leftpad=pads, layout="bshd", **options)


def _unpad(mask):
    """(indices of the real tokens in the flattened (B*S) order, int32 cumulative lengths
    (B+1,), longest length) of a boolean (B, S) mask. Synchronizes: lengths are data."""
    lengths = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
    cumulative = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return indices, cumulative, int(lengths.max())


# The unpadding of one mask, kept while the mask lives: transformers hands every layer of a
# forward the same mask tensor, and each _unpad synchronizes with the GPU (its lengths are data),
# so a decoding step would otherwise wait for the GPU twice in every layer instead of once.
# It is kept on the mask tensor itself (tensors compare elementwise, so no dictionary can key
# on them), under {(sq, the mask's version): unpadding}.
_UNPADDING = "_xattn_unpadding"


def _unpadding(key_mask, sq):
    """(indices_q, cu_q, max_q, indices_k, cu_k, max_k) of a (B, Sk) key mask whose last sq
    keys are the queries, computed once per mask (and per change to it)."""
    entries = getattr(key_mask, _UNPADDING, None)
    if entries is None:
        entries = {}
        setattr(key_mask, _UNPADDING, entries)
    key = (sq, key_mask._version)
    found = entries.get(key)
    if found is None:
        # The queries are the last sq keys (checked by padding_mask), so their padding is there.
        found = entries[key] = _unpad(key_mask[:, key_mask.shape[1] - sq:]) + _unpad(key_mask)
    return found


def _padded(query, key, value, key_mask, options):
    batch, heads, sq, head_dim = query.shape
    kv_heads, sk = key.shape[1], key.shape[2]
    if tuple(key_mask.shape) != (batch, sk):
        raise ValueError(f"attention_mask: expected shape {(batch, sk)} (batch, keys), got "
                         f"{tuple(key_mask.shape)}")
    if torch.compiler.is_compiling():  # traced once per graph: nothing to keep
        indices_q, cu_q, max_q = _unpad(key_mask[:, sk - sq:])
        indices_k, cu_k, max_k = _unpad(key_mask)
    else:
        indices_q, cu_q, max_q, indices_k, cu_k, max_k = _unpadding(key_mask, sq)
    # (B, H, S, D) -> (B*S, H, D), real tokens only: (total, H, D) as attention_varlen takes.
    q = query.transpose(1, 2).reshape(batch * sq, heads, head_dim).index_select(0, indices_q)
    k, v = (x.transpose(1, 2).reshape(batch * sk, kv_heads, head_dim).index_select(0, indices_k)
            for x in (key, value))
    out = xattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    # Padded query rows get zeros (no token there to attend from), as FlashAttention-2 gives.
    full = out.new_zeros(batch * sq, heads, head_dim).index_copy(0, indices_q, out)
    return full.view(batch, sq, heads, head_dim)


# ------------------------------------------------------------------------- static caches

@torch.library.custom_op("xattn_transformers::static_cache_attention", mutates_args=())
def static_cache_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor, scale: float, window_left: int,
                           softcap: float) -> torch.Tensor:
    """Causal attention of query (B, H, Sq, D) against a static cache's keys/values
    (B, Hk, L, D) as the mask of _static_cache_mask describes them; output (B, Sq, H, D).
    An op of its own so that torch.compile (and its CUDA graphs) treats the call as one node;
    the cache is only read (transformers has already written the new rows)."""
    lengths = mask[:, 0, 0, 0].contiguous()
    leftpad = mask[:, 0, 1, 0].contiguous() if mask.shape[2] == 2 else None  # left padding
    if mask.shape[-1] > 1:  # other padding: each sequence's real rows first, one gather per layer
        order = mask[:, 0, 0, 1:].long()
        index = order[:, None, :, None].expand(*keys.shape[:2], -1, keys.shape[-1])
        keys, values = keys.gather(2, index), values.gather(2, index)
    with torch.no_grad():  # inference only, as attention_with_kvcache requires
        out = xattn.attention_with_kvcache(
            query, keys, values, cache_seqlens=lengths, cache_leftpad=leftpad, causal=True, scale=scale,
            window=None if window_left < 0 else (window_left, 0), softcap=softcap or None)
    return out.transpose(1, 2).contiguous()


@static_cache_attention.register_fake
def _(query, keys, values, mask, scale, window_left, softcap):
    batch, heads, sq, head_dim = query.shape
    return query.new_empty(batch, sq, heads, head_dim)
