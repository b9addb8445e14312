"""The vendor-neutral launch layer (xattn/launch.py) on the CPU, with stand-ins for CuPy and the
driver (conftest.py's stand_in_launches): what reaches the driver for one Launch."""

from __future__ import annotations

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
