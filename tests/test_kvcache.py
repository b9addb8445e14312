"""attention_with_kvcache against the float64 oracle, on every backend (the `backend` fixture).

The oracle is computed here from the inputs as the backend saw them: for sequence b the keys are
the first cache_seqlens[b] cache rows followed by k_new[b], and reference.exact_attention_bhsd
attends over exactly those. Cache rows past each sequence's keys, and the rows k_new is about to
overwrite, hold NaN: a kernel that reads a row it should not, or an append that misses its row,
turns the output NaN. After the call the caches must hold k_new/v_new at exactly the new rows and
be bitwise unchanged everywhere else.
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
from problems import present, to_bhsd
from test_properties import assert_matches
from xattn import configs, kernels, kvcache, reference

HAS_TORCH = importlib.util.find_spec("torch") is not None
HEAD_DIMS = (1, 7, 32, 63, 64, 80, 128, 129, 200, 256)
CACHE_LENGTHS = (0, 1, 5, 64, 65, 130, 300)
QUERY_LENGTHS = (1, 1, 2, 3, 4, 16, 40)  # 40 x a group of 8 rows: several row tiles
GQA = (1, 4, 8)
# GPU examples are fewer: each new (dtype, head-dim row, tile, softcap, vec) variant compiles first
# (about a second); ci/kernel_check_decode.py sweeps the shapes more widely.
EXAMPLES = {"reference": 40, "cuda": 60, "hip": 60, "hip-on-cuda": 30, "hip-on-cuda-wave64": 20}


# ----------------------------------------------------------------------------- drawing cases

@st.composite
def cases(draw, backend):
    batch = draw(st.integers(1, 3))
    heads_k = draw(st.integers(1, 2))
    heads_q = heads_k * draw(st.sampled_from(GQA))
    seqlen_q = draw(st.sampled_from(QUERY_LENGTHS))
    seqlen_max = draw(st.sampled_from(CACHE_LENGTHS))
    seqlen_new = draw(st.sampled_from((0, 1, 1, 3, 16)).filter(lambda n: n <= seqlen_max))
    with_new = seqlen_new > 0 or draw(st.booleans())  # Snew = 0: with empty k_new or without
    # Lengths include 0 and the largest that leaves room for the new rows.
    room = seqlen_max - seqlen_new
    lengths = [draw(st.sampled_from((0, room, room // 2)) | st.integers(0, room)) for _ in range(batch)]
    window = draw(st.sampled_from((None, None, (-1, -1), (0, 0), (3, -1), (-1, 2), (17, 1), (0, -1),
                                   (1000, 1000))))
    causal = draw(st.booleans())
    if causal and window is not None and window[1] > 0:
        window = (window[0], 0)  # causal hides every key right of the diagonal: right is 0
    library, dtype = draw(st.sampled_from(backend.kinds))
    # Every backend's decode serves contiguous and paged caches, with sinks or without.
    paged = draw(st.sampled_from((None, None, 16, 32, 48, 256)))  # page size
    sinks = draw(st.sampled_from((None, None, "small", "large")))
    # cache_leftpad: each sequence's first cache row (0 and the whole cache included), the rows
    # below it NaN (never read)
    leftpad = draw(st.sampled_from((None, None, "drawn")))
    if leftpad:
        leftpad = [draw(st.sampled_from((0, length)) | st.integers(0, length)) for length in lengths]
    return dict(
        paged=paged, share_pages=draw(st.booleans()) and not leftpad, sinks=sinks, leftpad=leftpad,
        batch=batch, heads_q=heads_q, heads_k=heads_k, seqlen_q=seqlen_q, seqlen_max=seqlen_max,
        seqlen_new=seqlen_new, with_new=with_new, lengths=lengths,
        head_dim=draw(st.sampled_from(HEAD_DIMS)), layout=draw(st.sampled_from(("bhsd", "bshd"))),
        causal=causal, window=window,
        softcap=draw(st.sampled_from((None, None, 0.0, 1.5, 30.0))),
        scale=draw(st.sampled_from((None, 0.05, 2.0))), spread=draw(st.sampled_from((1.0, 4.0))),
        lengths_as=draw(st.sampled_from(("array", "array", "int"))) if len(set(lengths)) == 1 else "array",
        q_memory=draw(st.sampled_from(("contiguous", "sliced", "transposed", "strided_last_dim"))),
        cache_memory=draw(st.sampled_from(("contiguous", "sliced", "transposed"))),
        library=library, dtype=dtype, seed=draw(st.integers(0, 2**32 - 1)))


def make_inputs(backend, c):
    """Arrays for the backend (in the case's layout) and their float64 bhsd values as presented."""
    rng = np.random.default_rng(c["seed"])
    b, hq, hk, sq, smax, snew, d = (c[k] for k in ("batch", "heads_q", "heads_k", "seqlen_q",
                                                     "seqlen_max", "seqlen_new", "head_dim"))
    q = c["spread"] * rng.standard_normal((b, hq, sq, d))
    caches = [rng.standard_normal((b, hk, smax, d)) * s for s in (c["spread"], 1.0)]
    for cache in caches:  # rows past each sequence's old length: NaN until k_new lands there
        for i, length in enumerate(c["lengths"]):
            cache[i, :, length:] = np.nan
            if c.get("leftpad"):  # and the left padding, which no query sees
                cache[i, :, :c["leftpad"][i]] = np.nan
    new = [rng.standard_normal((b, hk, snew, d)) * s for s in (c["spread"], 1.0)]

    def put(x, memory):
        return present(backend, x, c["layout"], c["library"], c["dtype"], memory)

    arrays = dict(q=put(q, c["q_memory"]))
    if c.get("paged"):
        pages, table = _paginate(caches, c, rng)
        arrays["k_cache"], arrays["v_cache"] = (
            present(backend, x, "bhsd", c["library"], c["dtype"], "contiguous") for x in pages)
        arrays["block_table"] = _int32(backend, c, table)
    else:
        arrays["k_cache"], arrays["v_cache"] = (put(x, c["cache_memory"]) for x in caches)
    if c["with_new"]:
        arrays["k_new"], arrays["v_new"] = (put(x, c["q_memory"]) for x in new)
    if c.get("sinks"):
        normal = rng.standard_normal(hq)
        # "large": +-1e4, a sink that takes all the mass or none (exp(-1e4) is 0 in float64 too)
        values = (normal if c["sinks"] == "small" else 1e4 * np.sign(normal)).astype(np.float32)
        arrays["sinks"] = backend.make(values.astype(np.float64), c["library"], "float32")
    if c.get("leftpad"):
        arrays["cache_leftpad"] = _int32(backend, c, c["leftpad"])
    seen = {}
    for name, x in arrays.items():
        if name == "cache_leftpad":
            continue
        if name in ("block_table", "sinks"):
            seen[name] = to_float64(x) if name == "sinks" else np.asarray(table)
        elif c.get("paged") and name in ("k_cache", "v_cache"):
            seen[name] = to_float64(x)  # the pages, (P, page_size, Hk, D)
        else:
            seen[name] = to_bhsd(to_float64(x), c["layout"])
    return arrays, seen


def _paginate(caches, c, rng):
    """Pages (P, page_size, Hk, D) holding each sequence's cache rows, and the int32 table: page
    ids shuffled, two unused pages, every unused page and row NaN (a kernel that reads one turns
    its output NaN). With share_pages, sequence 1 reads sequence 0's first page (read-only: both
    hold at least a page of cached rows, so no append lands there)."""
    b, hk, d, size = c["batch"], c["heads_k"], c["head_dim"], c["paged"]
    per_sequence = max(1, -(-c["seqlen_max"] // size))
    count = b * per_sequence + 2
    ids = rng.permutation(count)[:b * per_sequence].reshape(b, per_sequence).astype(np.int32)
    lengths = c["lengths"]
    share = c.get("share_pages") and b > 1 and min(lengths[0], lengths[1]) >= size
    if share:
        ids[1, 0] = ids[0, 0]
    pages = []
    for cache in caches:
        cache = cache.copy()
        if share:  # the shared rows hold the same values in both sequences
            cache[1, :, :size] = cache[0, :, :size]
        paged = np.full((count, size, hk, d), np.nan)
        padded = np.full((b, hk, per_sequence * size, d), np.nan)
        padded[:, :, :c["seqlen_max"]] = cache
        for i in range(b):
            for j in range(per_sequence):
                if not (share and i == 1 and j == 0):
                    paged[ids[i, j]] = padded[i, :, j * size:(j + 1) * size].transpose(1, 0, 2)
        pages.append(paged)
    return pages, ids


def _int32(backend, c, values):
    values = np.asarray(values, dtype=np.int32)
    if c["library"] == "numpy":
        return values
    if c["library"] == "torch":
        import torch
        return torch.from_numpy(values).to(backend.device)
    import cupy
    return cupy.asarray(values)


def _sequence_rows(c, seen, name, i, length):
    """Sequence i's first `length` cache rows, (1, Hk, length, D), contiguous or from its pages."""
    if not c.get("paged"):
        return seen[name][i:i + 1, :, :length]
    rows = seen[name][seen["block_table"][i]].reshape(-1, c["heads_k"], c["head_dim"])[:length]
    return rows.transpose(1, 0, 2)[None]


def seqlens_argument(backend, c):
    if c["lengths_as"] == "int":
        return c["lengths"][0]
    lengths = np.asarray(c["lengths"], dtype=np.int32)
    if c["library"] == "numpy":
        return lengths
    if c["library"] == "torch":
        import torch
        return torch.from_numpy(lengths).to(backend.device)
    import cupy
    return cupy.asarray(lengths)


def oracle(c, seen):
    """(out, lse) in float64, sequence by sequence over exactly its keys, and the float32 score
    rounding to allow for: eps32 * scale * max_ij sum_d |q_id k_jd| (test_properties.py explains
    it; at the default scale on unit-variance data it stays far below the fixed tolerance)."""
    outs, lses, largest = [], [], 0.0
    scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(c["head_dim"])
    for i, length in enumerate(c["lengths"]):
        k, v = (_sequence_rows(c, seen, name, i, length) for name in ("k_cache", "v_cache"))
        if c.get("leftpad"):  # the sequence's keys start at its left padding
            k, v = k[:, :, c["leftpad"][i]:], v[:, :, c["leftpad"][i]:]
        if c["with_new"]:
            k = np.concatenate([k, seen["k_new"][i:i + 1]], axis=2)
            v = np.concatenate([v, seen["v_new"][i:i + 1]], axis=2)
        out, lse = reference.exact_attention_bhsd(
            seen["q"][i:i + 1], k, v, causal=c["causal"], scale=scale,
            window=c["window"] or (-1, -1), softcap=c["softcap"] or 0.0, sinks=seen.get("sinks"))
        outs.append(out)
        lses.append(lse)
        if k.shape[2] and seen["q"].shape[2]:
            group = seen["q"].shape[1] // k.shape[1]
            sums = np.abs(seen["q"][i]) @ np.abs(np.repeat(k[0], group, axis=0)).swapaxes(-1, -2)
            largest = max(largest, float(sums.max()))
    rounding = 2.0**-24 * scale * largest if c["dtype"] == "float32" else 0.0
    return np.concatenate(outs), np.concatenate(lses), rounding


def expected_caches(c, seen):
    """The caches after the call: k_new/v_new at rows [length, length + Snew), the rest as before."""
    want = {name: seen[name].copy() for name in ("k_cache", "v_cache")}
    if c["with_new"] and c.get("paged"):  # row r of sequence i: page table[i, r // size], r % size
        for i, length in enumerate(c["lengths"]):
            for t in range(c["seqlen_new"]):
                page, row = divmod(length + t, c["paged"])
                want["k_cache"][seen["block_table"][i, page], row] = seen["k_new"][i, :, t]
                want["v_cache"][seen["block_table"][i, page], row] = seen["v_new"][i, :, t]
        return want
    if c["with_new"]:
        for i, length in enumerate(c["lengths"]):
            want["k_cache"][i, :, length:length + c["seqlen_new"]] = seen["k_new"][i]
            want["v_cache"][i, :, length:length + c["seqlen_new"]] = seen["v_new"][i]
    return want


def run_and_check(backend, c):
    arrays, seen = make_inputs(backend, c)
    want_out, want_lse, rounding = oracle(c, seen)
    want_caches = expected_caches(c, seen)
    out, lse = xattn.attention_with_kvcache(
        **arrays, cache_seqlens=seqlens_argument(backend, c), causal=c["causal"], scale=c["scale"],
        window=c["window"], softcap=c["softcap"], layout=c["layout"], return_lse=True)
    q = arrays["q"]
    assert type(out) is type(q) and tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype
    assert "float32" in str(lse.dtype) and tuple(lse.shape) == (c["batch"], c["heads_q"], c["seqlen_q"])
    for name in ("k_cache", "v_cache"):  # exactly the new rows written, nothing else touched
        got = to_float64(arrays[name])
        if not c.get("paged"):
            got = to_bhsd(got, c["layout"])
        np.testing.assert_array_equal(got, want_caches[name], f"{name} after the call")
    assert_matches(to_bhsd(to_float64(out), c["layout"]), to_float64(lse), want_out, want_lse,
                   c["dtype"], score_error=rounding)


# ----------------------------------------------------------------------------- properties

def test_matches_oracle(backend):
    @settings(max_examples=EXAMPLES[backend.name])
    @given(c=cases(backend))
    def check(c):
        run_and_check(backend, c)

    check()


SHAPES = [  # (B, Hq, Hk, Sq, Smax, Snew, D, lengths): the decode shapes and the edges, every backend
    (2, 8, 2, 1, 300, 1, 128, [0, 299]),       # empty cache + new token, a full cache
    (3, 32, 4, 1, 130, 0, 64, [130, 0, 65]),   # Snew = 0: cache_seqlens 0 and Smax
    (1, 8, 1, 16, 200, 16, 128, [184]),        # 16 query tokens x GQA 8 = 128 rows
    (2, 4, 4, 5, 65, 3, 7, [62, 1]),           # odd head dim, MHA
    (1, 2, 2, 40, 40, 40, 256, [0]),           # prefill into an empty cache: Sq = Snew = Smax
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_decode_shapes(backend, shape, layout):
    b, hq, hk, sq, smax, snew, d, lengths = shape
    for i, (library, dtype) in enumerate(backend.kinds):
        for causal, window, softcap in ((True, None, None), (False, (4, 2), 20.0)):
            run_and_check(backend, dict(
                batch=b, heads_q=hq, heads_k=hk, seqlen_q=sq, seqlen_max=smax, seqlen_new=snew,
                with_new=True, lengths=lengths, head_dim=d, layout=layout, causal=causal,
                window=window, softcap=softcap, scale=None, spread=1.0, lengths_as="array",
                q_memory="contiguous", cache_memory="contiguous", library=library, dtype=dtype,
                seed=i))


def test_softcap_with_large_scores(backend):
    """Scores of hundreds: without the cap the softmax is one-hot, with c = 5 it is not; the
    kernels' tanh must hold up at both ends."""
    for library, dtype in backend.kinds:
        run_and_check(backend, dict(
            batch=2, heads_q=8, heads_k=2, seqlen_q=2, seqlen_max=150, seqlen_new=2, with_new=True,
            lengths=[148, 37], head_dim=64, layout="bhsd", causal=True, window=None, softcap=5.0,
            scale=1.0, spread=4.0, lengths_as="array", q_memory="contiguous",
            cache_memory="contiguous", library=library, dtype=dtype, seed=7))


# ----------------------------------------------------------------------------- GPU only

@pytest.fixture
def forced_splits(monkeypatch):
    def force(n):
        monkeypatch.setattr(kvcache, "_FORCED_SPLITS", n)
        kvcache.num_splits.cache_clear()
        kvcache._plans.clear()  # plans hold their split count
    yield force
    kvcache.num_splits.cache_clear()
    kvcache._plans.clear()


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 7, 200])
def test_split_counts(cuda_backend, forced_splits, splits):
    """The same answers whatever the split count: one block writing out directly, several merged,
    and more splits than steps of keys (empty splits, LSE -inf, skipped by the merge)."""
    forced_splits(splits)
    for i, (library, dtype) in enumerate(cuda_backend.kinds):
        run_and_check(cuda_backend, dict(
            batch=2, heads_q=8, heads_k=2, seqlen_q=3, seqlen_max=700, seqlen_new=2, with_new=True,
            lengths=[698, 40], head_dim=128, layout="bshd", causal=True, window=(300, -1),
            softcap=None, scale=None, spread=1.0, lengths_as="array", q_memory="contiguous",
            cache_memory="contiguous", library=library, dtype=dtype, seed=i))


def _direct(cuda_backend, library, dtype, batch, heads_q, heads_k, seqlen_q, seqlen_max, seqlen_new,
            head_dim, lengths, *, pad=4):
    """Launch the kernels directly on caches that are views of larger NaN-padded buffers, with
    NaN-poisoned out, lse and workspace. Returns the float64 results and the buffers."""
    import cupy
    rng = np.random.default_rng(seqlen_max + head_dim)
    shape = (batch, heads_k, seqlen_max + pad, head_dim)
    buffers = [cuda_backend.make(rng.standard_normal(shape), library, dtype) for _ in range(2)]
    caches = [x[:, :, :seqlen_max] for x in buffers]
    q = cuda_backend.make(rng.standard_normal((batch, heads_q, seqlen_q, head_dim)), library, dtype)
    new = [cuda_backend.make(rng.standard_normal((batch, heads_k, seqlen_new, head_dim)), library, dtype)
           for _ in range(2)]
    out = cuda_backend.make(np.full((batch, heads_q, seqlen_q, head_dim), np.nan), library, dtype)
    lse = cuda_backend.make(np.full((batch, heads_q, seqlen_q), np.nan), library, "float32")
    if library == "torch":
        import torch
        seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        stream = torch.cuda.current_stream().cuda_stream

        def workspace(n):
            return torch.full((n,), float("nan"), device="cuda")
    else:
        seqlens = cupy.asarray(np.asarray(lengths, dtype=np.int32))
        stream = cupy.cuda.get_current_stream().ptr

        def workspace(n):
            return cupy.full((n,), np.nan, dtype=cupy.float32)
    before = [to_float64(x) for x in buffers]
    # a device array: the kernels read and clamp it
    kvcache.launch_for_check(q, caches[0], caches[1], seqlens, out, lse, workspace, k_new=new[0],
                             v_new=new[1])
    return (to_float64(out), to_float64(lse), [to_float64(x) for x in buffers], before,
            [to_float64(x) for x in (q, *new)])


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
def test_out_of_range_lengths_are_clamped(cuda_backend, forced_splits, splits):
    """Device lengths are never checked on the host: negative ones count as 0, ones past Smax as
    Smax, new rows at or past Smax are dropped, and nothing outside the caches is touched (the
    padding rows after each head's Smax rows keep their values)."""
    forced_splits(splits)
    smax, snew = 50, 3
    lengths = [-7, 49, 60, 10]
    for library, dtype in cuda_backend.kinds:
        out, lse, after, before, (q, kn, vn) = _direct(cuda_backend, library, dtype, 4, 4, 2, 2, smax,
                                                       snew, 64, lengths)
        for i, length in enumerate(lengths):
            start = min(max(length, 0), smax)
            keep = min(start + snew, smax) - start  # new rows that fit
            for buffer, before_b, new in zip(after, before, (kn, vn)):
                want = before_b[i].copy()
                want[:, start:start + keep] = new[i, :, :keep]
                np.testing.assert_array_equal(buffer[i], want)
            seqlen_k = start + keep
            k = after[0][i:i + 1, :, :seqlen_k]
            v = after[1][i:i + 1, :, :seqlen_k]
            want_out, want_lse = reference.exact_attention_bhsd(q[i:i + 1], k, v, causal=True,
                                                                scale=1 / 8)
            assert_matches(out[i:i + 1], lse[i:i + 1], want_out, want_lse, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_every_output_element_is_written(cuda_backend, forced_splits, splits):
    """out, lse and the workspace start as NaN: every element the merge reads or the call returns
    must have been written (rows past Sq * group in the last tile, empty splits included)."""
    forced_splits(splits)
    for library, dtype in cuda_backend.kinds:
        for heads_q, seqlen_q, head_dim in ((8, 3, 96), (2, 9, 33), (16, 1, 256)):
            out, lse, after, _, (q, _, _) = _direct(cuda_backend, library, dtype, 2, heads_q, 2,
                                                   seqlen_q, 300, 0, head_dim, [300, 0])
            assert not np.isnan(out).any() and not np.isnan(lse).any()
            want_out, want_lse = reference.exact_attention_bhsd(
                q[:1], after[0][:1, :, :300], after[1][:1, :, :300], causal=True,
                scale=1 / math.sqrt(head_dim))
            assert_matches(out[:1], lse[:1], want_out, want_lse, dtype)
            assert (out[1] == 0).all() and np.isneginf(lse[1]).all()  # an empty cache


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_cuda_graph_replay_reads_lengths_on_the_device(cuda_backend):
    """A call captured in a CUDA graph (no host synchronization, no allocation outside torch's)
    and replayed after cache_seqlens changed on the device gives the new lengths' answer."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hk, smax, d = 3, 8, 2, 1000, 128
    q = torch.randn(b, hq, 1, d, device="cuda", generator=gen).half()
    kc, vc = (torch.randn(b, hk, smax, d, device="cuda", generator=gen).half() for _ in range(2))
    kn, vn = (torch.randn(b, hk, 1, d, device="cuda", generator=gen).half() for _ in range(2))
    seqlens = torch.tensor([5, 500, 998], dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, k_new=kn, v_new=vn)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, k_new=kn, v_new=vn)
    seqlens.copy_(torch.tensor([7, 0, 321], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    for i, length in enumerate([7, 0, 321]):
        k, v = (x[i:i + 1, :, :length + 1].double().cpu().numpy() for x in (kc, vc))
        np.testing.assert_array_equal(k[:, :, -1:], kn[i:i + 1].double().cpu().numpy())
        want, _ = reference.exact_attention_bhsd(q[i:i + 1].double().cpu().numpy(), k, v, causal=True,
                                                 scale=1 / math.sqrt(d))
        got = out[i:i + 1].double().cpu().numpy()
        assert np.linalg.norm(got - want) <= 2e-3 * np.linalg.norm(want)


# ----------------------------------------------------------------------------- launch arithmetic

def test_split_count_fills_the_gpu():
    slots = 132 * 2
    # B=8 x Hk=8 pairs of 4096 keys (64 steps): one split would use a quarter of the slots.
    splits = kvcache.num_splits(64, slots, 64, 3)
    assert 64 * splits >= 0.9 * slots and splits <= 64
    # Already more than a wave of blocks: no split, no merge.
    assert kvcache.num_splits(512, slots, 64, 3) == 1
    # Never more splits than steps of keys, nor than MAX_SPLITS.
    assert kvcache.num_splits(1, slots, 3, 3) <= 3
    assert kvcache.num_splits(1, slots, 10**6, 3) <= kvcache.MAX_SPLITS


def test_decode_rows_fit_shared_memory():
    """min_blocks blocks of every decode row fit one SM (1 KB reserved per block), each block
    within the per-block limit; the variant with the most rows per tile is the largest."""
    per_sm = {80: 164 * 1024, 86: 100 * 1024, 90: 228 * 1024}
    per_block = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
    for cfg in configs.TABLE:
        if cfg.kernel in configs.DECODE_KERNELS:
            decode = kernels.cuda(cfg.kernel)

            def smem(rows, kv_fp8=0):
                return decode.shared_memory(decode.defines(cfg, "float16", rows=rows, vec=True,
                                                           softcap=False, kv_fp8=kv_fp8))

            largest = smem(cfg.block_m)
            assert largest <= per_block[cfg.arch], cfg
            assert cfg.min_blocks * (largest + 1024) <= per_sm[cfg.arch], cfg
            assert cfg.block_n % cfg.warps == 0 and cfg.stages >= 1, cfg
            for rows in (16, 32, 64):
                if rows <= cfg.block_m:
                    assert smem(rows) <= largest
            # FP8 caches: half-size rings plus the conversion tiles, same rows and stages
            fp8 = smem(cfg.block_m, kv_fp8=1)
            assert fp8 <= per_block[cfg.arch], cfg
            assert cfg.min_blocks * (fp8 + 1024) <= per_sm[cfg.arch], cfg


# ----------------------------------------------------------------------------- bad input

def _host(shape, dtype="float32"):
    return np.zeros(shape, dtype=dtype)


Q, KC, VC = _host((2, 4, 1, 16)), _host((2, 2, 10, 16)), _host((2, 2, 10, 16))
KN, VN = _host((2, 2, 3, 16)), _host((2, 2, 3, 16))
LENS = np.array([3, 7], dtype=np.int32)
PAGES, TABLE = _host((4, 16, 2, 16)), np.array([[0, 1], [2, 3]], dtype=np.int32)  # paged: Smax 32

BAD = [  # (id, arguments, keyword arguments, exception, words the message must contain)
    ("q rank", (Q[0], KC, VC), {}, ValueError, ["q:", "4-d", "(4, 1, 16)"]),
    ("cache batch", (Q, KC[:1], VC[:1]), {}, ValueError, ["k_cache:", "batch size 2", "got 1"]),
    ("cache head dim", (Q, KC[..., :8], VC[..., :8]), {}, ValueError, ["k_cache:", "head dim 16", "got 8"]),
    ("v_cache shape", (Q, KC, VC[:, :, :9]), {}, ValueError, ["v_cache:", "(2, 2, 10, 16)", "(2, 2, 9, 16)"]),
    ("gqa", (_host((2, 3, 1, 16)), KC, VC), {}, ValueError, ["q:", "divisible by k_cache's 2 heads", "got 3"]),
    ("dtype", (Q, KC.astype("float16"), VC), {}, TypeError, ["k_cache:", "dtype float32", "got float16"]),
    ("int dtype", (Q.astype("int32"), KC.astype("int32"), VC.astype("int32")), {}, TypeError,
     ["q:", "float16, bfloat16, float32", "got int32"]),
    ("k_new alone", (Q, KC, VC), {"k_new": KN}, ValueError, ["v_new:", "when k_new is given", "None"]),
    ("v_new alone", (Q, KC, VC), {"v_new": VN}, ValueError, ["k_new:", "when v_new is given", "None"]),
    ("k_new heads", (Q, KC, VC), {"k_new": KN[:, :1], "v_new": VN[:, :1]}, ValueError,
     ["k_new:", "(2, 2, 'Snew', 16)", "(2, 1, 3, 16)"]),
    ("v_new shape", (Q, KC, VC), {"k_new": KN, "v_new": VN[:, :, :2]}, ValueError,
     ["v_new:", "(2, 2, 3, 16)", "(2, 2, 2, 16)"]),
    ("too many new", (Q, _host((2, 2, 2, 16)), _host((2, 2, 2, 16))), {"k_new": KN, "v_new": VN,
     "cache_seqlens": 0}, ValueError, ["k_new:", "at most 2 new tokens", "got 3"]),
    ("length past the cache", (Q, KC, VC), {"k_new": KN, "v_new": VN,
     "cache_seqlens": np.array([3, 8], dtype=np.int32)}, ValueError,
     ["cache_seqlens:", "cache_seqlens + Snew <= Smax", "got 8 at batch 1"]),
    ("negative length", (Q, KC, VC), {"cache_seqlens": np.array([-1, 0], dtype=np.int32)}, ValueError,
     ["cache_seqlens:", "0 <= cache_seqlens", "got -1 at batch 0"]),
    ("int length past the cache", (Q, KC, VC), {"cache_seqlens": 11}, ValueError,
     ["cache_seqlens:", "Smax = 10", "got 11"]),
    ("lengths dtype", (Q, KC, VC), {"cache_seqlens": LENS.astype(np.int64)}, TypeError,
     ["cache_seqlens:", "int32", "got int64"]),
    ("lengths shape", (Q, KC, VC), {"cache_seqlens": LENS[:1]}, ValueError,
     ["cache_seqlens:", "shape (2,)", "got (1,)"]),
    ("lengths list", (Q, KC, VC), {"cache_seqlens": [3, 7]}, TypeError,
     ["cache_seqlens:", "int32 array (B,) or an int", "list"]),
    ("lengths bool", (Q, KC, VC), {"cache_seqlens": True}, TypeError, ["cache_seqlens:", "bool"]),
    ("window type", (Q, KC, VC), {"window": 4}, TypeError, ["window:", "pair of ints", "4"]),
    ("window value", (Q, KC, VC), {"window": (-2, 0)}, ValueError, ["window:", "-1 for unbounded", "(-2, 0)"]),
    ("causal window", (Q, KC, VC), {"window": (4, 2)}, ValueError, ["window:", "causal=True", "(4, 2)"]),
    ("softcap negative", (Q, KC, VC), {"softcap": -1.0}, ValueError, ["softcap:", "finite positive", "-1.0"]),
    ("softcap type", (Q, KC, VC), {"softcap": "big"}, TypeError, ["softcap:", "'big'"]),
    ("scale", (Q, KC, VC), {"scale": 0.0}, ValueError, ["scale:", "finite positive", "0.0"]),
    ("layout", (Q, KC, VC), {"layout": "sbhd"}, ValueError, ["layout:", "'bhsd' or 'bshd'", "'sbhd'"]),
    ("causal", (Q, KC, VC), {"causal": 1}, TypeError, ["causal:", "bool", "1"]),
    ("backend", (Q, KC, VC), {"backend": "cuda"}, ValueError, ["backend:", "got 'cuda'"]),
    ("read-only cache", (Q, np.broadcast_to(KC, KC.shape), VC), {"k_new": KN, "v_new": VN}, ValueError,
     ["k_cache:", "writable", "read-only"]),
    ("page id", (Q, PAGES, PAGES), {"block_table": np.array([[0, 1], [2, 5]], np.int32)}, ValueError,
     ["block_table:", "page ids in [0, 4)", "got 5 at [1, 1]"]),
    ("negative page id", (Q, PAGES, PAGES), {"block_table": np.array([[0, 1], [-1, 2]], np.int32)},
     ValueError, ["block_table:", "got -1 at [1, 0]"]),
    ("table dtype", (Q, PAGES, PAGES), {"block_table": TABLE.astype(np.int64)}, TypeError,
     ["block_table:", "int32", "got int64"]),
    ("table shape", (Q, PAGES, PAGES), {"block_table": TABLE[:1]}, ValueError,
     ["block_table:", "(2, max_pages)", "got (1, 2)"]),
    ("page size", (Q, _host((4, 8, 2, 16)), _host((4, 8, 2, 16))), {"block_table": TABLE}, ValueError,
     ["k_cache:", "multiple of 16", "got page_size 8"]),
    ("length past the table", (Q, PAGES, PAGES), {"block_table": TABLE,
     "cache_seqlens": np.array([3, 33], dtype=np.int32)}, ValueError,
     ["cache_seqlens:", "Smax = 32", "got 33 at batch 1"]),
    ("sinks shape", (Q, KC, VC), {"sinks": np.zeros(3, np.float32)}, ValueError, ["sinks:", "(4,)", "(3,)"]),
    ("sinks dtype", (Q, KC, VC), {"sinks": np.zeros(4)}, TypeError, ["sinks:", "float32", "float64"]),
    ("leftpad past the length", (Q, KC, VC), {"cache_leftpad": np.array([3, 8], np.int32)}, ValueError,
     ["cache_leftpad:", "<= cache_seqlens", "got 8 against 7 at batch 1"]),
    ("negative leftpad", (Q, KC, VC), {"cache_leftpad": np.array([-1, 0], np.int32)}, ValueError,
     ["cache_leftpad:", "0 <= cache_leftpad", "got -1"]),
    ("leftpad dtype", (Q, KC, VC), {"cache_leftpad": np.zeros(2, np.int64)}, TypeError,
     ["cache_leftpad:", "int32", "got int64"]),
    ("leftpad shape", (Q, KC, VC), {"cache_leftpad": np.zeros(3, np.int32)}, ValueError,
     ["cache_leftpad:", "shape (2,)", "got (3,)"]),
    ("leftpad list", (Q, KC, VC), {"cache_leftpad": [0, 1]}, TypeError, ["cache_leftpad:", "int32 array", "list"]),
]


@pytest.mark.parametrize("args, kwargs, error, words", [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_input_is_named(args, kwargs, error, words):
    kwargs = {"cache_seqlens": LENS} | kwargs
    with pytest.raises(error) as raised:
        xattn.attention_with_kvcache(*args, **kwargs)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_inputs_that_require_grad_are_refused():
    import torch
    q, kc, vc = (torch.zeros(s) for s in ((1, 2, 1, 8), (1, 1, 4, 8), (1, 1, 4, 8)))
    lengths = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"q: expected a tensor that does not require grad .*inference only"):
        xattn.attention_with_kvcache(q.requires_grad_(), kc, vc, cache_seqlens=lengths)
    with torch.no_grad():  # inference mode: fine
        out = xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths)
    assert not out.requires_grad
    with pytest.raises(TypeError, match=r"cache_seqlens: expected a torch tensor \(as q\)"):
        xattn.attention_with_kvcache(q.detach(), kc, vc, cache_seqlens=np.array([4], dtype=np.int32))


def test_plan_of_the_benchmark_shapes(monkeypatch):
    """The launch plan on an H200 (sm_90, 132 SMs) for the decode benchmark (B=8, Hq=32, D=128,
    bf16, one token), computed without a GPU: GQA 4 fills one 16-row tile per kv head, and the
    keys are split only as far as it takes to fill the GPU (Hk=32 already does: no merge)."""
    monkeypatch.setitem(kvcache._device_attributes, 0, (90, 132))
    kvcache.num_splits.cache_clear()
    for heads_k, seqlen, want_splits in ((8, 4096, 4), (8, 131072, 4), (32, 4096, 1), (32, 131072, 1)):
        cfg, tile_rows, m_blocks, splits, window = kvcache._plan(
            "bfloat16", 0, 8, 32, heads_k, 1, seqlen, 128, (-1, 0))
        assert (cfg.kernel, cfg.head_dim, tile_rows, m_blocks) == ("flash_decode", 128, 16, 1)
        assert splits == want_splits and window == (-1, 0)
    # Speculative decoding, 16 tokens x GQA 4 = 64 rows: two 32-row tiles at D = 128.
    cfg, tile_rows, m_blocks, _, _ = kvcache._plan("float16", 0, 8, 32, 8, 16, 4096, 128, (-1, 0))
    assert (tile_rows, m_blocks) == (32, 2)
    # A window bounds the keys to split: 100 + 1 keys of a 131072-key cache need no split.
    *_, splits, window = kvcache._plan("bfloat16", 0, 64, 32, 32, 1, 131072, 128, (100, 0))
    assert splits == 1 and window == (100, 0)
    # Bounds past every key distance are unbounded (-1) for the kernels.
    assert kvcache._plan("float32", 0, 1, 1, 1, 1, 50, 64, (10**6, 10**6))[4] == (-1, -1)


# ----------------------------------------------------------------------------- fuzz

ARGUMENTS = ("q:", "k_cache:", "v_cache:", "k_new:", "v_new:", "cache_seqlens:", "window:",
             "softcap:", "scale:", "layout:", "causal:", "return_lse:", "backend:")
CORRUPTIONS = ("q rank", "cache batch", "cache heads", "head dim", "v_cache length", "k_new alone",
               "k_new heads", "too many new", "lengths dtype", "lengths shape", "lengths value",
               "lengths type", "window", "softcap", "scale", "layout", "causal", "return_lse",
               "dtype", "read-only cache")


@settings(max_examples=150)
@given(data=st.data())
def test_fuzz_arguments(data):
    """Valid calls (drawn like test_matches_oracle) match the oracle; each drawn corruption of one
    argument is rejected with TypeError or ValueError naming an argument, never anything else."""
    from conftest import Backend, _reference_kinds
    reference_backend = Backend("reference", _reference_kinds())  # host arrays only
    c = data.draw(cases(reference_backend))
    corruption = data.draw(st.sampled_from(("none",) * 5 + CORRUPTIONS))
    if corruption == "none":
        run_and_check(reference_backend, c)
        return
    c.update(library="numpy", dtype="float32", q_memory="contiguous", cache_memory="contiguous",
             with_new=True, lengths_as="array", paged=None, sinks=None)
    arrays, _ = make_inputs(reference_backend, c)
    lengths = np.asarray(c["lengths"], dtype=np.int32)
    kwargs = dict(cache_seqlens=lengths, causal=c["causal"], layout=c["layout"])
    b, s, d = (0, 2, 3) if c["layout"] == "bhsd" else (0, 1, 3)  # batch, sequence, head-dim axes
    if corruption == "q rank":
        arrays["q"] = arrays["q"][0]
    elif corruption == "cache batch":
        arrays["k_cache"] = np.concatenate([arrays["k_cache"]] * 2, axis=b)
    elif corruption == "cache heads":
        h = 1 if c["layout"] == "bhsd" else 2
        arrays["k_cache"] = arrays["v_cache"] = np.concatenate([arrays["k_cache"]] * 3, axis=h)
        if c["heads_q"] % (3 * c["heads_k"]) == 0:  # still a valid GQA split: break it differently
            arrays["q"] = arrays["q"][..., :0]
    elif corruption == "head dim":
        arrays["k_cache"] = np.concatenate([arrays["k_cache"]] * 2, axis=d)
    elif corruption == "v_cache length":
        shape = list(arrays["v_cache"].shape)
        shape[s] += 1
        arrays["v_cache"] = np.zeros(shape, dtype=arrays["v_cache"].dtype)
    elif corruption == "k_new alone":
        del arrays["v_new"]
    elif corruption == "k_new heads":
        h = 1 if c["layout"] == "bhsd" else 2
        arrays["k_new"] = arrays["v_new"] = np.concatenate([arrays["k_new"]] * 2, axis=h)
    elif corruption == "too many new":
        shape = list(arrays["k_new"].shape)
        shape[s] = c["seqlen_max"] + 1
        arrays["k_new"] = arrays["v_new"] = np.zeros(shape, dtype=arrays["k_new"].dtype)
    elif corruption == "lengths dtype":
        kwargs["cache_seqlens"] = lengths.astype(data.draw(st.sampled_from(("int64", "float32", "int16"))))
    elif corruption == "lengths shape":
        kwargs["cache_seqlens"] = np.concatenate([lengths, lengths])
    elif corruption == "lengths value":
        kwargs["cache_seqlens"] = lengths + np.int32(data.draw(st.sampled_from((-10**6, -1 - int(lengths.max()), c["seqlen_max"] + 1))))
    elif corruption == "lengths type":
        kwargs["cache_seqlens"] = data.draw(st.sampled_from(("x", 1.5, [1, 2], (1,), True, None)))
    elif corruption == "window":
        kwargs["window"] = data.draw(st.sampled_from(("x", 3, (1,), (1, 2, 3), (-2, 0), (0.5, 1), (True, 0))))
    elif corruption == "softcap":
        kwargs["softcap"] = data.draw(st.sampled_from(("x", -1.0, float("inf"), float("nan"), True)))
    elif corruption == "scale":
        kwargs["scale"] = data.draw(st.sampled_from(("x", 0.0, -1.0, float("inf"), float("nan"), True, 1e300)))
    elif corruption == "layout":
        kwargs["layout"] = data.draw(st.sampled_from(("sbhd", None, 3)))
    elif corruption == "causal":
        kwargs["causal"] = data.draw(st.sampled_from((1, "yes", None)))
    elif corruption == "return_lse":
        kwargs["return_lse"] = data.draw(st.sampled_from((1, "no", None)))
    elif corruption == "dtype":
        name = data.draw(st.sampled_from(("q", "k_cache", "v_cache", "k_new", "v_new")))
        arrays[name] = arrays[name].astype(data.draw(st.sampled_from(("float16", "float64", "int32"))))
    elif corruption == "read-only cache":
        arrays["k_cache"] = np.broadcast_to(arrays["k_cache"], arrays["k_cache"].shape)
    with pytest.raises((TypeError, ValueError)) as raised:
        xattn.attention_with_kvcache(**arrays, **kwargs)
    assert str(raised.value).startswith(ARGUMENTS), (corruption, str(raised.value))
