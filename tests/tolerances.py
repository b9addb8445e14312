"""The error bounds the tests hold results to: one table, per kind of result and dtype.

Every bound is a relative error ‖got − want‖ / ‖want‖ unless its row says otherwise, `want`
being computed from exactly the values the code under test saw (inputs already rounded to the
dtype), so input rounding is never part of the error. A test that needs a bound takes it from
here; if a new kind of result needs one, it gets a row here with its reason.
"""

from __future__ import annotations

TOLERANCES = {
    # attention()'s out against the float64 oracle. Kernels round P to the input dtype before
    # P·V on the tensor cores and round O once: a few units of roundoff u of the dtype (float16
    # u = 2^-11, bfloat16 2^-8); float32 accumulates in float32; float64 (reference backend only)
    # is exact to rounding.
    "out": {"float64": 1e-10, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2},
    # The lse, held to rtol = atol = this: the same as out, except that attention() returns a
    # float32 lse even for float64 inputs.
    "lse": {"float64": 1e-6, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2},
    # Gradients, relative to the norm of the gradient computed with every term in absolute value
    # (tests/test_grad.py, error_scales, explains why): ~8 u, since P and dS are rounded to the
    # input dtype before each tensor-core product and O, dO and the gradients once each. The
    # reference backend measures <= 1.6e-4 in float16 and <= 1.3e-3 in bfloat16.
    "grad": {"float64": 1e-10, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2},
    # Gradients relative to their plain norm ‖want‖ (tests/test_torch_sdpa.py,
    # tests/test_flash_attn_compat.py compare whole gradients through integration layers, against
    # the float64 oracle or torch's math backend in float64): the plain norm is smaller than the
    # absolute-value norm of "grad", where cancelling terms of dS make the gradient small, so the
    # bound is looser: float32 1e-4 (the reference backward), float16 and bfloat16 ~8x "out".
    "grad_plain": {"float32": 1e-4, "float16": 1.6e-2, "bfloat16": 8e-2},
    # out when the scaled scores reach +-1e4 (tests/test_numerics.py): float32 rounding of a
    # score of 1e4 is about 1e-3 inside exp(); bfloat16 also rounds P before P·V on the GPU.
    "large_scores": {"float64": 1e-9, "float32": 5e-3, "float16": 5e-3, "bfloat16": 2e-2},
    # A block of torch layers with xattn inside against the same block with SDPA
    # (tests/test_integrations_torch.py): LayerNorms and Linears in the working dtype add the
    # dtype's epsilon times a small factor.
    "block": {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2},
    # The same block compiled against eager: in float32 only the fused kernels' reassociation.
    "compiled_vs_eager": {"float32": 1e-5, "float16": 3e-3, "bfloat16": 3e-2},
    # A transformers model's logits with attn_implementation="xattn" against its peer on the
    # same weights (tests/test_transformers.py): float32 attention on both sides (~1e-6 per
    # layer); bfloat16 rounds activations to 8 bits of mantissa in every layer.
    "model_logits": {"float32": 1e-4, "bfloat16": 3e-2},
    # The gradients of one training step of that model: float32 against its peer; bfloat16
    # against the float32 peer (the step's truth), within 6e-2 or within PEER_NOISE_FACTOR times
    # the bfloat16 peer's own distance to that truth, whichever is larger (a nearly cancelling
    # gradient is bfloat16 noise on both sides).
    "model_grads": {"float32": 1e-3, "bfloat16": 6e-2},
}
PEER_NOISE_FACTOR = 1.5  # "model_grads" in bfloat16: how much further than the peer xattn may be


def tolerance(kind: str, dtype) -> float:
    """TOLERANCES[kind] for dtype given as a name ("float16"), a NumPy dtype or a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    return TOLERANCES[kind][name]


def output_resolution(dtype, size: int) -> float:
    """The absolute error an exact result may have once written in `dtype`, in the 2-norm over
    `size` elements: half the smallest subnormal per element (a float16 result of 5e-9 rounds to
    0 however exact the kernel). bfloat16 as float32 (same exponents, finer subnormals: only
    stricter); no NumPy import is needed for the other names."""
    import math

    import numpy as np

    name = str(dtype).removeprefix("torch.")
    tiny = np.finfo(np.dtype("float32" if name == "bfloat16" else name)).smallest_subnormal
    return 0.5 * float(tiny) * math.sqrt(size)
