"""The Hopper (sm_90a) kernels: kernels_cuda/sm90/flash_fwd.cu and flash_bwd.cu (TMA, wgmma, warp
specialization).

Forward: `forward` has exactly the contract of xattn.cuda.forward; `supports` says whether a call
can run here (else it stays on the mma.sync kernel). Arrays arrive as (B, H, S, D) views, torch
tensors or CuPy arrays, any batch/head/row strides and D contiguous; each of q, k, v, out becomes a
tensor map (xattn/tma.py), the rest of the call one AttnParams block (kernels_common/params.h)
passed by value; packed varlen batches as (1, H, T, D) views with the cumulative lengths, sinks
folded in the epilogue. A row may run on a persistent grid (one CTA per SM walking the query
blocks, Row.persistent) from some query length on; packed batches never do. Not served here: paged keys (a tile would span pages: one copy per page),
an empty key sequence, views the copy engine cannot address (a base or a stride not a multiple of
16 bytes), head dims above 256, float32, and, in a packed batch at D64 without a causal edge, a
window, softcap and ALiBi all together (8 bytes of spills).

Backward: xattn.cuda's backward plan asks `supports_backward` and takes `plan_backward`'s launch in
place of the mma.sync dK/dV kernel; the delta / dq_accum-zeroing kernel before it and the dQ
conversion after it are the mma.sync path's own (kernels_cuda/flash_bwd_prep.cu). With
deterministic=True it computes dK and dV only (its dQ is summed by float32 reductions in any
order) and flash_bwd_dq.cu computes dQ. Not served here (the mma.sync kernels keep them): packed
varlen batches, head dims above 128 (dK and dV of 64 keys no longer fit in a
consumer's registers), head dims not a multiple of 8, float32, views the copy engine cannot
address, and windows, softcap or ALiBi at D64 (BwdRow.modifiers). Sinks need nothing of it.
"""

from __future__ import annotations

from typing import NamedTuple

from xattn import cuda, kernels, launch, tma

# The entry points, their launch constants and shared memory: kernels.cuda("flash_fwd_sm90") and
# kernels.cuda("flash_bwd_sm90") (xattn/kernels.py).
ARCH = 90
SMEM_LIMIT = 227 * 1024  # dynamic shared memory one block may opt into on sm_90


class Row(NamedTuple):
    """One row of the tile table: the padded head dim, the masking class, and the tiles."""
    head_dim: int
    causal: bool      # rows used when the band has a right edge (causal, or a window's right side)
    block_n: int      # keys per tile
    stages: int       # K/V tiles in flight
    overlap: int = 1  # softmax of tile j under P V of tile j - 1 (OVERLAP there)
    pingpong: int = 1  # the two consumer warpgroups take turns on the tensor cores (PINGPONG there)
    persistent: int = 0  # query lengths from which one CTA per SM walks the query blocks
                         # (PERSISTENT there; 0: never; never for a packed batch, which keeps one
                         # CTA per query block of each sequence)
    max_seqlen: int = 0  # the longest query length the row serves (0: any); such a row comes
                         # before the row of its class that serves the longer ones
    softmax_under_pv: bool = False  # with overlap: the loop waits for P V after the softmax, which
                                    # then runs under it (else OVERLAP_WAIT_LATE there)
    rescale_slack: int = 0  # how far (base 2) a row's running max may rise before O is rescaled
                            # (RESCALE_SLACK there; 0: at every rise)


# Smallest head dim first; a head dim runs on the first row at least as wide (the copy engine
# zero-fills the columns past it). fp16 and bf16 share rows. Tiles and overlaps: the best of
# ci/sm90_fwd_check.py --phase tune on an H200 (bf16, S = 8192, ci/results/2026-11-30-sm90-fwd/).
# D192 (not tuned on a device yet): the widest key tile that fits two stages (112; 128 would need
# 241 KB), overlap and pingpong on; it replaces the D256 row's 33% of padded work at D 129-192.
# D64 without a causal edge: 128-key tiles on the persistent grid since the tune at S 1024-8192
# (ci/results/2026-11-30-session5/: +32% at S 1024, +16% at 2048, +6% at 4096, -1% at 8192
# against the 192-key overlapped tile tuned at 8192 alone; one timing per candidate).
# Persistent grid: where it won in ci/results/2026-11-30-sm90-persist/ (bf16, S 1024-8192, one
# run, against the same rows without it): causal D64 +10-16% at every length, causal D256 +4-8%
# from S 2048 (-7% at 1024), causal D128 +4% from S 4096 (-4% at 1024-2048); the non-causal rows
# were level or slower (D64 -5% at S 4096-8192), D192 was not measured.
# D128 up to S 2048: 128-key tiles on the persistent grid, against the 176-key rows in one process
# (ci/results/2026-11-30-session8/, bf16): +4% / +3% at S 1024 / 2048 without a causal edge, +11%
# / +5% with one; level at S 4096, 1-2% behind at 8192.
# softmax_under_pv: the D256 rows, against the wait placed as before in one process
# (ci/results/2026-11-30-session8/): +4% / +9% at S 2048 / 8192 without a causal edge, -3% / +6%
# with one; the D128 rows lost up to 6% with it (128-key short row -5% at S 2048, causal 176-key
# row -6% at S 8192: not understood). Session 9 (ci/results/2026-12-01-session9/, call 1, same
# rotated rounds): D192 +4% / +1% at S 2048 / 8192 without a causal edge, +1% / +1% with one; D64
# with a causal edge, overlapped with the softmax under P V against the plain row, +6% / +8% (0.93
# / 1.00 of cuDNN), while without one every overlapped D64 candidate lost 2-6%.
# Those comparisons timed each candidate with do_bench one after another, where two launches of one
# kernel differed by up to 7%. Timed in turns (xattn.bench.in_turns, where they agree
# within 0.3%; ci/results/2026-12-01-session10/, call 7, S 2048 / 4096 / 8192): the D128 rows gain
# with the softmax under P V after all, +3.3 / +2.5 / +2.7% without a causal edge and +1.6% at
# S 2048 with one, where the 128-key pingpong row on the persistent grid with it also beats the
# 176-key row at S 4096 (+2.3%) and ties at 8192, so one causal D128 row serves every length; D64
# without a causal edge gains 1% with three stages; no other candidate gained (three stages at
# D128: -0.5%; at causal D64: -5%).
# rescale_slack 8 (lazy rescaling: O and l rescaled only when a row's max rises by more than 8 in
# base 2, and not at all by a warp whose rows all kept theirs), in turns against the same rows
# without it (ci/results/2026-12-01-session11/, call 2, bf16, S 2048 / 8192): D256 +6% / +6%, causal
# +4% / +5%; D128 +1% / +0.3%, causal +2% / +4%; causal D64 -5% / -4% and D64 level, so the D64
# rows keep rescaling at every rise. D192 (call 10): +2.6-3.0% without a causal edge, +2.5-3.6% with
# one, S 1024-8192.
# With it, the tiles again (call 7, each candidate pinned as the only row, in turns, S 1024-8192):
# D128 without a causal edge, 128-key tiles with pingpong on one CTA per query block beat both
# earlier rows (128-key persistent up to S 2048, 176-key beyond) at every length but S 8192 (tied):
# +3% / +2% / +2.5% at S 1024 / 2048 / 4096, so one row serves it; causal D128 without pingpong
# +0.4% / +0.7% / +2% at S 2048 / 4096 / 8192, -1% at S 1024; D256 without a causal edge with
# pingpong +1.3% / +0.7% / +0.5% / 0% at S 1024-8192. Every other candidate lost.
ROWS = (
    Row(64, False, 128, 3, overlap=0, pingpong=0, persistent=1), Row(64, True, 128, 2, overlap=1, pingpong=0, persistent=1, softmax_under_pv=True),
    Row(128, False, 128, 2, softmax_under_pv=True, rescale_slack=8),
    Row(128, True, 128, 2, pingpong=0, persistent=1, softmax_under_pv=True, rescale_slack=8),
    Row(192, False, 112, 2, softmax_under_pv=True, rescale_slack=8), Row(192, True, 112, 2, softmax_under_pv=True, rescale_slack=8),
    Row(256, False, 80, 2, softmax_under_pv=True, rescale_slack=8),
    Row(256, True, 80, 2, persistent=2048, softmax_under_pv=True, rescale_slack=8),
)


def select(head_dim: int, causal: bool, seqlen_q: int = 0) -> Row | None:
    """The row of a call; seqlen_q 0: the first row of the head dim and class (supports() asks
    only whether one exists)."""
    return next((r for r in ROWS if r.head_dim >= head_dim and r.causal == causal
                 and not (r.max_seqlen and seqlen_q > r.max_seqlen)), None)


# ---- what runs here ----------------------------------------------------------------------------------

def supports(q, k, v, out, lse, *, causal: bool = False, window=(-1, -1), softcap: float = 0.0,
             alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> bool:
    """Whether this call (forward's arguments) can run on the sm90 kernel: a compute capability
    9.0 device, fp16/bf16, head dim <= 256, keys present, and q, k, v, out addressable by the
    copy engine (16-byte aligned bases and strides). Packed batches: (1, H, T, D) views with
    cu_seqlens and max_seqlen (never paged keys: xattn.cuda keeps those)."""
    varlen = cu_seqlens is not None
    arrays = [launch.describe(a) for a in (q, k, v, out)]
    Q = arrays[0]
    if Q.dtype not in ("float16", "bfloat16") or any(a.dtype != Q.dtype for a in arrays):
        return False
    if cuda._arch(Q.device) != ARCH:
        return False
    left, right = window
    if causal:
        right = 0
    row = select(Q.shape[3], right >= 0)
    if row is None or arrays[1].shape[2] == 0:
        return False
    if varlen and row.head_dim == 64 and right < 0 and left >= 0 and softcap and alibi_slopes is not None:
        return False  # ptxas spills 8 bytes in that one variant
    return all(tma.expressible(a.ptr, a.dtype, a.shape, a.strides) for a in arrays if a.shape[2] > 0)


def forward(q, k, v, out, lse, *, causal: bool, scale: float, stream: int, window=(-1, -1),
            softcap: float = 0.0, alibi_slopes=None, cu_seqlens=None, max_seqlen=None,
            sinks=None, ctas: int | None = None) -> None:
    """xattn.cuda.forward on the sm90 kernel, for calls that supports() accepts: out =
    softmax(scale * q k^T + modifiers) v and lse for (B, H, S, D) views. ctas: a persistent grid
    of at most this many CTAs whatever the row says (not for a packed batch); the checks use a
    few, so that every CTA walks many query blocks. None: the row's grid, persistent ones with one
    CTA per SM."""
    varlen = cu_seqlens is not None
    Q, K, V, O, L = (launch.packed(launch.describe(a), varlen) for a in (q, k, v, out, lse))
    batch = cu_seqlens[0].shape[0] - 1 if varlen else Q.shape[0]
    if batch == 0 or Q.shape[1] == 0 or Q.shape[2] == 0:
        return
    slopes = launch.describe(alibi_slopes) if alibi_slopes is not None else None
    step = plan(Q, K, V, O, L, causal=causal, scale=scale, window=window, softcap=softcap,
                slopes=slopes, batch=batch, max_seqlen=max_seqlen if varlen else None,
                sinks=sinks is not None, ctas=ctas)
    pointers = {"q": Q.ptr, "k": K.ptr, "v": V.ptr, "o": O.ptr, "lse": L.ptr}
    if slopes is not None:
        pointers["alibi_slopes"] = slopes.ptr
    if varlen:
        pointers["cu_seqlens_q"], pointers["cu_seqlens_k"] = (launch.describe(c).ptr for c in cu_seqlens)
    if sinks is not None:
        pointers["sinks"] = launch.describe(sinks).ptr
    cuda._run((step,), pointers, stream, Q.device)


def plan(Q, K, V, O, L, *, causal, scale, window, softcap, slopes, batch=None, max_seqlen=None,
         sinks=False, ctas=None):
    """The launch of one call signature (launch.Launch): the table row, the compiled kernel, four
    tensor maps of its own (q, k, v and out; re-pointed when a pointer changes) and the AttnParams
    block. The _Arrays' pointers only shape the maps: a call patches its own. A packed batch:
    max_seqlen = (longest query, longest key sequence) and batch its number of sequences; sinks:
    the call has them (their pointer is patched per call); ctas: forward's."""
    heads_q, seqlen_q, head_dim = Q.shape[1], Q.shape[2], Q.shape[3]
    heads_k, seqlen_k = K.shape[1], K.shape[2]
    varlen = max_seqlen is not None
    if varlen:
        seqlen_q, seqlen_k = max_seqlen
    batch = Q.shape[0] if batch is None else batch
    if heads_q > launch.MAX_GRID_YZ:
        raise ValueError(f"q: at most {launch.MAX_GRID_YZ} heads are supported, got {heads_q}")
    left, right = window
    if causal:
        right = 0
    row = select(head_dim, right >= 0, seqlen_q)
    if row is None:
        raise ValueError(f"q: head dim {head_dim} has no sm90 row (at most {ROWS[-1].head_dim})")
    var = launch.variant(causal=causal, scale=scale, window=window, softcap=softcap,
                        alibi_slopes=slopes, varlen=varlen, seqlen_q=seqlen_q,
                        seqlen_k=seqlen_k, heads_per_kv=heads_q // heads_k)
    block = cuda._attn_params(var, {"q": Q, "k": K, "v": V, "o": O, "lse": L}, heads_q=heads_q,
                              head_dim=head_dim)
    maps = [(name, tma.plan_map(a.ptr, a.dtype, a.shape, a.strides, rows, a.device), tma.repoint)
            for name, a, rows in (("q", Q, kernels.SM90_BLOCK_M), ("k", K, row.block_n),
                                  ("v", V, row.block_n), ("o", O, kernels.SM90_STORE_ROWS))]
    kernel = kernels.cuda("flash_fwd_sm90")
    blocks = -(-seqlen_q // kernels.SM90_BLOCK_M) * heads_q * batch
    persistent = ctas is not None or (row.persistent and seqlen_q >= row.persistent)
    flags = var.defines | {"HAS_SINKS": int(sinks),
                           "PERSISTENT": int(persistent and blocks < MAX_PERSISTENT_BLOCKS)}
    variants = forward_variants(row, Q.dtype, flags)
    defines = next((d for d in variants if not kernel.compile(d, Q.device).local_size_bytes), variants[0])
    sizes = kernels.Sizes(seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q, heads_k=heads_k,
                          batch=batch, resident=min(launch.multiprocessors(Q.device), ctas or 2**31))
    if defines.get("PERSISTENT"):  # the CTAs walk the batch themselves: none in gridDim.z
        block["batch"] = batch
        batch = 1
    return kernel.launch(defines, sizes, block, batch, Q.device, maps=maps)


def forward_variants(row: Row, dtype: str, flags: dict) -> list[dict]:
    """The defines of a call's forward kernel, then the simpler variants it falls back to, in
    order, where it spills (local memory; plan takes the first that does not, and
    ci/compile_kernels.py checks the same): the wait for P V right after the softmax
    (OVERLAP_WAIT_LATE: the softmax then no longer runs under that P V, and fewer registers are
    live; softcap and ALiBi variants of the D128 and D256 rows need it with ptxas of NVRTC 13.x),
    one CTA per query block (the walk's registers), both."""
    kernel = kernels.cuda("flash_fwd_sm90")
    own = kernel.defines(row, dtype, flags=flags)
    late = {"OVERLAP_WAIT_LATE": 1} if row.overlap and row.softmax_under_pv else None
    flat = kernel.defines(row, dtype, flags=flags | {"PERSISTENT": 0}) if own.get("PERSISTENT") else None
    return [d for d in (own, late and own | late, flat, flat and late and flat | late) if d]


# A persistent grid counts its work units in 32-bit ints, stepping by the grid's size past the last.
# It has one CTA per SM (resident): a CTA takes most of an SM's shared memory.
MAX_PERSISTENT_BLOCKS = 2**31 - 2**20


# ---- the backward ---------------------------------------------------------------------------------

class BwdRow(NamedTuple):
    """One row of the backward's tile table: the padded head dim, the masking class, the tiles."""
    head_dim: int
    causal: bool  # rows used when the band has a right edge (causal, or a window's right side)
    block_m: int  # queries per step: 64 (dQ split by columns between the consumers) or 128 (by rows)
    stages: int   # Q/dO stages in flight
    modifiers: bool  # windows, softcap and ALiBi compile without spills (else declined)
    dq_tma: bool  # dQ added into dq_accum by a TMA reduce-add from shared memory (else red.global)
    block_n: int = 128  # keys per CTA: 64 per consumer, or 64 shared by both (above D128)
    early_scores: bool = True  # the next step's S^T issued under this step's dQ (flash_bwd.cu)
    local_bytes: int = 0  # local memory (spills) ptxas gives this row's kernel, measured worth it


# Smallest head dim first; a head dim runs on the first row at least as wide. D128 takes 64
# queries a step: S^T and dP^T (32 floats each), dK and dV (64 each) fill a consumer's registers.
# D64 takes 128, so that each consumer's half of dQ = dS K starts at a box of K (flash_bwd.cu);
# its S^T and dP^T are then 64 floats each, and the index arithmetic of a window, softcap or
# ALiBi spills 4-12 bytes (ptxas, 232 registers): those calls stay on the mma.sync kernel.
# dQ: the TMA reduce-add (dq_tma=True) at D128, which passed the checks and sanitizers (round 3 of
# ci/results/2026-11-30-sm90-bwd/) and was timed at 475-504 TFLOP/s against 409-426 with
# red.global (ci/results/2026-11-30-h200-round2/sm90_bwd_dq.log, bf16 S4096/8192); after the switch
# sm90_bwd_check's quick check passed 72/72 on it. At D64 it compiles without spills since the
# early S^T (NVRTC 13.0, the device's, run here on the CPU: every dtype, with and without dQ), except
# with a causal edge: 8 bytes (two values of the step cursor) stored and reloaded once a step of 128
# queries. Measured in one process (ci/results/2026-12-01-session9/, call 2, bf16, S 4096/8192):
# non-causal 427/435 TFLOP/s against 370/379 with red.global (+15%, 1.00/0.94 of cuDNN); causal,
# timed in turns (ci/results/2026-12-01-session10/, call 9), 397/432 with the spill against 354/380
# with red.global (+12%/+14%), so the causal D64 row takes the TMA reduce-add and its spill
# (local_bytes: what the compile checks accept for it; every other row has none). Head dims 129-256 take
# the D256 row: its consumers share 64 keys a CTA and split the head dim (flash_bwd.cu, "Head dims
# above 128"); with sK, sV and two Q/dO stages it uses 226 KB of shared memory, so dQ takes
# red.global. D129-192 pad to 256 columns there (a D192 row would split three boxes unevenly).
# early_scores (the next step's S^T under this step's dQ): D64 gained 1-4%, D128 lost 1-4% (bf16
# S 4096/8192, both variants in one process: ci/results/2026-11-30-session8/): its dQ goes through
# shared memory, which the early S^T (both operands there) then competes for; D64's does not.
BWD_ROWS = (
    BwdRow(64, False, 128, 2, modifiers=False, dq_tma=True),
    BwdRow(64, True, 128, 2, modifiers=False, dq_tma=True, local_bytes=8),
    BwdRow(128, False, 64, 2, modifiers=True, dq_tma=True, early_scores=False),
    BwdRow(128, True, 64, 2, modifiers=True, dq_tma=True, early_scores=False),
    BwdRow(256, False, 64, 2, modifiers=True, dq_tma=True, block_n=64),
    BwdRow(256, True, 64, 2, modifiers=True, dq_tma=True, block_n=64),
)


def select_backward(head_dim: int, causal: bool) -> BwdRow | None:
    return next((r for r in BWD_ROWS if r.head_dim >= head_dim and r.causal == causal), None)


def supports_backward(Q, K, V, dO, dQ, dK, dV, defines: dict, *, varlen: bool,
                      aligned: bool) -> bool:
    """Whether a backward on a compute capability 9.0 device (xattn.cuda asks only there) runs on
    flash_bwd.cu, from its launch.Array views ((B, H, S, D)) and launch.variant's masks and
    modifiers (defines): fp16/bf16, a row for the head dim (<= 256, a multiple of 8: dQ's float32
    pairs stay 8-byte aligned) that serves the call's modifiers (packed batches too: varlen), and
    every tensor the kernel reads or writes by TMA addressable by the copy engine (deterministic
    calls too: there it computes dK and dV only, plan_backward). aligned: the plan's pointers
    are 16-byte aligned for every call it serves (its cache key says so). Sinks need nothing
    here: the forward's lse holds them."""
    if not aligned:
        return False
    arrays = (Q, K, V, dO, dQ, dK, dV)
    if Q.dtype not in ("float16", "bfloat16") or any(a.dtype != Q.dtype for a in arrays):
        return False
    head_dim = Q.shape[3]
    row = select_backward(head_dim, bool(defines["IS_CAUSAL"]))
    if head_dim % 8 or row is None:
        return False
    if not row.modifiers and (defines["IS_LOCAL"] or defines["HAS_SOFTCAP"] or defines["HAS_ALIBI"]):
        return False
    if varlen and row.head_dim == 64:  # ptxas spills 24 bytes in the D64 rows' packed-batch variant
        return False
    return all(tma.expressible(a.ptr, a.dtype, a.shape, a.strides) for a in (Q, K, V, dO, dK, dV))


def plan_backward(Q, K, V, dO, dK, dV, accum, block, var: "launch.Variant", batch: int):
    """The launch of flash_bwd.cu for one backward signature: the row, the compiled kernel, its
    own tensor maps (q, k, v, dout loaded; dk, dv stored; dq_accum, float32, reduced into;
    re-pointed when a pointer changes) and `block`, the AttnParams block xattn.cuda built for the
    whole backward (delta and dq_accum included). accum: dq_accum's launch.Array (its pointer is
    the per-call scratch's, unknown here), or None for dK and dV only (COMPUTE_DQ = 0: dQ comes
    from another kernel, deterministic=True)."""
    heads_k, head_dim = K.shape[1], Q.shape[3]
    causal_rows = bool(var.defines["IS_CAUSAL"])
    row = select_backward(head_dim, causal_rows)
    keys, stores = row.block_n, kernels.SM90_STORE_ROWS
    mapped = [("q", Q, row.block_m), ("k", K, keys), ("v", V, keys), ("dout", dO, row.block_m),
              ("dk", dK, stores), ("dv", dV, stores)]
    if accum is not None:
        # the D256 row's warps reduce 16-row boxes of their own
        by_box = kernels.sm90_dq_by_box(row.block_n, row.dq_tma, compute_dq=True)
        mapped.append(("dq_accum", accum._replace(ptr=accum.ptr or tma.PLACEHOLDER_PTR,
                                                  strides=accum.strides[:3] + (1,)),
                       kernels.SM90_WARP_ROWS if by_box else stores))
    maps = [(name, tma.plan_map(a.ptr, a.dtype, a.shape, a.strides, rows, a.device), tma.repoint)
            for name, a, rows in mapped]
    kernel = kernels.cuda("flash_bwd_sm90")
    defines = kernel.defines(row, Q.dtype, flags=var.defines, compute_dq=accum is not None)
    # the grid covers the longest key sequence (a packed batch's K has every sequence's rows)
    sizes = kernels.Sizes(seqlen_k=var.options["seqlen_k"], heads_k=heads_k)
    return kernel.launch(defines, sizes, block, batch, Q.device, maps=maps)
