"""The vendor-neutral launch layer (xattn/launch.py) on the CPU, with stand-ins for CuPy and the
driver (conftest.py's stand_in_launches): what reaches the driver for one Launch, one Sequence, and
the CUDA backward's and decode's plans, also from several threads at once."""

from __future__ import annotations

import threading
import types
import time

import pytest

from xattn import kernels, launch, params


def _launch(recorder, batch: int) -> launch.Launch:
    kernel = recorder.compile(kernels.hip("flash_fwd_portable"), {}, 0)
    block = params.attn_params()
    block["heads_q"] = 3
    return launch.Launch(launch.function(kernel, 0, 1024), (5, 3), batch, 128, 1024, block)


def test_a_launch_patches_its_pointers_and_chunks_the_batch(stand_in_launches):
    """A batch past gridDim.z's 65535 goes in chunks, each chunk's first entry in the block's
    batch_offset (the driver copies the parameters at each launch); the pointers given are patched
    into their fields, the others stay as they were, and batch_offset is 0 again afterwards."""
    batch = 2 * launch.MAX_GRID_YZ + 3
    step = _launch(stand_in_launches, batch)
    step({"q": 0x1000, "lse": 0x2000, "cu_seqlens_k": 0x3000}, 9)
    launched = stand_in_launches.launches
    assert [x.grid for x in launched] == [(5, 3, launch.MAX_GRID_YZ), (5, 3, launch.MAX_GRID_YZ), (5, 3, 3)]
    assert [int(x.block[0]["batch_offset"]) for x in launched] == [0, launch.MAX_GRID_YZ, 2 * launch.MAX_GRID_YZ]
    for x in launched:
        p = x.block[0]
        assert (p["q"]["ptr"], p["lse"]["ptr"], p["cu_seqlens_k"]) == (0x1000, 0x2000, 0x3000)
        assert p["k"]["ptr"] == p["cu_seqlens_q"] == 0 and p["heads_q"] == 3
        assert (x.threads, x.smem, x.stream) == (128, 1024, 9)
    assert step.block[0]["batch_offset"] == 0


def test_a_small_batch_is_one_launch(stand_in_launches):
    step = _launch(stand_in_launches, 7)
    step({"o": 0x40}, 0)
    step({"o": 0x80}, 0)  # the next call's pointer replaces the last one
    first, second = stand_in_launches.launches
    assert first.grid == second.grid == (5, 3, 7)
    assert (first.block[0]["o"]["ptr"], second.block[0]["o"]["ptr"]) == (0x40, 0x80)


def test_a_sequence_patches_each_block_once_and_launches_in_order(stand_in_launches):
    """A plan's launches as one Sequence: two launches on one shared block and one on its own
    block each see the call's pointers and scalars, in the order given."""
    kernel = stand_in_launches.compile(kernels.hip("flash_fwd_portable"), {}, 0)
    shared, own = params.attn_params(), params.attn_params()
    steps = [launch.Launch(launch.function(kernel, 0, 0), (grid, 1), 1, 64, 0, block)
             for grid, block in ((1, shared), (2, own), (3, shared))]
    sequence = launch.Sequence(steps)
    assert len(sequence.blocks) == 2
    sequence({"q": 0x100, "dq": 0x200}, 4, {"seqlen_q": 11})
    launched = stand_in_launches.launches
    assert [x.grid[0] for x in launched] == [1, 2, 3]
    for x in launched:
        p = x.block[0]
        assert (p["q"]["ptr"], p["dq"]["ptr"], p["seqlen_q"], x.stream) == (0x100, 0x200, 11, 4)


def _slow_driver(monkeypatch, recorder):
    """The stand-in driver, pausing before each launch reads its block: another thread that
    patched the block in between would show in the recorded bytes."""
    record = recorder.launchKernel

    def launch_kernel(*arguments):
        time.sleep(0.0002)
        record(*arguments)

    monkeypatch.setattr(recorder, "launchKernel", launch_kernel)


def _run_in_threads(calls: int, threads: int, run) -> None:
    """run(tag) from `threads` threads at once, `calls` times each, tags unique per call."""
    start = threading.Barrier(threads)
    errors = []

    def worker(index):
        try:
            start.wait()
            for i in range(calls):
                run(1 + index * calls + i)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors


def test_threads_sharing_a_sequence_never_interleave_their_patches(stand_in_launches, monkeypatch):
    """Several threads running one Sequence (launches sharing a block, as a plan's are): every
    launch sees the pointers and scalars of its own call only, and a call's launches go out
    together, in order."""
    _slow_driver(monkeypatch, stand_in_launches)
    kernel = stand_in_launches.compile(kernels.hip("flash_fwd_portable"), {}, 0)
    shared, own = params.attn_params(), params.attn_params()
    sequence = launch.Sequence([launch.Launch(launch.function(kernel, 0, 0), (grid, 1), 1, 64, 0, block)
                                for grid, block in ((1, shared), (2, own), (3, shared))])
    _run_in_threads(8, 4, lambda tag: sequence({"q": 0x100 * tag, "dq": 0x100 * tag + 8}, tag,
                                               {"seqlen_q": tag}))
    launched = stand_in_launches.launches
    assert len(launched) == 3 * 8 * 4
    for first in range(0, len(launched), 3):
        call = launched[first:first + 3]
        tag = call[0].stream
        assert [x.grid[0] for x in call] == [1, 2, 3] and {x.stream for x in call} == {tag}
        for x in call:
            p = x.block[0]
            assert (p["q"]["ptr"], p["dq"]["ptr"], p["seqlen_q"]) == (0x100 * tag, 0x100 * tag + 8, tag)


def test_cuda_backward_plans_one_sequence_that_threads_share(stand_in_launches, monkeypatch):
    """xattn.cuda.backward (the array path) on the CPU with stand-ins for CuPy, the compiler and
    the driver: its plan is one Sequence over the delta, dK/dV and dQ launches on two blocks (the
    row-wise kernels' and the others'), the grids, threads and shared memory of the table rows'
    descriptions; threads sharing the plan each launch with their own pointers."""
    torch = pytest.importorskip("torch")
    from xattn import configs, cuda

    monkeypatch.setattr(kernels.Kernel, "compile", stand_in_launches.compile)
    monkeypatch.setattr(cuda, "_arch", lambda device: 80)
    monkeypatch.setattr(launch, "_plans", {})
    b, hq, hk, sq, sk, d = 2, 4, 2, 70, 90, 64
    q, out, dout = (torch.zeros(b, hq, sq, d, dtype=torch.float16) for _ in range(3))
    k, v = (torch.zeros(b, hk, sk, d, dtype=torch.float16) for _ in range(2))
    lse = torch.zeros(b, hq, sq)

    def backward(tag):  # each call its own gradients: their pointers tell the calls apart
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        cuda.backward(q, k, v, out, dout, lse, dq, dk, dv, causal=True, scale=0.125,
                      deterministic=False, stream=tag)
        return dq.data_ptr(), dk.data_ptr(), dv.data_ptr()

    backward(1)
    [(steps, _)] = launch._plans.values()
    [sequence] = steps
    assert isinstance(sequence, launch.Sequence) and len(sequence.blocks) == 2
    launched = stand_in_launches.launches
    assert [x.kernel.entry for x in launched] == ["flash_bwd_preprocess", "flash_bwd_dkdv",
                                                 "flash_bwd_convert_dq"]
    dkdv_row = configs.select("flash_bwd_dkdv", 80, d, True)
    prep, dkdv, convert = launched
    assert prep.grid == convert.grid == (-(-sq // (kernels.PREP_WARPS * kernels.PREP_ROWS_PER_WARP)), hq, b)
    assert dkdv.grid == (-(-sk // dkdv_row.block_n), hk, b) and dkdv.threads == dkdv_row.warps * 32
    assert dkdv.smem == dkdv.kernel.shared_memory(dkdv.defines) > 0 and prep.smem == 0
    assert dkdv.defines["BLOCK_M"] == dkdv_row.block_m and dkdv.defines["COMPUTE_DQ"] == 1

    _slow_driver(monkeypatch, stand_in_launches)
    grads = {}
    _run_in_threads(4, 3, lambda tag: grads.__setitem__(tag, backward(tag)))
    calls = stand_in_launches.launches[3:]
    assert len(calls) == 3 * 4 * 3 and len(launch._plans) == 1  # one plan, shared
    for first in range(0, len(calls), 3):
        call = calls[first:first + 3]
        tag = call[0].stream
        assert {x.stream for x in call} == {tag}
        dq, dk, dv = grads[tag]
        for x in call[1:]:  # dK/dV and the dQ conversion: the main block
            p = x.block[0]
            assert (p["dk"]["ptr"], p["dv"]["ptr"], p["dq"]["ptr"]) == (dk, dv, dq), tag
        assert call[0].block[0]["dq"]["ptr"] == dq  # the row-wise kernels' block too


def test_kvcache_plans_patch_their_block_through_one_sequence(stand_in_launches, monkeypatch):
    """The CUDA decode's plan (kvcache._new_plan) on the CPU with stand-ins: the decode and the
    merge launch through one Sequence on one DecodeParams block; a plan of another uniform length
    (with_uniform) shares it and passes its length as a per-call scalar, and threads running the
    plans at once each launch with their own pointers and length."""
    torch = pytest.importorskip("torch")
    from xattn import kvcache

    monkeypatch.setattr(kernels.Kernel, "compile", stand_in_launches.compile)
    monkeypatch.setattr(kvcache, "_device", lambda device: (80, 4))
    monkeypatch.setattr(kvcache, "_FORCED_SPLITS", 3)
    monkeypatch.setattr(launch, "torch_stream", lambda device: 0)
    kvcache.num_splits.cache_clear()
    b, hq, hk, smax, d = 2, 4, 2, 256, 64
    q = torch.zeros(b, hq, 1, d, dtype=torch.float16)
    kc, vc = (torch.zeros(b, hk, smax, d, dtype=torch.float16) for _ in range(2))
    try:
        call = kvcache._validate(q, kc, vc, 17, None, None, True, None, None, None, "bhsd", True)
        plan = kvcache._new_plan(q, kc, vc, 17, None, None, None, None, call)
        assert isinstance(plan.launches, launch.Sequence) and len(plan.launches.blocks) == 1
        decode, merge = plan.launches.launches
        assert decode.block is merge.block is plan.params

        def run(tag):
            out, lse = torch.empty(b, hq, 1, d, dtype=torch.float16), torch.empty(b, hq, 1)
            part = torch.empty(plan.workspace_floats)
            other = plan.with_uniform(tag)
            assert other.launches is plan.launches
            other.run(q, kc, vc, tag, None, None, None, None, outputs=(out, lse, part))
            return out.data_ptr(), part.data_ptr()

        _slow_driver(monkeypatch, stand_in_launches)
        pointers = {}
        _run_in_threads(5, 3, lambda tag: pointers.__setitem__(tag, run(tag)))
    finally:
        kvcache.num_splits.cache_clear()
    launched = stand_in_launches.launches
    assert [x.kernel.entry for x in launched] == ["flash_decode", "flash_decode_merge"] * 15
    for first in range(0, len(launched), 2):
        call = launched[first:first + 2]
        tags = {int(x.block[0]["uniform_seqlen"]) for x in call}
        assert len(tags) == 1
        [tag] = tags
        out, part = pointers[tag]
        for x in call:
            p = x.block[0]
            assert (p["o"]["ptr"], p["o_part"], p["cache_seqlens"]) == (out, part, 0), tag
    merge_row = launched[1]
    assert merge_row.threads == kernels.MERGE_WARPS * 32
    assert merge_row.grid == (-(-hq // kernels.MERGE_WARPS), 1, b)


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_backward_plan_on_hopper(stand_in_launches, monkeypatch, deterministic):
    """On compute capability 9.0 the backward plan's dK/dV launch is the sm90 kernel (seen by
    xattn.cuda.sm90_backward_planned, which tests and checks use), deterministic or not:
    deterministic=True builds it without dQ (COMPUTE_DQ = 0, no dq_accum map) and flash_bwd_dq.cu
    follows; otherwise it reduces dQ into dq_accum and the conversion follows. Planned on the CPU
    (stand-ins for the compiler and the tensor maps), not launched."""
    torch = pytest.importorskip("torch")
    from xattn import cuda, tma

    monkeypatch.setattr(kernels.Kernel, "compile", stand_in_launches.compile)
    monkeypatch.setattr(cuda, "_arch", lambda device: 90)
    monkeypatch.setattr(cuda, "_run", lambda *args: None)
    monkeypatch.setattr(launch, "_plans", {})
    monkeypatch.setattr(tma, "plan_map", lambda *args, **kwargs: types.SimpleNamespace(getPtr=lambda: 0))
    b, hq, hk, s, d = 2, 4, 2, 200, 128
    q, out, dout = (torch.zeros(b, hq, s, d, dtype=torch.bfloat16) for _ in range(3))
    k, v = (torch.zeros(b, hk, s, d, dtype=torch.bfloat16) for _ in range(2))
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    cuda.backward(q, k, v, out, dout, torch.zeros(b, hq, s), *grads, causal=True, scale=0.125,
                  deterministic=deterministic, stream=0)

    assert cuda.sm90_backward_planned()
    [(sequences, _)] = launch._plans.values()
    steps = [step for sequence in sequences for step in sequence.launches]
    compiled = [stand_in_launches.kernels[step.handle] for step in steps]
    assert [kernel.entry for kernel, _ in compiled] == [
        "flash_bwd_preprocess", "flash_bwd_sm90", "flash_bwd_dq" if deterministic else "flash_bwd_convert_dq"]
    hopper, defines = steps[1], compiled[1][1]
    assert defines["COMPUTE_DQ"] == int(not deterministic)
    assert [m[0] for m in hopper.maps] == ["q", "k", "v", "dout", "dk", "dv"] + ([] if deterministic else ["dq_accum"])
    assert hopper.smem == compiled[1][0].shared_memory(defines)
