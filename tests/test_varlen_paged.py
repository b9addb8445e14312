"""attention_varlen with paged keys and values (block_table=, seqused_k=) against the float64 oracle,
on every backend (the `backend` fixture).

The oracle attends, sequence by sequence, over exactly the keys the table says the sequence has:
its first L_b page rows in table order, L_b from seqused_k (when given) or cu_seqlens_k. Every
page no sequence reads, every row of a page past its sequence's keys and every table column past
them (which point at such pages) hold NaN: a kernel that reads one turns its output NaN. Tables are
shuffled, may share a page between two sequences, and are wider than needed.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xattn
from conftest import to_float64
from test_properties import assert_matches
from xattn import reference

HAS_TORCH = importlib.util.find_spec("torch") is not None
PAGE_SIZES = (16, 32, 48, 64, 128, 256)
HEAD_DIMS = (1, 7, 32, 64, 80, 128, 129, 256)
QUERY_LENGTHS = (0, 1, 1, 2, 5, 17, 64)     # decode steps (1) beside chunks of prefill
KEY_LENGTHS = (0, 1, 15, 16, 17, 63, 200, 300)
GQA = (1, 3, 8)
# Each new (dtype, row, modifiers, vec) variant compiles first on a GPU (about a second).
EXAMPLES = {"reference": 40, "cuda": 40, "hip": 30, "hip-on-cuda": 20, "hip-on-cuda-wave64": 10}


# ----------------------------------------------------------------------------- drawing cases

@st.composite
def cases(draw, backend):
    batch = draw(st.integers(1, 4))
    heads_k = draw(st.integers(1, 2))
    window = draw(st.sampled_from((None, None, (0, 0), (3, -1), (-1, 2), (17, 1), (1000, 1000))))
    causal = draw(st.booleans())
    if causal and window is not None and window[1] > 0:
        window = (window[0], 0)  # causal hides every key right of the diagonal: right is 0
    softcap = draw(st.sampled_from((None, None, 1.5, 30.0)))
    return dict(
        batch=batch, heads_k=heads_k, heads_q=heads_k * draw(st.sampled_from(GQA)),
        lengths_q=[draw(st.sampled_from(QUERY_LENGTHS)) for _ in range(batch)],
        lengths_k=[draw(st.sampled_from(KEY_LENGTHS) | st.integers(0, 300)) for _ in range(batch)],
        page_size=draw(st.sampled_from(PAGE_SIZES)), spare_columns=draw(st.integers(0, 2)),
        share_pages=draw(st.booleans()), lengths_from=draw(st.sampled_from(
            ("cu_seqlens_k", "seqused_k", "both"))),
        head_dim=draw(st.sampled_from(HEAD_DIMS)), causal=causal, window=window, softcap=softcap,
        alibi=softcap is None and draw(st.sampled_from((False, False, True))),
        sinks=draw(st.sampled_from((None, None, "small", "large"))),
        scale=draw(st.sampled_from((None, 0.05, 2.0))), spread=draw(st.sampled_from((1.0, 4.0))),
        library_dtype=draw(st.sampled_from(backend.kinds)), seed=draw(st.integers(0, 2**32 - 1)))


def paginate(c, rng):
    """Per-sequence keys and values (float64, (L_b, Hk, D)), the pages (P, page_size, Hk, D) holding
    them and the int32 table (B, max_pages): page ids shuffled, two pages no sequence uses, spare
    table columns pointing anywhere, and NaN everywhere no sequence's keys are. With share_pages,
    sequence 1's first page is sequence 0's (its first page_size keys then equal sequence 0's)."""
    b, hk, d, size = c["batch"], c["heads_k"], c["head_dim"], c["page_size"]
    lengths = c["lengths_k"]
    needed = [-(-n // size) for n in lengths]
    width = max(needed) + c["spare_columns"]
    count = sum(needed) + 2
    keys = [[rng.standard_normal((n, hk, d)) * s for n in lengths] for s in (c["spread"], 1.0)]
    share = c["share_pages"] and b > 1 and min(lengths[0], lengths[1]) >= size
    if share:
        for kv in keys:
            kv[1][:size] = kv[0][:size]
    ids = rng.permutation(count).astype(np.int32)
    table = rng.integers(0, count, size=(b, width)).astype(np.int32)  # spare columns: anything
    pages = [np.full((count, size, hk, d), np.nan) for _ in keys]
    used = 0
    for i, n in enumerate(lengths):
        for j in range(needed[i]):
            if share and i == 1 and j == 0:
                table[i, j] = table[0, 0]
                continue
            table[i, j] = ids[used]
            used += 1
            rows = slice(j * size, min(n, (j + 1) * size))
            for page, kv in zip(pages, keys):
                page[table[i, j], :rows.stop - rows.start] = kv[i][rows]
    return keys, pages, table


def make_inputs(backend, c):
    """The call's arguments for the backend, and float64 values of what it was given."""
    rng = np.random.default_rng(c["seed"])
    library, dtype = c["library_dtype"]
    total_q = sum(c["lengths_q"])
    q = c["spread"] * rng.standard_normal((total_q, c["heads_q"], c["head_dim"]))
    keys, pages, table = paginate(c, rng)
    cu_q = np.concatenate([[0], np.cumsum(c["lengths_q"])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(c["lengths_k"])]).astype(np.int32)
    args = dict(q=backend.make(q, library, dtype), k=backend.make(pages[0], library, dtype),
                v=backend.make(pages[1], library, dtype),
                cu_seqlens_q=ints(backend, library, cu_q), block_table=ints(backend, library, table))
    args["cu_seqlens_k"] = None if c["lengths_from"] == "seqused_k" else ints(backend, library, cu_k)
    if c["lengths_from"] != "cu_seqlens_k":
        args["seqused_k"] = ints(backend, library, np.asarray(c["lengths_k"], np.int32))
    seen = dict(q=to_float64(args["q"]), k=to_float64(args["k"]), v=to_float64(args["v"]), table=table)
    if c["sinks"]:
        normal = rng.standard_normal(c["heads_q"])
        # "large": +-1e4, a sink that takes all the mass or none
        values = normal if c["sinks"] == "small" else 1e4 * np.sign(normal)
        args["sinks"] = backend.make(values.astype(np.float32).astype(np.float64), library, "float32")
        seen["sinks"] = to_float64(args["sinks"])
    if c["alibi"]:
        slopes = rng.uniform(0.01, 1.0, c["heads_q"]).astype(np.float32).astype(np.float64)
        args["alibi_slopes"] = backend.make(slopes, library, "float32")
        seen["alibi_slopes"] = slopes
    return args, seen


def ints(backend, library, values):
    """An int32 array in the backend's memory."""
    values = np.ascontiguousarray(values, dtype=np.int32)
    if library == "numpy":
        return values
    if library == "torch":
        import torch
        return torch.from_numpy(values).to(backend.device)
    import cupy
    return cupy.asarray(values)


def oracle(c, seen):
    """(out (1, Hq, total_q, D), lse (1, Hq, total_q)) in float64, sequence by sequence over
    exactly its keys (gathered from the pages as the table says), and the float32 score rounding
    to allow for (test_kvcache.oracle explains it)."""
    scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(c["head_dim"])

    def rows(name, i, length):  # (1, Hk, length, D): the table's pages in order, then the rows
        every = seen[name][seen["table"][i]].reshape(-1, c["heads_k"], c["head_dim"])
        return every[:length].transpose(1, 0, 2)[None]

    outs, lses, largest, start = [], [], 0.0, 0
    for i, (sq, sk) in enumerate(zip(c["lengths_q"], c["lengths_k"])):
        q = seen["q"][start:start + sq].transpose(1, 0, 2)[None]
        start += sq
        k, v = rows("k", i, sk), rows("v", i, sk)
        out, lse = reference.exact_attention_bhsd(
            q, k, v, causal=c["causal"], scale=scale, window=c["window"] or (-1, -1),
            softcap=c["softcap"] or 0.0, alibi_slopes=seen.get("alibi_slopes"),
            sinks=seen.get("sinks"))
        outs.append(out)
        lses.append(lse)
        if sk and sq:
            group = c["heads_q"] // c["heads_k"]
            sums = np.abs(q[0]) @ np.abs(np.repeat(k[0], group, axis=0)).swapaxes(-1, -2)
            largest = max(largest, float(sums.max()))
    rounding = 2.0**-24 * scale * largest if c["library_dtype"][1] == "float32" else 0.0
    return np.concatenate(outs, axis=2), np.concatenate(lses, axis=2), rounding


def run_and_check(backend, c):
    args, seen = make_inputs(backend, c)
    want_out, want_lse, rounding = oracle(c, seen)
    max_q = max(c["lengths_q"]) + 1  # a maximum above the longest sequence is allowed
    out, lse = xattn.attention_varlen(
        args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"),
        args.pop("cu_seqlens_k"), max_q, max(c["lengths_k"]), causal=c["causal"],
        scale=c["scale"], window=c["window"], softcap=c["softcap"], return_lse=True, **args)
    total_q = sum(c["lengths_q"])
    assert tuple(out.shape) == (total_q, c["heads_q"], c["head_dim"])
    assert "float32" in str(lse.dtype) and tuple(lse.shape) == (c["heads_q"], total_q)
    assert_matches(to_float64(out).transpose(1, 0, 2)[None], to_float64(lse)[None], want_out,
                   want_lse, c["library_dtype"][1], score_error=rounding)


# ----------------------------------------------------------------------------- properties

def test_matches_oracle(backend):
    @settings(max_examples=EXAMPLES[backend.name])
    @given(c=cases(backend))
    def check(c):
        run_and_check(backend, c)

    check()


def _case(backend, i, **changes):
    c = dict(batch=3, heads_k=2, heads_q=8, lengths_q=[1, 37, 0], lengths_k=[300, 37, 5],
             page_size=16, spare_columns=1, share_pages=True, lengths_from="cu_seqlens_k",
             head_dim=128, causal=True, window=None, softcap=None, alibi=False, sinks=None,
             scale=None, spread=1.0, library_dtype=backend.kinds[i % len(backend.kinds)], seed=i)
    return c | changes


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_every_page_size_and_dtype(backend, page_size):
    """A serving step's shape (a decode, a chunk of prefill whose keys are its own queries, an
    empty query) on every page size, in every (library, dtype) the backend takes."""
    for i in range(len(backend.kinds)):
        run_and_check(backend, _case(backend, i, page_size=page_size))


@pytest.mark.parametrize("lengths_k", [[0, 0, 0], [16, 0, 17], [1, 256, 255]], ids=str)
@pytest.mark.parametrize("lengths_from", ["cu_seqlens_k", "seqused_k", "both"])
def test_empty_sequences_and_page_edges(backend, lengths_k, lengths_from):
    """Sequences with no keys (out 0, lse -inf, or the sink), keys ending exactly at a page's end
    or one row past it, lengths from either argument."""
    for i in range(len(backend.kinds)):
        run_and_check(backend, _case(backend, i, lengths_k=lengths_k, lengths_from=lengths_from,
                                     lengths_q=[2, 1, 3], causal=False, page_size=256 if i % 2 else 16))


# ----------------------------------------------------------------------------- bad tables

def _host_problem(**changes):
    """A valid paged call on NumPy arrays: 2 sequences, 4 pages of 16 rows."""
    rng = np.random.default_rng(0)
    args = dict(q=rng.standard_normal((5, 4, 8)), k=rng.standard_normal((4, 16, 2, 8)),
                v=rng.standard_normal((4, 16, 2, 8)), cu_seqlens_q=np.array([0, 2, 5], np.int32),
                cu_seqlens_k=np.array([0, 20, 31], np.int32), max_seqlen_q=3, max_seqlen_k=20,
                block_table=np.array([[3, 0], [1, 2]], np.int32))
    return args | changes


BAD = [  # (changes, error, words the message must hold)
    (dict(block_table=np.array([[3, 0], [1, 4]], np.int32)), ValueError,
     ["block_table:", "page ids in [0, 4)", "got 4 at [1, 1]"]),
    (dict(block_table=np.array([[3, -1], [1, 2]], np.int32)), ValueError,
     ["block_table:", "got -1 at [0, 1]"]),
    (dict(block_table=np.array([[3, 0], [1, 2]], np.int64)), TypeError,
     ["block_table:", "int32", "got int64"]),
    (dict(block_table=np.array([[3, 0]], np.int32)), ValueError,
     ["block_table:", "(2, max_pages)", "got (1, 2)"]),
    (dict(block_table=np.array([[3], [1]], np.int32)), ValueError,  # 20 keys need 2 pages of 16
     ["block_table:", "at least 2 pages", "cu_seqlens_k (20 keys)", "got 1"]),
    (dict(cu_seqlens_k=None, seqused_k=np.array([20, 33], np.int32)), ValueError,
     ["seqused_k:", "[0, 32]", "got 33 at 1"]),
    (dict(cu_seqlens_k=None, seqused_k=np.array([-1, 3], np.int32)), ValueError,
     ["seqused_k:", "got -1 at 0"]),
    (dict(seqused_k=np.array([20, 3], np.int64)), TypeError, ["seqused_k:", "int32", "got int64"]),
    (dict(seqused_k=np.array([20, 3, 1], np.int32)), ValueError, ["seqused_k:", "shape (2,)"]),
    (dict(seqused_k=np.array([20, 30], np.int32), max_seqlen_k=20), ValueError,
     ["max_seqlen_k:", "at least 30", "seqused_k"]),
    (dict(cu_seqlens_k=np.array([0, 20, 19], np.int32)), ValueError,
     ["cu_seqlens_k:", "non-decreasing"]),
    (dict(block_table=None, seqused_k=np.array([1, 1], np.int32)), ValueError,
     ["block_table:", "got None"]),
    (dict(k=np.zeros((4, 24, 2, 8)), v=np.zeros((4, 24, 2, 8))), ValueError,
     ["k:", "page_size a positive multiple of 16", "got page_size 24"]),
    (dict(k=np.zeros((0, 16, 2, 8)), v=np.zeros((0, 16, 2, 8))), ValueError,
     ["k:", "at least one page"]),
    (dict(v=np.zeros((4, 16, 2, 4))), ValueError, ["v:", "(4, 16, 2, 8)", "got (4, 16, 2, 4)"]),
    (dict(k=np.zeros((64, 2, 8))), ValueError, ["k:", "4-d", "(num_pages, page_size, Hk, D)"]),
]


@pytest.mark.parametrize("changes, error, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_are_named(changes, error, words):
    args = _host_problem(**changes)
    with pytest.raises(error) as raised:
        xattn.attention_varlen(**args)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_a_valid_host_problem_runs():
    """The base of BAD is valid: each of its failures comes from its one change."""
    out = xattn.attention_varlen(**_host_problem())
    assert out.shape == (5, 4, 8) and np.isfinite(out).all()


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_gradients_are_refused():
    """Paged varlen is forward only: a torch input that requires grad under grad mode raises
    TypeError naming it, rather than returning an output whose backward would be wrong."""
    import torch
    args = {name: torch.from_numpy(x) if isinstance(x, np.ndarray) else x
            for name, x in _host_problem().items()}
    for name in ("q", "k", "v"):
        leaf = args[name].clone().requires_grad_()
        with pytest.raises(TypeError, match=f"{name}: expected a tensor that does not require grad"):
            xattn.attention_varlen(**(args | {name: leaf}))
        with torch.no_grad():  # inference: fine
            xattn.attention_varlen(**(args | {name: leaf}))


def test_out_of_range_ids_raise_on_the_host_and_are_clamped_on_a_gpu(backend):
    """Page ids past either end and lengths past the table: a host table raises ValueError naming
    block_table / seqused_k; a GPU table is never read on the host, and the kernels clamp ids to
    [0, num_pages) and lengths to [0, max_pages * page_size], giving exactly the attention over
    the clamped table (compute-sanitizer checks the same call in ci/varlen_bad_table.py)."""
    library, dtype = backend.kinds[0]
    c = _case(backend, 0, lengths_k=[40, 31, 3], lengths_from="seqused_k", share_pages=False,
              spare_columns=0, library_dtype=(library, "float32"))
    args, seen = make_inputs(backend, c)
    # The clamped table reads pages and rows the valid one would not: finite values there.
    for name in ("k", "v"):
        seen[name] = np.where(np.isnan(seen[name]), 0.5, seen[name])
        args[name] = backend.make(seen[name], library, "float32")
    pages = seen["k"].shape[0]
    bad_table = seen["table"].copy()
    bad_table[1, :2] = [-5, 99]         # sequence 1's two pages: clamped to page 0 and the last
    bad_lengths = np.array([40, 31, 2**30], np.int32)  # clamped to the table's 3 * 16 rows
    call = dict(q=args["q"], k=args["k"], v=args["v"], cu_seqlens_q=args["cu_seqlens_q"],
                cu_seqlens_k=None, max_seqlen_q=37, max_seqlen_k=300,
                block_table=ints(backend, library, bad_table),
                seqused_k=ints(backend, library, bad_lengths), causal=True, return_lse=True)
    if backend.name == "reference":
        with pytest.raises(ValueError, match="block_table: expected page ids"):
            xattn.attention_varlen(**call)
        with pytest.raises(ValueError, match="seqused_k: expected lengths"):
            xattn.attention_varlen(**(call | dict(block_table=args["block_table"])))
        return
    out, lse = xattn.attention_varlen(**call)
    clamped = c | dict(lengths_k=[40, 31, bad_table.shape[1] * c["page_size"]])
    want_out, want_lse, rounding = oracle(clamped, seen | dict(table=np.clip(bad_table, 0, pages - 1)))
    assert_matches(to_float64(out).transpose(1, 0, 2)[None], to_float64(lse)[None], want_out,
                   want_lse, "float32", score_error=rounding)


# ----------------------------------------------------------------------------- launch plans (CPU)

@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("target", ["gfx942", "gfx1100", "gfx1030"])
def test_hip_paged_launch_takes_the_portable_row(stand_in_launches, target):
    """On every AMD family (MFMA, WMMA, none) a paged call launches the portable forward with
    IS_PAGED, the pages' strides (the batch stride is the page stride), the table's geometry, and
    the table, seqused_k and cu_seqlens_k pointers patched on every call (0 where absent), so a
    plan never keeps an earlier call's pointer."""
    import torch
    from xattn import hip

    pages_k, pages_v = (torch.zeros(9, 32, 2, 64, dtype=torch.float16) for _ in range(2))
    k, v = (x.transpose(1, 2) for x in (pages_k, pages_v))  # (P, Hk, page_size, D) views
    q, out = (torch.zeros(1, 10, 8, 64, dtype=torch.float16).transpose(1, 2) for _ in range(2))
    lse = torch.zeros(1, 8, 10)
    table = torch.zeros(3, 5, dtype=torch.int32)
    seqused = torch.zeros(3, dtype=torch.int32)
    cu_q, cu_k = torch.tensor([0, 4, 4, 10], dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    options = dict(causal=True, scale=0.1, stream=7, max_seqlen=(6, 100))
    hip.launch(stand_in_launches.compile, target, q, k, v, out, lse, cu_seqlens=(cu_q, None),
               block_table=table, seqused_k=seqused, **options)
    hip.launch(stand_in_launches.compile, target, q, k, v, out, lse, cu_seqlens=(cu_q, cu_k),
               block_table=table, **options)
    first, second = stand_in_launches.launches
    assert len(stand_in_launches.kernels) == 1  # one plan for both calls
    assert first.kernel.entry == "flash_fwd_portable" and first.grid[2] == 3
    assert first.defines["IS_PAGED"] == 1 and first.defines["IS_VARLEN"] == 1
    p = first.block[0]
    assert (p["page_size"], p["num_pages"], p["max_pages"], p["block_table_stride"]) == (32, 9, 5, 5)
    for name, pages in (("k", pages_k), ("v", pages_v)):
        got = (p[name]["batch_stride"], p[name]["head_stride"], p[name]["row_stride"])
        assert got == (pages.stride(0), pages.stride(2), pages.stride(1))
    assert (p["block_table"], p["seqused_k"]) == (table.data_ptr(), seqused.data_ptr())
    assert (p["cu_seqlens_q"], p["cu_seqlens_k"]) == (cu_q.data_ptr(), 0)
    p = second.block[0]
    assert (p["block_table"], p["seqused_k"]) == (table.data_ptr(), 0)
    assert p["cu_seqlens_k"] == cu_k.data_ptr()


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_the_paged_op_matches_the_plain_path_and_passes_opcheck():
    """xattn::paged_attention_varlen_forward (what torch.compile traces) gives what the eager path
    gives, and its fake implementation, schema and aliasing pass torch's opcheck."""
    import torch
    from xattn import torch_ops

    args = {name: torch.from_numpy(x) if isinstance(x, np.ndarray) else x
            for name, x in _host_problem().items()}
    want = xattn.attention_varlen(**args, causal=True)
    inputs = (args["q"][None], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
              args["block_table"], None, None, None, True, 1 / math.sqrt(8), -1, 0, 0.0, 3, 20)
    out, lse = torch_ops.paged_attention_forward(*inputs)
    assert torch.equal(out[0], want) and lse.shape == (1, 4, 5)
    torch.library.opcheck(torch_ops.paged_attention_forward, inputs)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("dtype, kernel", [("float16", "flash_fwd"), ("bfloat16", "flash_fwd"),
                                           ("float32", "flash_fwd_f32")])
def test_cuda_paged_launch_takes_the_mma_kernel(stand_in_launches, monkeypatch, dtype, kernel):
    """xattn.cuda.forward on a compute capability 9.0 device: a paged call is a packed batch, which
    the sm90 TMA kernel declines, so it launches flash_fwd.cu (or flash_fwd_f32.cu) with IS_PAGED,
    the pages' strides, the table's geometry and the pointers of this call."""
    import torch
    from xattn import configs, cuda, kernels

    monkeypatch.setattr(kernels.Kernel, "compile", stand_in_launches.compile)  # no NVRTC
    monkeypatch.setattr(cuda, "_arch", lambda device: 90)
    elem = getattr(torch, dtype)
    pages = torch.zeros(9, 48, 2, 128, dtype=elem)  # (P, page_size, Hk, D)
    k = v = pages.transpose(1, 2)
    q, out = (torch.zeros(1, 10, 8, 128, dtype=elem).transpose(1, 2) for _ in range(2))
    lse = torch.zeros(1, 8, 10)
    table, seqused = torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    cu_q = torch.tensor([0, 4, 4, 10], dtype=torch.int32)
    cuda.forward(q, k, v, out, lse, causal=False, scale=0.1, stream=5, cu_seqlens=(cu_q, None),
                 max_seqlen=(6, 150), block_table=table, seqused_k=seqused)
    (launched,) = stand_in_launches.launches
    assert launched.kernel.entry == kernel and launched.grid[2] == 3
    # flash_fwd's D128 row on sm_90 is 128 x 64 with 4 warps; paged, 8 (configs.paged_forward_row)
    warps = 8 if kernel == "flash_fwd" else configs.select(kernel, 90, 128, False).warps
    # the float32 forward's body says waves (kernels_common/flash_fwd_simt.h): a wave is a warp
    warps_define = "NUM_WARPS" if kernel == "flash_fwd" else "NUM_WAVES"
    assert launched.threads == 32 * warps and launched.defines[warps_define] == warps
    assert launched.defines["IS_PAGED"] == 1 and launched.defines["IS_VARLEN"] == 1
    p = launched.block[0]
    assert (p["page_size"], p["num_pages"], p["max_pages"], p["block_table_stride"]) == (48, 9, 4, 4)
    assert (p["k"]["batch_stride"], p["k"]["head_stride"], p["k"]["row_stride"]) == (
        pages.stride(0), pages.stride(2), pages.stride(1))
    assert (p["block_table"], p["seqused_k"], p["cu_seqlens_k"]) == (
        table.data_ptr(), seqused.data_ptr(), 0)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_flash_attn_varlen_func_passes_the_block_table_through():
    """flash_attn_compat.flash_attn_varlen_func(block_table=, and vLLM's seqused_k=) is
    attention_varlen's paged call, with flash-attn's (H, total_q) lse."""
    import torch
    from xattn import flash_attn_compat as fa

    args = {name: torch.from_numpy(x) if isinstance(x, np.ndarray) else x
            for name, x in _host_problem().items()}
    want, want_lse = xattn.attention_varlen(**args, causal=True, return_lse=True)
    out, lse, _ = fa.flash_attn_varlen_func(
        args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"], 3, 20,
        causal=True, block_table=args["block_table"], return_attn_probs=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    used = torch.tensor([20, 11], dtype=torch.int32)
    got = fa.flash_attn_varlen_func(args["q"], args["k"], args["v"], args["cu_seqlens_q"], None, 3,
                                    20, causal=True, block_table=args["block_table"], seqused_k=used)
    assert torch.equal(got, want)


def test_a_cached_signature_still_checks_the_values(monkeypatch):
    """A repeated call signature skips validation of shapes and options (xattn/call.py: the
    signature cache), never the values of a host table and host lengths."""
    from xattn import call as calls

    xattn.attention_varlen(**_host_problem())
    xattn.attention_varlen(**_host_problem(seqused_k=np.array([20, 3], np.int32)))

    def not_again(*args, **kwargs):
        raise AssertionError("a cached signature was validated again")

    monkeypatch.setattr(calls, "_validate", not_again)  # from here on: cache hits only
    for changes, argument in ((dict(block_table=np.array([[3, 0], [1, 4]], np.int32)), "block_table"),
                              (dict(cu_seqlens_k=np.array([0, 20, 53], np.int32)), "block_table"),
                              (dict(seqused_k=np.array([20, 33], np.int32)), "seqused_k")):
        with pytest.raises(ValueError, match=f"{argument}: expected"):
            xattn.attention_varlen(**_host_problem(**changes))
