"""The hip backend on an AMD GPU (a ROCm build of CuPy): the property suite of
test_properties.py, the gradient suite of test_grad.py (torch autograd into xattn.hip.backward,
against the float64 gradient oracle), the variants of test_variants.py and test_variants_grad.py
(sliding windows, softcap, ALiBi, packed batches; forward and gradients) and direct forward calls
with poisoned outputs, as for the cuda backend.
Skipped, with the reason, everywhere else -- including this project's CI and NVIDIA machines;
nothing here has run yet (see README, "AMD status").

    PYTHONPATH=. python -m pytest -m gpu tests/test_hip_gpu.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import xattn
from conftest import LSE_TOLERANCE, TOLERANCE, Backend, _cuda_kinds, to_float64
from test_gpu import SIZES
from test_properties import (  # noqa: F401  (collected here again, against the hip backend)
    test_attention_matches_exact_oracle,
    test_edge_lengths_and_head_dims,
    test_empty_and_keyless_rows,
    test_gqa_equals_explicitly_repeated_kv,
    test_lse_is_logsumexp_of_scaled_masked_scores,
    test_output_lies_within_visible_values,
    test_permuting_keys_with_values_changes_nothing,
)
from test_variants import (  # noqa: F401  (collected here again, against the hip backend)
    test_softcap_keeps_huge_scores_finite,
    test_variants_match_exact_oracle,
    test_varlen_matches_each_sequence_alone,
    test_window_edges,
)

try:  # the gradient properties need torch (a ROCm build, for the hip backend)
    from test_grad import (  # noqa: F401  (collected here again, against the hip backend)
        test_deterministic_gradients_are_bitwise_reproducible,
        test_empty_problems_and_keyless_rows_give_zero_gradients,
        test_gqa_gradients_equal_repeated_kv_gradients_summed,
        test_gradient_edge_lengths_and_head_dims,
        test_gradients_match_exact_oracle,
    )
except pytest.skip.Exception:
    pass
try:
    from test_variants_grad import (  # noqa: F401  (collected here again, against the hip backend)
        test_variant_gradients_match_exact_oracle,
        test_varlen_gradients_match_each_sequence_alone,
    )
except pytest.skip.Exception:
    pass

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend():
    """Overrides conftest's: attention() on ROCm arrays goes to the hip backend by itself."""
    usable, reason = xattn.available_backends()["hip"]
    if not usable:
        pytest.skip(f"hip backend unusable: {reason}")
    return Backend("hip", _cuda_kinds())


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_forward_writes_every_element(backend, size):
    import cupy
    from xattn import hip

    batch, q_heads, kv_heads, sq, sk, head_dim, causal = size
    rng = np.random.default_rng(sum(size))
    for library, dtype in backend.kinds:
        q, k, v = (backend.make(rng.standard_normal(s), library, dtype) for s in (
            (batch, q_heads, sq, head_dim), (batch, kv_heads, sk, head_dim),
            (batch, kv_heads, sk, head_dim)))
        out = backend.make(np.full((batch, q_heads, sq, head_dim), np.nan), library, dtype)
        lse = backend.make(np.full((batch, q_heads, sq), np.nan), library, "float32")
        scale = 1 / math.sqrt(head_dim)
        if library == "torch":
            import torch
            stream = torch.cuda.current_stream().cuda_stream
        else:
            stream = cupy.cuda.get_current_stream().ptr
        hip.forward(q, k, v, out, lse, causal=causal, scale=scale, stream=stream)
        got_out, got_lse = to_float64(out), to_float64(lse)
        want_out, want_lse = xattn.exact_attention(q, k, v, causal=causal, scale=scale)
        assert not np.isnan(got_out).any() and not np.isnan(got_lse).any(), "unwritten elements"
        empty = np.isneginf(want_lse)
        np.testing.assert_array_equal(np.isneginf(got_lse), empty)
        assert (got_out[empty] == 0).all()
        if want_out.size and np.linalg.norm(want_out):
            error = np.linalg.norm(got_out - want_out) / np.linalg.norm(want_out)
            assert error <= TOLERANCE[dtype], f"{library} {dtype}: relative error {error:.2e}"
            np.testing.assert_allclose(got_lse[~empty], want_lse[~empty],
                                       rtol=LSE_TOLERANCE[dtype], atol=LSE_TOLERANCE[dtype])
