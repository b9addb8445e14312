"""Every bad input raises TypeError or ValueError naming the argument, the expectation and what came."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import xattn

HAS_TORCH = importlib.util.find_spec("torch") is not None


def arrays(q_shape=(2, 4, 8, 16), kv_shape=(2, 2, 8, 16), dtype="float32"):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal(s).astype(dtype) for s in (q_shape, kv_shape, kv_shape))


Q, K, V = arrays()

# (case id, arguments, keyword arguments, exception, words the message must contain)
BAD_INPUTS = [
    ("q rank", (Q[0], K, V), {}, ValueError, ["q:", "4-d", "(4, 8, 16)"]),
    ("k rank", (Q, K[..., None], V), {}, ValueError, ["k:", "4-d", "(2, 2, 8, 16, 1)"]),
    ("v rank", (Q, K, V[0]), {}, ValueError, ["v:", "4-d", "(2, 8, 16)"]),
    ("k batch", (Q, K[:1], V[:1]), {}, ValueError, ["k:", "batch size 2", "got 1"]),
    ("v batch", (Q, K, V[:1]), {}, ValueError, ["v:", "batch size 2", "got 1"]),
    ("k head dim", (Q, K[..., :8], V[..., :8]), {}, ValueError, ["k:", "head dim 16", "got 8"]),
    ("v head dim", (Q, K, V[..., :8]), {}, ValueError, ["v:", "head dim 16", "got 8"]),
    ("v length", (Q, K, V[:, :, :5]), {}, ValueError, ["v:", "sequence length 8", "got 5"]),
    ("v heads", (Q, K, V[:, :1]), {}, ValueError, ["v:", "2 heads", "got 1"]),
    ("gqa ratio", arrays((2, 4, 8, 16), (2, 3, 8, 16)), {}, ValueError,
     ["q:", "divisible by k's 3 heads", "got 4"]),
    ("no kv heads", arrays((2, 4, 8, 16), (2, 0, 8, 16)), {}, ValueError,
     ["k:", "at least 1 head", "got 0"]),
    ("head dim too big", arrays((1, 1, 4, 257), (1, 1, 4, 257)), {}, ValueError,
     ["q:", "1..256", "got 257"]),
    ("head dim zero", arrays((1, 1, 4, 0), (1, 1, 4, 0)), {}, ValueError,
     ["q:", "1..256", "got 0"]),
    ("mixed dtypes", (Q, K.astype("float16"), V), {}, TypeError,
     ["k:", "dtype float32", "got float16"]),
    ("v dtype", (Q, K, V.astype("float64")), {}, TypeError, ["v:", "dtype float32", "got float64"]),
    ("unsupported dtype", arrays(dtype="int32"), {}, TypeError,
     ["q:", "float16, bfloat16, float32", "got int32"]),
    ("complex dtype", arrays(dtype="complex64"), {}, TypeError, ["q:", "got complex64"]),
    ("not an array", (Q.tolist(), K, V), {}, TypeError, ["q:", "expected an array", "list"]),
    ("k not an array", (Q, "keys", V), {}, TypeError, ["k:", "expected an array", "str"]),
    ("unknown layout", (Q, K, V), {"layout": "bsdh"}, ValueError,
     ["layout:", "'bhsd' or 'bshd'", "'bsdh'"]),
    ("layout wrong type", (Q, K, V), {"layout": None}, ValueError, ["layout:", "None"]),
    ("unknown backend", (Q, K, V), {"backend": "metal"}, ValueError,
     ["backend:", "'reference', 'cuda', 'hip'", "'metal'"]),
    ("backend wrong type", (Q, K, V), {"backend": 3}, TypeError, ["backend:", "str or None", "int"]),
    ("backend cannot serve host arrays", (Q, K, V), {"backend": "cuda"}, ValueError,
     ["backend:", "cpu", "'reference'", "got 'cuda'"]),
    ("scale nan", (Q, K, V), {"scale": float("nan")}, ValueError,
     ["scale:", "finite positive", "nan"]),
    ("scale inf", (Q, K, V), {"scale": float("inf")}, ValueError, ["scale:", "finite positive", "inf"]),
    ("scale zero", (Q, K, V), {"scale": 0.0}, ValueError, ["scale:", "finite positive", "0.0"]),
    ("scale negative", (Q, K, V), {"scale": -1.0}, ValueError, ["scale:", "positive", "-1.0"]),
    ("scale string", (Q, K, V), {"scale": "0.1"}, TypeError, ["scale:", "number", "str"]),
    ("scale bool", (Q, K, V), {"scale": True}, TypeError, ["scale:", "number", "bool"]),
    ("causal not bool", (Q, K, V), {"causal": "yes"}, TypeError, ["causal:", "bool", "'yes'"]),
    ("return_lse not bool", (Q, K, V), {"return_lse": 1}, TypeError, ["return_lse:", "bool", "1"]),
]
if HAS_TORCH:
    import torch
    BAD_INPUTS += [
        ("mixed libraries", (Q, torch.from_numpy(K), V), {}, TypeError,
         ["k:", "a NumPy array (as q)", "a torch tensor"]),
        ("torch mixed dtypes", (torch.from_numpy(Q), torch.from_numpy(K).half(),
                                torch.from_numpy(V)), {}, TypeError,
         ["k:", "dtype float32", "got float16"]),
        ("torch unsupported dtype", tuple(torch.ones(2, 2, 4, 8, dtype=torch.int64)
                                          for _ in range(3)), {}, TypeError, ["q:", "got int64"]),
        ("torch device", (torch.from_numpy(Q), torch.from_numpy(K).to("meta"),
                          torch.from_numpy(V)), {}, ValueError, ["k:", "meta"]),
    ]


@pytest.mark.parametrize("args, kwargs, error, words",
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_clear_message(args, kwargs, error, words):
    with pytest.raises(error) as caught:
        xattn.attention(*args, **kwargs)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {str(caught.value)!r}"


def test_environment_variable_is_checked_and_named(monkeypatch):
    monkeypatch.setenv("XATTN_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"XATTN_BACKEND: expected one of .* got 'tpu'"):
        xattn.attention(Q, K, V)
    monkeypatch.setenv("XATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"XATTN_BACKEND: .*arrays on cpu.* got 'cuda'"):
        xattn.attention(Q, K, V)


def test_an_explicit_backend_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("XATTN_BACKEND", "cuda")
    out = xattn.attention(Q, K, V, backend="reference")
    assert out.shape == Q.shape


@pytest.mark.parametrize("value", ["reference", "auto", ""])
def test_environment_variable_may_name_a_backend_that_fits(monkeypatch, value):
    monkeypatch.setenv("XATTN_BACKEND", value)
    assert xattn.attention(Q, K, V).shape == Q.shape


def test_exact_attention_validates_the_same_way():
    with pytest.raises(ValueError, match="k: expected batch size 2"):
        xattn.exact_attention(Q, K[:1], V[:1])
    with pytest.raises(ValueError, match="layout:"):
        xattn.exact_attention(Q, K, V, layout="sbhd")


def test_kernel_source_rejects_bad_names():
    with pytest.raises(ValueError, match="vendor: expected 'cuda', 'hip' or 'common', got 'metal'"):
        xattn.kernel_source("metal", "flash_fwd.cu")
    with pytest.raises(ValueError, match="name:"):
        xattn.kernel_source("cuda", "../pyproject.toml")
    with pytest.raises(FileNotFoundError, match="name: no kernel source 'nothing.cu'"):
        xattn.kernel_source("cuda", "nothing.cu")
