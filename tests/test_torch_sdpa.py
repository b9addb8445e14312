"""xattn behind torch's scaled_dot_product_attention (xattn.integrations.torch_sdpa).

CPU (every CI run): registration on import in either import order without activating, and
without `import xattn` importing torch; activation and restore in the dispatcher's table; the
fallback decision and that a fallback hands the call unchanged to the previous kernel; and the
argument translation of every override, called directly on CPU tensors (xattn's reference
backend) against the float64 oracles: the aten ops' bottom-right is_causal for Sq < Sk and
Sq > Sk, scale, GQA without expansion, window sizes, packed (cum_seq) batches, the logsumexp
layouts, output strides equal to torch's meta functions', and the backward ops.

GPU (`gpu` marker), with "xattn" activated: F.scaled_dot_product_attention (forced onto the
flash backend) against the math backend in float64, plain, causal, causal_lower_right with
Sq != Sk, top-left is_causal with Sq != Sk, GQA, both memory layouts, bf16/fp16, backward,
torch.compile(fullgraph=True); a profiler trace shows xattn's kernels (names starting with
flash_fwd / flash_bwd, unmangled) ran and torch's FlashAttention-2 (pytorch_flash::) did not;
the aten ops' outputs have the shapes, dtypes and strides of torch's own kernel; a tiny
transformers model generates the same tokens with and without activation; dropout falls back.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import xattn  # noqa: E402
from xattn import reference  # noqa: E402
from xattn.integrations import torch_sdpa  # noqa: E402

from conftest import TOLERANCE  # noqa: E402
from tolerances import TOLERANCES  # noqa: E402

attention_registry = torch.nn.attention
HAS_REGISTRY = hasattr(attention_registry, "register_flash_attention_impl")
needs_registry = pytest.mark.skipif(not HAS_REGISTRY, reason="this torch has no flash-attention "
                                    "registry (torch.nn.attention.register_flash_attention_impl)")
OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
       "_flash_attention_forward", "_flash_attention_backward",
       "_flash_attention_forward_no_dropout_inplace")


def rel_error(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def f64(t) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _cuda_kernels(op: str) -> list[str]:
    return [line for line in torch._C._dispatch_dump(f"aten::{op}").splitlines()
            if line.startswith("CUDA:")]


class _Refusing:
    """A 'previous kernel' that must not be reached."""

    def call_boxed(self, *args, **kwargs):
        raise AssertionError("fell back although xattn serves this call")


REFUSE = _Refusing()

# ------------------------------------------------------------------------------- registration


@needs_registry
def test_import_xattn_does_not_import_torch_and_registers_once_torch_arrives():
    out = _run("""
        import sys
        import xattn
        assert "torch" not in sys.modules, "import xattn imported torch"
        import torch.nn.attention as attention
        print(attention.list_flash_attention_impls(), attention.current_flash_attention_impl())
    """)
    names, current = out.rsplit("]", 1)
    assert "'xattn'" in names and current.strip() == "None"


@needs_registry
def test_registered_when_torch_was_imported_first_and_never_activated():
    out = _run("""
        import torch, xattn
        import torch.nn.attention as attention
        print("xattn" in attention.list_flash_attention_impls(),
              attention.current_flash_attention_impl())
        print(sum(line.startswith("CUDA:") for line in torch._C._dispatch_dump(
              "aten::_scaled_dot_product_flash_attention").splitlines()
              if "torch_sdpa" in line))
    """)
    assert out.split() == ["True", "None", "0"]


def test_import_xattn_works_without_torch():
    # sys.modules["torch"] = None makes every `import torch` fail, as if it were not installed.
    out = _run("""
        import sys
        sys.modules["torch"] = None
        import numpy as np, xattn
        q = np.random.default_rng(0).standard_normal((1, 2, 5, 8)).astype(np.float32)
        print(xattn.attention(q, q, q).shape)
    """)
    assert out.strip() == "(1, 2, 5, 8)"


@needs_registry
def test_activate_overrides_every_flash_op_and_restore_puts_them_back():
    before = {op: _cuda_kernels(op) for op in OPS if hasattr(torch.ops.aten, op)}
    with pytest.warns(UserWarning, match="not usable") if not torch.cuda.is_available() else \
            _no_warning():
        attention_registry.activate_flash_attention_impl("xattn")
    try:
        assert attention_registry.current_flash_attention_impl() == "xattn"
        for op in before:
            kernels = _cuda_kernels(op)
            assert kernels and "torch_sdpa.py" in kernels[0], (op, kernels)
        # Activating again (the registry restores first) leaves one override, not two.
        with pytest.warns(UserWarning) if not torch.cuda.is_available() else _no_warning():
            attention_registry.activate_flash_attention_impl("xattn")
        assert all("torch_sdpa.py" in _cuda_kernels(op)[0] for op in before)
        # The quantized (float8) overloads keep torch's kernels.
        assert not any("torch_sdpa" in line for line in torch._C._dispatch_dump(
            "aten::_flash_attention_forward.quantized").splitlines())
    finally:
        attention_registry.restore_flash_attention_impl()
    assert attention_registry.current_flash_attention_impl() is None
    assert {op: _cuda_kernels(op) for op in before} == before


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------ fallback decision


def _qkv(b=1, hq=4, hk=2, sq=6, sk=9, d=16, dtype=torch.float32, layout="bhsd", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda h, s: (b, h, s, d)) if layout == "bhsd" else (lambda h, s: (b, s, h, d))
    return tuple(torch.randn(shape(h, s), generator=g).to(dtype)
                 for h, s in ((hq, sq), (hk, sk), (hk, sk)))


@pytest.mark.parametrize("arguments, reason", [
    (dict(dropout_p=0.1), "dropout_p"),
    (dict(return_debug_mask=True), "return_debug_mask"),
    (dict(extra=dict(seqused_k=torch.ones(1, dtype=torch.int32))), "seqused_k"),
    (dict(extra=dict(block_table=torch.ones(1, 1, dtype=torch.int32))), "block_table"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), "alibi_slopes"),
])
def test_forward_falls_back_for_what_xattn_does_not_do(arguments, reason):
    q, k, v = _qkv()
    assert reason in torch_sdpa.forward_unsupported(q, k, v, **arguments)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn])
def test_unsupported_dtypes_fall_back(dtype):
    q, k, v = (t.to(dtype) for t in _qkv())
    assert "dtypes" in torch_sdpa.forward_unsupported(q, k, v)
    assert "dtypes" in torch_sdpa.backward_unsupported(q, k, v)


def test_head_dim_above_256_falls_back_and_supported_calls_do_not():
    q, k, v = _qkv(d=264)
    assert "head dims" in torch_sdpa.forward_unsupported(q, k, v)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, k, v = _qkv(d=256, dtype=dtype)
        assert torch_sdpa.forward_unsupported(q, k, v, extra=dict(num_splits=4)) is None
        assert torch_sdpa.backward_unsupported(q, k, v) is None
    assert "dropout_p" in torch_sdpa.backward_unsupported(q, k, v, dropout_p=0.5)


class _Recorder:
    def call_boxed(self, *args, **kwargs):
        self.call = (args, kwargs)
        return "previous kernel's result"


def test_fallback_hands_the_call_unchanged_to_the_previous_kernel():
    q, k, v = _qkv()
    recorder, keyset = _Recorder(), object()
    result = torch_sdpa.sdpa_flash_forward(recorder, keyset, q, k, v, 0.25, True, False,
                                           scale=0.5)
    assert result == "previous kernel's result"
    assert recorder.call == ((keyset, q, k, v, 0.25, True, False), dict(scale=0.5))
    qs, ks, vs = _qkv(layout="bshd")
    torch_sdpa.flash_forward(recorder, keyset, qs, ks, vs, None, None, 6, 9, 0.0, False, True,
                             scale=None, window_size_left=3, window_size_right=None,
                             alibi_slopes=None, seqused_k=None)
    assert recorder.call[0] == (keyset, qs, ks, vs, None, None, 6, 9, 0.0, False, True)
    assert recorder.call[1] == dict(scale=None, window_size_left=3, window_size_right=None,
                                    alibi_slopes=None, seqused_k=None)
    out = torch.empty_like(q)
    torch_sdpa.sdpa_flash_backward(recorder, keyset, out, q, k, v, out, out[..., 0], None, None,
                                   6, 9, 0.5, False, None, None, scale=None)
    assert recorder.call[0][11] == 0.5  # dropout_p reached the previous kernel


def test_fallback_without_a_previous_kernel_says_why():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="dropout_p=0.5"):
        torch_sdpa.sdpa_flash_forward(None, None, q, k, v, 0.5)


@pytest.mark.parametrize("causal, left, right, expected", [
    (False, None, None, (-1, -1)), (False, -5, 3, (-1, 3)), (True, 4, None, (4, 0)),
    (True, None, 7, (-1, 0)), (False, 0, 0, (0, 0))])
def test_window_sizes_map_to_xattn_windows(causal, left, right, expected):
    assert torch_sdpa.window(causal, left, right) == expected


# ------------------------------------------------------------------ forward translation (CPU)

LSE_TOL = TOLERANCES["lse"]["float32"]  # CPU tensors here are float32


def _oracle(q, k, v, layout, **options):
    out, lse = xattn.exact_attention(q.double(), k.double(), v.double(), layout=layout, **options)
    return out, lse


@pytest.mark.parametrize("sq, sk", [(6, 9), (9, 6), (7, 7), (1, 5), (5, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_flash_forward_is_bottom_right_causal_with_gqa(sq, sk, causal):
    q, k, v = _qkv(b=2, hq=4, hk=2, sq=sq, sk=sk, d=12)
    out, lse, cum_q, cum_k, max_q, max_k, rng, unused, debug = torch_sdpa.sdpa_flash_forward(
        REFUSE, None, q, k, v, 0.0, causal, False, scale=0.3)
    want_out, want_lse = _oracle(q, k, v, "bhsd", causal=causal, scale=0.3)
    assert rel_error(f64(out), want_out) <= TOLERANCE["float32"]
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, sq)
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(f64(lse)[finite], want_lse[finite], rtol=LSE_TOL, atol=LSE_TOL)
    assert (f64(lse)[~finite] == -np.inf).all()
    assert (cum_q, cum_k, max_q, max_k) == (None, None, sq, sk)
    assert rng.shape == (2,) and rng.dtype == torch.uint64 and unused.shape == ()
    assert debug.numel() == 0 and out.stride() == torch.empty_like(q).stride()


def test_sdpa_flash_forward_keeps_the_memory_order_of_a_transposed_query():
    # (B, S, H, D) storage seen as (B, H, S, D), the layout projections produce in models.
    qs, ks, vs = _qkv(b=2, hq=4, hk=4, sq=8, sk=8, d=16, layout="bshd")
    q, k, v = (t.transpose(1, 2) for t in (qs, ks, vs))
    out = torch_sdpa.sdpa_flash_forward(REFUSE, None, q, k, v, 0.0, True)[0]
    assert out.stride() == torch.empty_like(q).stride() != torch.empty(q.shape).stride()
    assert rel_error(f64(out), _oracle(q, k, v, "bhsd", causal=True)[0]) <= TOLERANCE["float32"]


@pytest.mark.parametrize("window_size", [(3, None), (2, 1), (None, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_forward_windows_scale_bshd(window_size, causal):
    q, k, v = _qkv(b=2, hq=6, hk=3, sq=9, sk=13, d=8, layout="bshd")
    left, right = window_size
    out, lse, rng, unused, debug = torch_sdpa.flash_forward(
        REFUSE, None, q, k, v, None, None, 9, 13, 0.0, causal, False, scale=0.7,
        window_size_left=left, window_size_right=right)
    band = torch_sdpa.window(causal, left, right)
    want_out, want_lse = _oracle(q, k, v, "bshd", causal=causal, scale=0.7, window=band)
    assert rel_error(f64(out), want_out) <= TOLERANCE["float32"]
    assert lse.shape == (2, 6, 9) and out.stride() == q.stride()
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(f64(lse)[finite], want_lse[finite], rtol=LSE_TOL, atol=LSE_TOL)


def _packed(lengths_q, lengths_k, hq=4, hk=2, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), hq, d, generator=g)
    k, v = (torch.randn(sum(lengths_k), hk, d, generator=g) for _ in range(2))
    cu_q, cu_k = (torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32)
                  for n in (lengths_q, lengths_k))
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_forward_packed_batches(causal):
    lengths_q, lengths_k = [3, 0, 7, 5], [6, 2, 7, 1]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k)
    out, lse, *_ = torch_sdpa.flash_forward(REFUSE, None, q, k, v, cu_q, cu_k, 7, 7, 0.0,
                                            causal, False)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    for b in range(4):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want_out, want_lse = _oracle(q[None, rows], k[None, keys], v[None, keys], "bshd",
                                     causal=causal)
        assert rel_error(f64(out[rows]), want_out[0]) <= TOLERANCE["float32"]
        finite = np.isfinite(want_lse[0])
        np.testing.assert_allclose(f64(lse[:, rows])[finite], want_lse[0][finite], rtol=LSE_TOL,
                                   atol=LSE_TOL)


def test_no_dropout_inplace_writes_out_and_returns_lse():
    q, k, v = _qkv(layout="bshd")
    out = torch.full_like(q, float("nan"))
    lse = torch_sdpa.flash_forward_inplace(REFUSE, None, out, q, k, v, None, None, 6, 9, 0.0,
                                           True, False)
    want_out, want_lse = _oracle(q, k, v, "bshd", causal=True)
    assert rel_error(f64(out), want_out) <= TOLERANCE["float32"]
    np.testing.assert_allclose(f64(lse), want_lse, rtol=LSE_TOL, atol=LSE_TOL)


# ----------------------------------------------------------------- backward translation (CPU)

def _grad_oracle(q, k, v, dout, layout, **options):
    to = (lambda t: f64(t)) if layout == "bhsd" else (lambda t: f64(t).transpose(0, 2, 1, 3))
    grads = reference.exact_attention_grad_bhsd(to(q), to(k), to(v), to(dout), **options)
    return grads if layout == "bhsd" else tuple(g.transpose(0, 2, 1, 3) for g in grads)


GRAD_TOLERANCE = TOLERANCES["grad_plain"]["float32"]


@pytest.mark.parametrize("sq, sk", [(6, 9), (9, 6), (8, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_flash_backward_matches_the_gradient_oracle(sq, sk, causal):
    q, k, v = _qkv(b=2, hq=4, hk=2, sq=sq, sk=sk, d=12)
    out, lse = torch_sdpa.sdpa_flash_forward(REFUSE, None, q, k, v, 0.0, causal, scale=0.4)[:2]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch_sdpa.sdpa_flash_backward(REFUSE, None, dout, q, k, v, out, lse, None, None,
                                           sq, sk, 0.0, causal, None, None, scale=0.4)
    want = _grad_oracle(q, k, v, dout, "bhsd", causal=causal, scale=0.4)
    for got, expected, x in zip(grads, want, (q, k, v)):
        assert got.shape == x.shape and got.stride() == torch.empty_like(x).stride()
        assert rel_error(f64(got), expected) <= GRAD_TOLERANCE


def test_flash_attention_backward_dense_window_and_packed():
    q, k, v = _qkv(b=1, hq=4, hk=1, sq=10, sk=12, d=8, layout="bshd")
    band = torch_sdpa.window(True, 3, None)
    out, lse = torch_sdpa.flash_forward(REFUSE, None, q, k, v, None, None, 10, 12, 0.0, True,
                                        False, window_size_left=3)[:2]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    grads = torch_sdpa.flash_backward(REFUSE, None, dout, q, k, v, out, lse, None, None, 10, 12,
                                      0.0, True, None, None, window_size_left=3)
    want = _grad_oracle(q, k, v, dout, "bshd", causal=True, scale=8 ** -0.5, window=band)
    for got, expected in zip(grads, want):
        assert rel_error(f64(got), expected) <= GRAD_TOLERANCE

    lengths_q, lengths_k = [4, 6, 1], [5, 6, 3]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k)
    out, lse = torch_sdpa.flash_forward(REFUSE, None, q, k, v, cu_q, cu_k, 6, 6, 0.0, True,
                                        False)[:2]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    dq, dk, dv = torch_sdpa.flash_backward(REFUSE, None, dout, q, k, v, out, lse, cu_q, cu_k, 6,
                                           6, 0.0, True, None, None)
    for b in range(3):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want = _grad_oracle(q[None, rows], k[None, keys], v[None, keys], dout[None, rows],
                            "bshd", causal=True, scale=8 ** -0.5)
        for got, expected in zip((dq[rows], dk[keys], dv[keys]), want):
            assert rel_error(f64(got), expected[0]) <= GRAD_TOLERANCE


# ============================================================================== GPU

def _skip_unless_gpu():
    if not torch.cuda.is_available():
        pytest.skip("torch does not see a CUDA GPU")
    usable, why = xattn.available_backends()["cuda"]
    if not usable:
        pytest.skip(f"cuda backend unusable: {why}")


@pytest.fixture
def activated():
    _skip_unless_gpu()
    if not HAS_REGISTRY:
        pytest.skip("no flash-attention registry in this torch")
    attention_registry.activate_flash_attention_impl("xattn")
    yield
    attention_registry.restore_flash_attention_impl()


def _kernel_names(function):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        result = function()
        torch.cuda.synchronize()
    return result, {event.name for event in trace.events()
                    if event.device_type == torch.autograd.DeviceType.CUDA}


def _ran_xattn(names, prefix="flash_fwd"):
    """xattn's kernels are extern "C" (unmangled: 'flash_fwd', 'flash_bwd_dq', ...); torch's
    FlashAttention-2 kernels are C++ templates, 'void pytorch_flash::flash_fwd_kernel<...>'."""
    return any(name.startswith(prefix) for name in names)


def _math_reference(q, k, v, dout=None, **options):
    """SDPA's math backend in float64, and its gradients for dout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    leaves = [t.detach().double().requires_grad_(dout is not None) for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, **options)
    if dout is None:
        return out, None
    out.backward(dout.double())
    return out, [t.grad for t in leaves]


def _sdpa_flash(*args, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)


def _inputs(shape_q, shape_kv, dtype, storage="bhsd", requires_grad=False, seed=0):
    """(B, H, S, D) tensors; storage "bshd" makes them transposed views of (B, S, H, D) memory."""
    torch.manual_seed(seed)
    made = []
    for shape in (shape_q, shape_kv, shape_kv):
        if storage == "bshd":
            b, h, s, d = shape
            t = torch.randn(b, s, h, d, device="cuda", dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(shape, device="cuda", dtype=dtype)
        made.append(t.requires_grad_(requires_grad))
    return made


CASES = [  # (shape_q, shape_kv, options)
    ((2, 8, 256, 64), (2, 8, 256, 64), dict()),
    ((2, 8, 257, 64), (2, 8, 257, 64), dict(is_causal=True)),
    ((1, 8, 130, 128), (1, 2, 130, 128), dict(is_causal=True, enable_gqa=True)),
    ((2, 4, 100, 80), (2, 1, 333, 80), dict(enable_gqa=True, scale=0.05)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("storage", ["bhsd", "bshd"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_sdpa_forward_and_backward_run_on_xattn_and_match_math(activated, case, storage, dtype):
    shape_q, shape_kv, options = CASES[case]
    q, k, v = _inputs(shape_q, shape_kv, dtype, storage, requires_grad=True)
    dout = torch.randn(shape_q, device="cuda", dtype=dtype)

    def run():
        out = _sdpa_flash(q, k, v, **options)
        out.backward(dout)
        return out

    out, names = _kernel_names(run)
    assert _ran_xattn(names, "flash_fwd") and _ran_xattn(names, "flash_bwd"), sorted(names)
    assert not any("pytorch_flash" in name for name in names), sorted(names)
    want, grads = _math_reference(q, k, v, dout, **options)
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    assert rel_error(f64(out), f64(want)) <= TOLERANCE[name]
    for got, expected in zip((q.grad, k.grad, v.grad), grads):
        assert rel_error(f64(got), f64(expected)) <= TOLERANCES["grad_plain"][name]


@pytest.mark.gpu
@pytest.mark.parametrize("sq, sk", [(100, 300), (300, 100)])
def test_causal_non_square_keeps_sdpa_semantics(activated, sq, sk):
    """Top-left is_causal (SDPA) with Sq != Sk, and causal_lower_right, both against the math
    backend's explicit masks: each convention keeps its meaning with xattn active."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    q, k, v = _inputs((1, 4, sq, 64), (1, 4, sk, 64), torch.float16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]):
        top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril()
    want = _math_reference(q, k, v, attn_mask=mask)[0]
    rows = mask.any(-1)  # rows with no key: the math backend gives NaN, others 0
    assert rel_error(f64(top_left[:, :, rows]), f64(want[:, :, rows])) <= TOLERANCE["float16"]

    lower_right, names = _kernel_names(
        lambda: _sdpa_flash(q, k, v, attn_mask=causal_lower_right(sq, sk)))
    assert _ran_xattn(names), sorted(names)
    mask = torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(diagonal=sk - sq)
    rows = mask.any(-1)
    want = _math_reference(q, k, v, attn_mask=mask)[0]
    assert rel_error(f64(lower_right[:, :, rows]), f64(want[:, :, rows])) <= TOLERANCE["float16"]
    assert (lower_right[:, :, ~rows] == 0).all()


@pytest.mark.gpu
def test_aten_outputs_have_torchs_shapes_dtypes_and_strides(activated):
    """The same aten calls through torch's own kernel (restored) and through xattn."""
    aten = torch.ops.aten
    q, k, v = _inputs((2, 8, 200, 64), (2, 2, 300, 64), torch.bfloat16, storage="bshd")
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) contiguous
    lengths = torch.tensor([0, 50, 200, 400], dtype=torch.int32, device="cuda")
    packed = [torch.randn(400, h, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2)]
    calls = {
        "sdpa": lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True),
        "flash": lambda: aten._flash_attention_forward(qs, ks, vs, None, None, 200, 300, 0.0,
                                                       True, False),
        "flash_window": lambda: aten._flash_attention_forward(
            qs, ks, vs, None, None, 200, 300, 0.0, False, False, window_size_left=32,
            window_size_right=8),
        "varlen": lambda: aten._flash_attention_forward(*packed, lengths, lengths, 200, 200,
                                                        0.0, True, False),
    }
    mine = {}
    for name, call in calls.items():
        mine[name] = call()
    attention_registry.restore_flash_attention_impl()
    try:
        for name, call in calls.items():
            theirs = call()
            for got, want in zip(mine[name], theirs):
                if not isinstance(want, torch.Tensor):
                    assert got == want, name
                    continue
                assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype,
                                                              want.device), name
                if got.numel() > 1:
                    assert got.stride() == want.stride(), name
            out_error = rel_error(f64(mine[name][0]), f64(theirs[0]))
            assert out_error <= TOLERANCE["bfloat16"], (name, out_error)
            lse, want_lse = f64(mine[name][1]), f64(theirs[1])
            finite = np.isfinite(want_lse) & (np.abs(want_lse) < 1e30)
            tolerance = TOLERANCES["lse"]["bfloat16"]
            np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=tolerance,
                                       atol=tolerance)
    finally:
        attention_registry.activate_flash_attention_impl("xattn")


@pytest.mark.gpu
def test_torch_compile_fullgraph_block(activated):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(256, 3 * 256)
            self.proj = torch.nn.Linear(256, 256)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, 4, 64).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(b, s, 256))

    torch.manual_seed(0)
    block = Block().cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            y = compiled(x)
            y.float().square().sum().backward()
        return y

    y, names = _kernel_names(run)
    assert _ran_xattn(names, "flash_fwd") and _ran_xattn(names, "flash_bwd"), sorted(names)
    got_grad = x.grad.clone()
    x.grad = None
    reference_block = Block().cuda().double()
    reference_block.load_state_dict(block.state_dict())
    x64 = x.detach().double().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        want = reference_block(x64)
        want.square().sum().backward()
    assert rel_error(f64(y), f64(want)) <= TOLERANCES["block"]["bfloat16"]
    assert rel_error(f64(got_grad), f64(x64.grad)) <= TOLERANCES["grad_plain"]["bfloat16"]
    torch._dynamo.reset()


@pytest.mark.gpu
def test_dropout_falls_back_to_torchs_kernel(activated):
    q, k, v = _inputs((2, 4, 128, 64), (2, 4, 128, 64), torch.float16, requires_grad=True)
    torch.manual_seed(1)
    out, names = _kernel_names(lambda: _sdpa_flash(q, k, v, dropout_p=0.3))
    assert not _ran_xattn(names) and any("pytorch_flash" in n for n in names), sorted(names)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    no_dropout = _sdpa_flash(q, k, v)
    assert not torch.allclose(out, no_dropout)  # dropout really applied


@pytest.mark.gpu
def test_tiny_transformers_model_generates_the_same_tokens(activated):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = model.to(device="cuda", dtype=torch.float16).eval()
    prompt = torch.randint(3, 128, (2, 40), device="cuda")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def generate():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                  max_new_tokens=12, min_new_tokens=12, do_sample=False)

    with_xattn, names = _kernel_names(generate)
    assert _ran_xattn(names), sorted(names)
    attention_registry.restore_flash_attention_impl()
    try:
        without, names = _kernel_names(generate)
        assert not _ran_xattn(names)
    finally:
        attention_registry.activate_flash_attention_impl("xattn")
    assert torch.equal(with_xattn, without)
