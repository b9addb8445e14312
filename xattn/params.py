"""The kernels' parameter blocks as NumPy structured dtypes: the Python half of
kernels_common/params.h.

A kernel takes one struct by value; Python fills a one-element array of the matching dtype and
hands its bytes to the launch (xattn/launch.py). `align=True` lays the fields out as a C compiler
does; tests/test_params.py compiles params.h with the host C compiler and checks every offset and
the size against these dtypes, so the two halves cannot drift apart silently.
"""

from __future__ import annotations

import functools

import numpy as np

# struct TensorRef: a pointer and the (batch, head, row) strides in elements.
TENSOR_REF = np.dtype([("ptr", "<u8"), ("batch_stride", "<i8"), ("head_stride", "<i8"),
                       ("row_stride", "<i8")], align=True)

# The tensors of AttnParams, in the struct's order.
ATTN_TENSORS = ("q", "k", "v", "o", "lse", "dout", "dq", "dk", "dv", "delta", "dq_accum")

ATTN_PARAMS = np.dtype(
    [(name, TENSOR_REF) for name in ATTN_TENSORS]
    + [("cu_seqlens_q", "<u8"), ("cu_seqlens_k", "<u8"), ("alibi_slopes", "<u8"),
       ("sinks", "<u8"), ("block_table", "<u8"), ("seqused_k", "<u8"), ("alibi_batch_stride", "<i8"),
       ("block_table_stride", "<i8"),
       ("batch_offset", "<i4"), ("heads_q", "<i4"), ("heads_per_kv", "<i4"), ("seqlen_q", "<i4"),
       ("seqlen_k", "<i4"), ("head_dim", "<i4"), ("window_left", "<i4"), ("window_right", "<i4"),
       ("softcap_scale", "<f4"), ("scale", "<f4"), ("scale_log2", "<f4"), ("grad_scale", "<f4"),
       ("page_size", "<i4"), ("num_pages", "<i4"), ("max_pages", "<i4"), ("batch", "<i4")],
    align=True)



# struct DecodeParams: the KV-cache decode kernels (flash_decode*.cu, launched by xattn/kvcache.py).
DECODE_PARAMS = np.dtype(
    [(name, TENSOR_REF) for name in ("q", "k", "v", "o", "lse", "k_new", "v_new")]
    + [(name, "<u8") for name in ("o_part", "lse_part", "cache_seqlens", "block_table", "sinks",
                                  "cache_leftpad")]
    + [("seqlens_stride", "<i8"), ("block_table_stride", "<i8"), ("leftpad_stride", "<i8")]
    + [(name, "<i4") for name in ("uniform_seqlen", "batch_offset", "heads_q", "heads_per_kv",
                                  "seqlen_q", "seqlen_new", "seqlen_max", "head_dim", "window_left",
                                  "window_right", "num_splits", "m_blocks", "num_pages", "page_size")]
    + [(name, "<f4") for name in ("scale_log2", "softcap_log2", "scale_over_softcap")]
    + [("k_scale", "<u8"), ("v_scale", "<u8"), ("k_scale_stride", "<i8"), ("v_scale_stride", "<i8")],
    align=True)

# Every struct of params.h and its dtype, for the layout test.
STRUCTS = {"AttnParams": ATTN_PARAMS, "DecodeParams": DECODE_PARAMS}


@functools.lru_cache(maxsize=None)
def pointer_words(dtype: np.dtype) -> dict:
    """{pointer field: the index of the 64-bit word that holds it} of a parameter-block dtype: the
    pointer of every TensorRef (its first member) and every other pointer. Pointers are the
    "<u8" fields, and nothing else is. A launch patches pointers per call through a uint64 view of
    the block instead of through field access."""
    words = {}
    for name in dtype.names:
        field, offset = dtype.fields[name][:2]
        if field == TENSOR_REF or field == np.dtype("<u8"):
            words[name] = offset // 8
    return words


def attn_params() -> np.ndarray:
    """A zeroed one-element AttnParams block (null pointers, zero strides)."""
    return np.zeros(1, dtype=ATTN_PARAMS)


def decode_params() -> np.ndarray:
    """A zeroed one-element DecodeParams block."""
    return np.zeros(1, dtype=DECODE_PARAMS)


def set_tensor(block: np.ndarray, name: str, ptr: int, strides) -> None:
    """Fill one TensorRef: strides as (batch, head, row), or (batch, head) for lse-like tensors."""
    ref = block[name]
    ref["ptr"] = ptr
    b, h, *rest = strides
    ref["batch_stride"], ref["head_stride"] = b, h
    ref["row_stride"] = rest[0] if rest else 1
