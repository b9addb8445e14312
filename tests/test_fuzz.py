"""Bad-input fuzzing of every public function: each call returns what the oracle returns, or raises
TypeError/ValueError whose message starts with the argument it blames; nothing else.

Hypothesis draws calls of xattn.attention and xattn.exact_attention from a space that is mostly
valid and then corrupted: ranks 0 to 6, shapes that disagree, zero sizes, head dims 0 and 257,
GQA ratios that do not divide, dtypes the backend does not take (int, bool, complex, object,
float64 on a GPU), strided, sliced, transposed, reversed and broadcast views, a tensor of another
library, dtype or device, objects that are no array (lists, None, strings, sparse and negative-bit
torch tensors, masked arrays, DLPack producers with and without .shape/.dtype), inputs requiring
grad, and flags of every type (scale nan, inf, 0, negative, bool, str, 10**400, 1e300;
layouts and backends right, wrong and of the wrong type; unknown keywords).

Whether a call is valid is decided here, from the documented rules (`expect`), not by asking
xattn; a valid call must then match the float64 oracle (xattn.reference.exact_attention_bhsd on
the values the call saw) within the per-dtype tolerance. The `backend` fixture runs it on the
reference backend (CI) and, gpu-marked, on the cuda backend. XATTN_FUZZ_EXAMPLES sets the number
of examples (default 150); XATTN_FUZZ_TALLY=<file.json> writes what happened, for
ci/results/reliability.md.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xattn
from conftest import HAS_TORCH, LSE_TOLERANCE, TOLERANCE
from problems import present
from xattn import reference

EXAMPLES = int(os.environ.get("XATTN_FUZZ_EXAMPLES", "150"))
ARGUMENTS = ("q", "k", "v", "causal", "scale", "layout", "return_lse", "backend", "deterministic",
             "window", "softcap", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
NAMES_AN_ARGUMENT = re.compile(rf"^({'|'.join(ARGUMENTS)}): \S")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
SUPPORTED = {"reference": FLOAT_DTYPES, "cuda": ("float16", "bfloat16", "float32")}
MAX_SCALE = float(np.finfo(np.float32).max) / math.log2(math.e)
TALLY: collections.Counter = collections.Counter()


# ------------------------------------------------------------------------------ test inputs

class Producer:
    """A minimal DLPack producer over a NumPy array (another library's host array)."""

    def __init__(self, array, with_attributes=True):
        self.array = array
        if with_attributes:
            self.shape, self.dtype = array.shape, array.dtype

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


@dataclass
class Tensor:
    """How one of q, k, v is presented; `value` is the object passed, None until built."""
    shape: tuple            # logical shape, in the call's layout
    library: str            # numpy, torch, cupy, producer; or an "object:<kind>" that is no array
    dtype: str
    device: str             # "cpu" or "cuda"
    memory: str = "contiguous"
    requires_grad: bool = False
    value: object = field(default=None, repr=False)
    values64: np.ndarray | None = field(default=None, repr=False)  # what the callee sees, float64


def float64_of(x) -> np.ndarray:
    if isinstance(x, Producer):
        x = x.array
    if isinstance(x, np.ndarray):
        return np.asarray(x, dtype=np.float64)
    if type(x).__module__.startswith("torch"):
        return x.detach().resolve_neg().double().cpu().numpy()
    return x.astype("float64").get()  # cupy


def build(tensor: Tensor, backend, rng):
    """The object for `tensor`, with float64 NumPy data standing behind it."""
    shape = tensor.shape
    kind = tensor.library
    if kind.startswith("object:"):
        small = len(shape) < 5 and math.prod(shape) <= 4096
        return {"object:list": np.zeros(shape).tolist() if small else [[0.0]],
                "object:none": None, "object:str": "q", "object:int": 3,
                "object:dict": {"shape": shape}, "object:scalar": np.float32(1.0),
                }[kind]
    base = rng.standard_normal(shape)
    if tensor.dtype in ("int32", "int64"):
        base = np.round(base * 2)
    elif tensor.dtype == "bool":
        base = base > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN padding cast to int
        if kind == "masked":
            host_dtype = "float32" if tensor.dtype == "bfloat16" else tensor.dtype
            return np.ma.masked_array(base.astype(host_dtype), mask=base > 1)
        if kind == "sparse":
            import torch
            return torch.from_numpy(base).to(getattr(torch, tensor.dtype)).to_sparse()
        library = "numpy" if kind in ("producer", "producer_bare") else kind
        device_backend = backend if tensor.device != "cpu" else _HOST
        memory = "contiguous" if tensor.memory == "negative_bit" else tensor.memory
        if len(shape) != 4 or memory in ("reversed", "broadcast"):
            value = _special_memory(device_backend, base, library, tensor.dtype, memory)
        else:
            value = present(device_backend, base, "bhsd", library, tensor.dtype, memory)
        if kind == "producer":
            value = Producer(value)
        elif kind == "producer_bare":
            value = Producer(value, with_attributes=False)
        elif kind == "torch" and tensor.memory == "negative_bit":
            value = (-value)._neg_view()  # reads as value, memory holds -value
        if tensor.requires_grad and kind == "torch":
            value = value.detach().requires_grad_(True)
    return value


def _special_memory(backend, base, library, dtype, memory):
    if len(base.shape) != 4 or memory not in ("reversed", "broadcast"):
        return backend.make(np.ascontiguousarray(base), library, dtype)
    if memory == "broadcast":  # heads of stride 0, as from expand()
        one = backend.make(np.ascontiguousarray(base[:, :1]), library, dtype)
        return (np.broadcast_to(one, base.shape) if library == "numpy"
                else one.expand(*base.shape) if library == "torch"
                else __import__("cupy").broadcast_to(one, base.shape))
    # reversed: negative strides along S and D (NumPy and CuPy only)
    stored = backend.make(np.ascontiguousarray(base[:, :, ::-1, ::-1]), library, dtype)
    return stored if library == "torch" else stored[:, :, ::-1, ::-1]


@dataclass(frozen=True)
class _Host:
    """Backend.make for host memory (a tensor moved off the backend's device)."""
    device: str = "cpu"

    def make(self, base, library, dtype):
        from conftest import Backend
        return Backend("reference", ()).make(base, library, dtype)


_HOST = _Host()


# ------------------------------------------------------------------------------- strategies

SIZES = st.sampled_from((0, 1, 2, 5, 17, 64, 65, 130))
HEAD_DIMS = st.sampled_from((1, 3, 8, 16, 33, 64, 96, 128, 200, 256))
BAD_BOOLS = (None, 0, 1, "yes", "False", [], 1.0)
BOOLS = st.sampled_from((True, False) * 8 + (np.True_, np.False_) + BAD_BOOLS)
SCALES = st.one_of(
    st.none(), st.floats(0.01, 4.0), st.none(), st.floats(0.01, 4.0), st.sampled_from((1, 2, np.float32(0.25), np.float16(0.5),
                                                      np.float64(0.125), Fraction(1, 3), 1e-30)),
    st.sampled_from((math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1, True, False, "0.5",
                     b"1", 10**400, 1e300, MAX_SCALE * 1.01, [0.5], np.array([0.5, 1.0]),
                     complex(0.5, 0))))
WINDOWS = st.sampled_from((None,) * 6 + ((0, 0), (3, -1), (-1, 2), (5, 0), (10**12, 5), [2, 1],
                           (-2, 0), (0, -3), (1,), (1, 2, 3), (1.5, 2), "3", 3, (True, 1),
                           (np.int64(4), 0)))
SOFTCAPS = st.sampled_from((None,) * 6 + (0, 0.0, 5.0, 30, np.float32(2.5), -1.0, math.nan,
                                          math.inf, "2", True, 1e-30))
LAYOUTS = st.sampled_from(("bhsd", "bshd") * 12 + (np.str_("bshd"), "BHSD", "bsdh", "",
                           None, 0, b"bhsd", ["bhsd"], np.array(["bhsd", "bshd"])))


def _kinds(backend):
    """(library, dtype, device) choices for the call's arrays on this backend."""
    device = backend.device
    if backend.name == "reference":
        kinds = [("numpy", d, "cpu") for d in ("float16", "float32", "float64", "int32", "bool",
                                               "complex64", "int64")]
        kinds += [("producer", "float32", "cpu"), ("producer_bare", "float32", "cpu")]
        if HAS_TORCH:
            kinds += [("torch", d, "cpu") for d in FLOAT_DTYPES + ("int32", "bool")]
        return kinds
    kinds = [("cupy", d, device) for d in ("float16", "float32", "float64", "int32")]
    if HAS_TORCH:
        kinds += [("torch", d, device) for d in FLOAT_DTYPES + ("int32", "bool")]
    return kinds


def _odd_objects(backend):
    odd = ["object:list", "object:none", "object:str", "object:int", "object:dict",
           "object:scalar", "masked"]
    if HAS_TORCH and backend.name == "reference":
        odd.append("sparse")
    return odd


@st.composite
def calls(draw, backend):
    function = draw(st.sampled_from(("attention", "attention", "attention", "exact_attention")))
    batch, kv_heads, group = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(
        st.sampled_from((1, 2, 3)))
    sq, sk, head_dim = draw(SIZES), draw(SIZES), draw(HEAD_DIMS)
    bhsd = [(batch, kv_heads * group, sq, head_dim), (batch, kv_heads, sk, head_dim),
            (batch, kv_heads, sk, head_dim)]
    # Corrupt shapes now and then: another rank, another size of one axis, any small shape.
    for i in range(3):
        corruption = draw(st.sampled_from(["none"] * 40 + ["rank", "axis", "random"]))
        if corruption == "rank":
            rank = draw(st.sampled_from((0, 1, 2, 3, 5, 6)))
            bhsd[i] = (bhsd[i] + (2, 2))[:rank]
        elif corruption == "axis":
            axis = draw(st.integers(0, 3))
            size = draw(st.sampled_from((0, 1, 3, 7, 257)))
            bhsd[i] = bhsd[i][:axis] + (size,) + bhsd[i][axis + 1:]
        elif corruption == "random":
            bhsd[i] = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=6)))
    layout = draw(LAYOUTS)
    as_bshd = isinstance(layout, str) and layout == "bshd"
    shapes = [s[:1] + (s[2], s[1]) + s[3:] if as_bshd and len(s) == 4 else s for s in bhsd]

    kinds = _kinds(backend)
    floats = [kind for kind in kinds if kind[1] in FLOAT_DTYPES and kind[0] != "producer_bare"]
    library, dtype, device = draw(st.sampled_from(floats * 3 + kinds))
    tensors = []
    for shape in shapes:
        t = Tensor(shape, library, dtype, device)
        change = draw(st.sampled_from(["none"] * 30 + ["dtype", "library", "device", "odd"]))
        if change == "dtype":
            t.dtype = draw(st.sampled_from(("float16", "float32", "float64", "int32")))
        elif change == "library" and library != "producer_bare":
            t.library, t.dtype, t.device = draw(st.sampled_from(_kinds(backend)))
        elif change == "device" and backend.name != "reference" and HAS_TORCH:
            t.library, t.device = "torch", "cpu"
        elif change == "odd":
            t.library = draw(st.sampled_from(_odd_objects(backend)))
        memories = ["contiguous", "sliced", "transposed", "strided_last_dim", "broadcast"]
        if t.library in ("numpy", "cupy", "producer"):
            memories.append("reversed")
        if t.library == "torch" and t.dtype in FLOAT_DTYPES:
            memories.append("negative_bit")
        t.memory = draw(st.sampled_from(memories))
        t.requires_grad = (function == "attention" and t.library == "torch"
                           and t.dtype in FLOAT_DTYPES and draw(st.booleans()))
        tensors.append(t)

    kwargs = {}
    flags = ["causal", "scale", "layout", "window", "softcap"]
    if function == "attention":
        flags += ["return_lse", "backend", "deterministic"]
    for flag in flags:
        if flag == "layout":
            kwargs["layout"] = layout
        elif draw(st.booleans()):
            kwargs[flag] = draw({"scale": SCALES, "window": WINDOWS, "softcap": SOFTCAPS,
                                 "backend": st.sampled_from((None, "auto", "reference", "cuda",
                                                             "hip", "metal", "", 3, b"cuda")),
                                 }.get(flag, BOOLS))
    if draw(st.sampled_from([False] * 40 + [True])):
        kwargs["dropout_p"] = 0.1
    seed = draw(st.integers(0, 2**32 - 1))
    return function, tensors, kwargs, seed


# ---------------------------------------------------------------------------- expectations

def expect(function, tensors, kwargs, backend_name) -> str | None:
    """None if the call is valid by the documented rules, else why not (for messages)."""
    if "dropout_p" in kwargs:
        return "unknown keyword"
    for t in tensors:
        if t.library.startswith("object:") or t.library in ("masked", "sparse"):
            return f"{t.library} is no array xattn takes"

    def library(t):  # a bare DLPack producer is a DLPack producer like any other
        return "producer" if t.library == "producer_bare" else t.library

    first = tensors[0]
    if any(library(t) != library(first) or t.device != first.device for t in tensors):
        return "libraries or devices differ"
    if any(t.dtype != first.dtype for t in tensors):
        return "dtypes differ"
    layout = kwargs.get("layout", "bhsd")
    if not (isinstance(layout, str) and layout in ("bhsd", "bshd")):
        return "layout"
    for flag in ("causal", "return_lse", "deterministic"):
        value = kwargs.get(flag, False)
        if not isinstance(value, (bool, np.bool_)):
            return flag
    window = kwargs.get("window")
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(
                isinstance(w, (int, np.integer)) and not isinstance(w, (bool, np.bool_))
                for w in window)):
            return "window type"
        if min(window) < -1 or (bool(kwargs.get("causal", False)) and window[1] > 0):
            return "window value"
    softcap = kwargs.get("softcap")
    if softcap is not None:
        if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, (int, float, np.floating)):
            return "softcap type"
        if not (softcap == 0 or 0 < softcap < math.inf):  # False for nan
            return "softcap value"
    scale = kwargs.get("scale")
    if scale is not None:
        if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, Fraction,
                                                                        np.floating)):
            return "scale type"
        if not (0 < scale <= MAX_SCALE):  # False for nan
            return "scale value"
    shapes = [t.shape for t in tensors]
    if any(len(s) != 4 for s in shapes):
        return "rank"
    if layout == "bshd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    (b, hq, _, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = shapes
    if not (b == bk == bv and d == dk == dv and 1 <= d <= 256 and hk == hv and sk == sv
            and hk >= 1 and hq % hk == 0):
        return "shapes"
    natural = "reference" if first.device == "cpu" else "cuda"
    if function == "attention":
        if kwargs.get("backend") not in (None, "auto", natural):
            return "backend"
        supported = SUPPORTED[natural]
    else:
        supported = FLOAT_DTYPES
    if first.dtype not in supported:
        return "dtype"
    return None


def check_result(function, tensors, kwargs, result):
    layout = kwargs.get("layout", "bhsd")
    q, k, v = (t.values64 for t in tensors)
    if layout == "bshd":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    scale = kwargs.get("scale")
    scale = 1 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    causal = bool(kwargs.get("causal"))
    left, right = kwargs.get("window") or (-1, -1)
    want_out, want_lse = reference.exact_attention_bhsd(
        q, k, v, causal=causal, scale=scale, window=(int(left), 0 if causal else int(right)),
        softcap=float(kwargs.get("softcap") or 0.0))
    q_value, dtype = tensors[0].value, tensors[0].dtype
    if function == "exact_attention":
        out, lse = result
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
        tolerance, lse_tolerance = 1e-12, 1e-12
    else:
        out, lse = result if kwargs.get("return_lse") else (result, None)
        expected_type = np.ndarray if isinstance(q_value, Producer) else type(q_value)
        assert type(out) is expected_type, type(out)
        assert str(out.dtype).removeprefix("torch.") == dtype
        if hasattr(q_value, "device") and not isinstance(q_value, np.ndarray):
            assert out.device == q_value.device
        tolerance, lse_tolerance = TOLERANCE[dtype], LSE_TOLERANCE[dtype]
    assert tuple(out.shape) == tuple(tensors[0].shape)
    got = float64_of(out)
    if layout == "bshd":
        got = got.transpose(0, 2, 1, 3)
    assert np.isfinite(got).all(), "non-finite output from finite inputs"
    error = np.linalg.norm(got - want_out)
    assert error <= tolerance * max(np.linalg.norm(want_out), 1e-30), f"relative error {error}"
    if lse is not None:
        assert "float32" in str(lse.dtype) or function == "exact_attention"
        got_lse = float64_of(lse)
        assert got_lse.shape == want_lse.shape
        empty = np.isneginf(want_lse)
        np.testing.assert_array_equal(np.isneginf(got_lse), empty)
        np.testing.assert_allclose(got_lse[~empty], want_lse[~empty], rtol=lse_tolerance,
                                   atol=lse_tolerance)


def check_rejection(error: Exception, kwargs):
    message = str(error)
    assert message, f"{type(error).__name__} with an empty message"
    if "dropout_p" in kwargs and "'dropout_p'" in message:
        return "unknown keyword"  # Python's own signature check names it
    match = NAMES_AN_ARGUMENT.match(message)
    assert match, f"message does not start with the argument it blames: {message!r}"
    return match.group(1)


# ---------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module", autouse=True)
def tally():
    """No XATTN_BACKEND during the fuzz (it has tests of its own); TALLY written at the end."""
    saved = os.environ.pop("XATTN_BACKEND", None)
    yield
    if saved is not None:
        os.environ["XATTN_BACKEND"] = saved
    path = os.environ.get("XATTN_FUZZ_TALLY")
    if path and TALLY:
        with open(path, "w") as file:
            json.dump(dict(sorted(TALLY.items())), file, indent=1)


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_every_call_is_right_or_rejected_by_name(backend, data):
    function, tensors, kwargs, seed = data.draw(calls(backend))
    rng = np.random.default_rng(seed)
    for t in tensors:
        t.value = build(t, backend, rng)
        if t.value is not None and not t.library.startswith("object:") and t.library not in (
                "sparse", "masked") and t.dtype in FLOAT_DTYPES:
            t.values64 = float64_of(t.value)
    why_invalid = expect(function, tensors, kwargs, backend.name)
    call = getattr(xattn, function)
    case = f"{function}({', '.join(map(repr, tensors))}, **{kwargs!r})"
    TALLY[f"{backend.name} cases"] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # overflow in a cast is a failure
            result = call(*(t.value for t in tensors), **kwargs)
    except (TypeError, ValueError) as error:
        blamed = check_rejection(error, kwargs)
        assert why_invalid is not None, f"valid call rejected: {case}: {error!r}"
        TALLY[f"{backend.name} rejected: {type(error).__name__} naming {blamed}"] += 1
        return
    assert why_invalid is None, f"invalid call ({why_invalid}) accepted: {case}"
    check_result(function, tensors, kwargs, result)
    TALLY[f"{backend.name} returned and matched the oracle"] += 1


# Each bug the fuzzer found, kept as a plain regression case.
Q = np.random.default_rng(0).standard_normal((1, 2, 4, 8)).astype(np.float32)
REGRESSIONS = [
    ("scale 10**400 (was OverflowError)", (Q, Q, Q), {"scale": 10**400}, ValueError, "scale:"),
    ("scale past float32 after log2(e) (was inf in the kernel)", (Q, Q, Q), {"scale": 1e300},
     ValueError, "scale:"),
    ("layout as an array (was an unnamed ValueError)", (Q, Q, Q),
     {"layout": np.array(["bhsd", "bshd"])}, ValueError, "layout:"),
    ("masked array (the mask was ignored)", (np.ma.masked_array(Q, Q > 0), Q, Q), {},
     TypeError, "q:"),
]


@pytest.mark.parametrize("args, kwargs, error, prefix", [r[1:] for r in REGRESSIONS],
                         ids=[r[0] for r in REGRESSIONS])
def test_found_by_the_fuzzer(args, kwargs, error, prefix):
    with pytest.raises(error) as caught:
        xattn.attention(*args, **kwargs)
    assert str(caught.value).startswith(prefix)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_found_by_the_fuzzer_torch():
    import torch
    dense = torch.from_numpy(Q)
    with pytest.raises(TypeError, match=r"^q: expected a dense \(strided\) tensor"):
        xattn.attention(dense.to_sparse(), dense, dense)
    # A negative-bit view of -Q reads as Q while its memory holds -Q (was a RuntimeError from
    # .numpy(); on a GPU the kernel would have read the memory, -Q).
    negative = (-dense)._neg_view()
    assert negative.is_neg() and torch.equal(negative, dense)
    out = xattn.attention(negative, dense, dense)
    want, _ = xattn.exact_attention(Q, Q, Q)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, prefix", [
    (lambda: xattn.kernel_source("cuda", 5), "name:"),
    (lambda: xattn.kernel_source(["cuda"], "flash_fwd.cu"), "vendor:"),
    (lambda: xattn.kernel_files(["cuda"]), "vendor:"),
    (lambda: xattn.kernel_files(None), "vendor:"),
])
def test_kernel_source_functions_name_the_argument(call, prefix):
    with pytest.raises((TypeError, ValueError)) as caught:
        call()
    assert str(caught.value).startswith(prefix)


def test_exports_are_all_fuzzed_or_checked():
    """A new public function must be added to the fuzzer (or here, with a reason)."""
    covered = {"attention", "exact_attention", "kernel_source", "kernel_files",
               "attention_varlen",  # test_fuzz_varlen_cumulative_lengths below
               "attention_with_kvcache",  # tests/test_kvcache.py::test_fuzz_arguments
               "available_backends",  # takes no arguments
               "BackendStatus",  # a NamedTuple, not a function
               "__version__"}
    assert set(xattn.__all__) <= covered, set(xattn.__all__) - covered
    assert all(status.reason for status in xattn.available_backends().values())


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_fuzz_varlen_cumulative_lengths(data):
    """attention_varlen with drawn cumulative lengths and maxima, valid or not: each call either
    matches the oracle sequence by sequence or is rejected by a message naming the argument."""
    count = data.draw(st.integers(0, 4))
    lengths = [data.draw(st.integers(0, 9)) for _ in range(count)]
    cu = [0, *np.cumsum(lengths).tolist()]
    total = cu[-1]
    corruption = data.draw(st.sampled_from(["none"] * 6 + ["order", "start", "end", "dtype",
                                                          "rank", "max", "list", "length"]))
    cu_q = np.array(cu, np.int32)
    max_q = max(lengths, default=0)
    if corruption == "order" and count >= 2 and lengths[0] > 0:
        cu_q[1], cu_q[2] = cu_q[2] + 1, cu_q[1]
    elif corruption == "start":
        cu_q = cu_q + 1
    elif corruption == "end":
        cu_q = np.append(cu_q, total + 3).astype(np.int32)
    elif corruption == "dtype":
        cu_q = cu_q.astype(np.int64)
    elif corruption == "rank":
        cu_q = cu_q[None]
    elif corruption == "max" and max_q > 0:
        max_q -= 1
    elif corruption == "list":
        cu_q = cu
    elif corruption == "length":
        cu_q = cu_q[:-1] if count else cu_q
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    q, k, v = (rng.standard_normal((total, h, 8)) for h in (2, 1, 1))
    cu_k = np.array(cu, np.int32)
    try:
        out = xattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_q,
                                     causal=data.draw(st.booleans()))
    except (TypeError, ValueError) as error:
        match = NAMES_AN_ARGUMENT.match(str(error))
        assert match, f"message does not name the argument: {error}"
        assert corruption != "none", f"valid call rejected: {error}"
        return
    changed = not np.array_equal(np.asarray(cu_q), np.array(cu, np.int32)) or \
        max_q != max(lengths, default=0) or np.asarray(cu_q).dtype != np.int32
    assert not changed, f"invalid call accepted ({corruption}): {cu_q!r}, max {max_q}"
    assert out.shape == q.shape and np.isfinite(out).all()
