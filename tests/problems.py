"""Drawing attention problems: shapes (awkward ones included), memory layouts and values.

A Problem is float64 NumPy data in the "bhsd" layout plus how to present it to a backend:
layout, library, dtype, and a memory arrangement per tensor (contiguous, a slice of a larger
NaN-padded buffer, a transposed buffer, or a last dimension with stride 2). Padding is NaN so that
a kernel reading outside the view poisons its own output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from hypothesis import strategies as st

from conftest import permute

EDGE_LENGTHS = (0, 1, 2, 63, 64, 65, 127, 129, 200)
EDGE_HEAD_DIMS = (1, 7, 32, 63, 64, 80, 96, 128, 129, 200, 256)
GQA_RATIOS = (1, 2, 7)
MEMORY = ("contiguous", "sliced", "transposed", "strided_last_dim")
_SWAP_HS = (0, 2, 1, 3)


@dataclass(frozen=True)
class Problem:
    q: np.ndarray  # (B, Hq, Sq, D) float64
    k: np.ndarray  # (B, Hk, Sk, D)
    v: np.ndarray
    causal: bool
    scale: float | None
    layout: str
    library: str
    dtype: str
    memory: tuple  # one MEMORY entry for each of q, k, v

    def arrays(self, backend, q=None, k=None, v=None):
        """q, k, v as the backend's arrays in the problem's layout and memory arrangement."""
        data = (self.q if q is None else q, self.k if k is None else k, self.v if v is None else v)
        return tuple(present(backend, x, self.layout, self.library, self.dtype, memory)
                     for x, memory in zip(data, self.memory))

    def kwargs(self):
        return dict(causal=self.causal, scale=self.scale, layout=self.layout)

    def with_(self, **changes):
        return replace(self, **changes)


def present(backend, bhsd: np.ndarray, layout, library, dtype, memory):
    """Place float64 (B, H, S, D) data in the requested layout and memory arrangement."""
    logical = bhsd if layout == "bhsd" else bhsd.transpose(_SWAP_HS)
    shape = logical.shape
    if memory == "contiguous":
        return backend.make(np.ascontiguousarray(logical), library, dtype)
    if memory == "transposed":
        # Stored with axes 1 and 2 swapped, viewed back in the requested order.
        stored = np.ascontiguousarray(logical.transpose(_SWAP_HS))
        return permute(backend.make(stored, library, dtype), _SWAP_HS)
    if memory == "sliced":
        pad = (1, 2, 3, 5)
        buffer = np.full(tuple(n + p for n, p in zip(shape, pad)), np.nan)
        window = tuple(slice(1, 1 + n) for n in shape)
        buffer[window] = logical
        return backend.make(buffer, library, dtype)[window]
    if memory == "strided_last_dim":
        buffer = np.full(shape[:3] + (2 * shape[3],), np.nan)
        buffer[..., ::2] = logical
        return backend.make(buffer, library, dtype)[..., ::2]
    raise AssertionError(memory)


def to_bhsd(x: np.ndarray, layout: str) -> np.ndarray:
    return x if layout == "bhsd" else x.transpose(_SWAP_HS)


lengths = st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 200))
head_dims = st.one_of(st.sampled_from(EDGE_HEAD_DIMS), st.integers(1, 256))


@st.composite
def problems(draw, backend, *, causal=None, lengths=lengths, head_dims=head_dims,
             min_kv_heads=1, kinds=None):
    """A random attention problem for `backend` (see module docstring)."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(min_kv_heads, 2))
    q_heads = kv_heads * draw(st.sampled_from(GQA_RATIOS))
    sq, sk, head_dim = draw(lengths), draw(lengths), draw(head_dims)
    library, dtype = draw(st.sampled_from(kinds or backend.kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from((1.0, 3.0)))  # 3.0 makes the softmax peaky
    return Problem(
        q=spread * rng.standard_normal((batch, q_heads, sq, head_dim)),
        k=spread * rng.standard_normal((batch, kv_heads, sk, head_dim)),
        v=rng.standard_normal((batch, kv_heads, sk, head_dim)),
        causal=draw(st.booleans()) if causal is None else causal,
        scale=draw(st.one_of(st.none(), st.floats(0.02, 2.0))),
        layout=draw(st.sampled_from(("bhsd", "bshd"))),
        library=library, dtype=dtype,
        memory=tuple(draw(st.sampled_from(MEMORY)) for _ in range(3)),
    )
