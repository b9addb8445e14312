"""The WMMA fragment index mapping (kernels_hip/wmma.h), checked on the CPU against a NumPy model of
v_wmma_f32_16x16x16_{f16,bf16} in both of its register layouts: gfx11 (RDNA3, 16-element operands
repeated over the two halves of the wave, accumulator rows interleaved between them) and gfx12
(RDNA4, 8-element operands, each half of the wave holding half of k and of the rows).

No RDNA GPU is available, so the part of the matrix-core kernels that cannot run elsewhere --
which lane holds which element of which operand -- is tested here, as tests/test_hip_mfma_layout.py
does for MFMA. The model is written from the layouts documented for the two generations (RDNA3 and
RDNA4 ISA guides; AMD GPUOpen's WMMA articles), restated at the top of wmma.h. The kernel's mapping
is not mirrored by hand: the one-line index functions are read from wmma.h and evaluated with
WMMA_GFX12 = 0 and 1.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import decode_model
from decode_model import MatrixCore, check_split_decode
from xattn import configs

ROOT = Path(__file__).resolve().parents[1]
LANES = 32
LAYOUTS = {"gfx11": 0, "gfx12": 1}


# ---- the instruction, from the documented layouts ------------------------------------------------

def operand_index(gfx12: int, lane: int, i: int):
    """A (16 x 16): lane l, element i -> (row, k); B is laid out as A transposed (column, k)."""
    if gfx12:
        return lane % 16, 8 * (lane // 16) + i
    return lane % 16, i  # lanes 16..31 repeat lanes 0..15


def acc_index(gfx12: int, lane: int, j: int):
    """C, D (16 x 16): lane l, element j -> (row, column)."""
    return (8 * (lane // 16) + j if gfx12 else 2 * j + lane // 16), lane % 16


def operand_elems(gfx12: int) -> int:
    return 8 if gfx12 else 16


def wmma(gfx12: int, a_regs, b_regs, c_regs):
    """D = A B + C for one wave from per-lane registers: a_regs, b_regs (32, 16 or 8), c_regs
    (32, 8). On gfx11 both halves of the wave must agree on A and B (the hardware reads one)."""
    a = np.full((16, 16), np.nan)
    b = np.full((16, 16), np.nan)
    c = np.full((16, 16), np.nan)
    for lane in range(LANES):
        for i in range(operand_elems(gfx12)):
            row, k = operand_index(gfx12, lane, i)
            for m, regs, key in ((a, a_regs, (row, k)), (b, b_regs, (k, row))):
                if not np.isnan(m[key]):
                    assert m[key] == regs[lane, i], "the two halves of the wave disagree"
                m[key] = regs[lane, i]
        for j in range(8):
            c[acc_index(gfx12, lane, j)] = c_regs[lane, j]
    assert not (np.isnan(a).any() or np.isnan(b).any() or np.isnan(c).any()), "layout not onto"
    d = a @ b + c
    return np.array([[d[acc_index(gfx12, lane, j)] for j in range(8)] for lane in range(LANES)])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_layouts_cover_every_element(layout):
    gfx12 = LAYOUTS[layout]
    assert len({acc_index(gfx12, lane, j) for lane in range(LANES) for j in range(8)}) == 256
    cells = [operand_index(gfx12, lane, i) for lane in range(LANES) for i in range(operand_elems(gfx12))]
    assert len(set(cells)) == 256 and len(cells) == (512 if not gfx12 else 256)


# ---- the kernel's mapping, read from its source ------------------------------------------------

def _resolve_ternaries(expr: str) -> str:
    """C's `cond ? a : b` (cond a literal here) as Python's `(a if cond else b)`."""
    while "?" in expr:
        q = expr.index("?")
        # the condition: the literal just before '?'
        cond_start = q - 1
        while expr[cond_start - 1] not in "( ":
            cond_start -= 1
        cond = expr[cond_start:q].strip()
        depth, colon, end = 0, None, None
        for pos in range(q + 1, len(expr) + 1):
            ch = expr[pos] if pos < len(expr) else ")"
            if ch == "(":
                depth += 1
            elif ch == ")":
                if depth == 0:
                    end = pos
                    break
                depth -= 1
            elif ch == ":" and depth == 0 and colon is None:
                colon = pos
        then, other = expr[q + 1:colon].strip(), expr[colon + 1:end].strip()
        expr = f"{expr[:cond_start]}({then} if {cond} else {other}){expr[end:]}"
    return expr


def kernel_functions(gfx12: int) -> dict:
    """{name: python function} for wmma.h's one-line `int name(int a, ...) { return expr; }`."""
    text = (ROOT / "kernels_hip" / "wmma.h").read_text()
    pattern = re.compile(r"__device__ __forceinline__ int (\w+)\(([^)]*)\) \{ return ([^;]+); \}")
    functions = {}
    for name, params, expr in pattern.findall(text):
        args = ", ".join(p.split()[-1] for p in params.split(","))
        body = _resolve_ternaries("(" + expr.replace("WMMA_GFX12", str(gfx12)) + ")")
        body = body.replace("/", "//").replace("!=", " != ")  # ints >= 0 only
        functions[name] = eval(f"lambda {args}: int({body})")
    assert {"frag_offset", "acc_row", "acc_col", "acc_as_b_block", "acc_as_b_reg", "acc_as_b_partner"} <= set(functions)
    return functions


LDS_PAD = int(re.search(r"#define LDS_PAD (\d+)", (ROOT / "kernels_hip" / "wmma.h").read_text())[1])


def _fragments(F, gfx12, tile, row0, k_step, stride):
    """What lds_frag(tile, frag_offset(...)) loads into each lane: FRAG_ELEMS consecutive values."""
    flat = tile.reshape(-1)
    n = operand_elems(gfx12)
    return np.array([[flat[F["frag_offset"](lane, row0, k_step, stride) + i] for i in range(n)]
                     for lane in range(LANES)])


def _padded(matrix, stride):
    out = np.zeros((matrix.shape[0], stride))
    out[:, :matrix.shape[1]] = matrix
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tile_times_frags_computes_a_times_b(layout):
    """acc = A B over a k of 32 (two steps) for two 16-row blocks of A, the way tile_times_frags
    reads A (a tile [row][k] in LDS) and B (fragments of a tile [column][k]), read back with
    acc_row / acc_col: the kernels' products S^T = K Q^T, dP = dO V^T, ..."""
    gfx12 = LAYOUTS[layout]
    F = kernel_functions(gfx12)
    rng = np.random.default_rng(gfx12)
    k_total, stride = 32, 32 + LDS_PAD
    a = rng.standard_normal((32, k_total))   # two 16-row blocks
    bt = rng.standard_normal((16, k_total))  # B^T: [column][k]
    sa, sb = _padded(a, stride), _padded(bt, stride)
    for block in range(2):
        acc = np.zeros((LANES, 8))
        for ks in range(k_total // 16):
            acc = wmma(gfx12, _fragments(F, gfx12, sa, block * 16, ks, stride),
                       _fragments(F, gfx12, sb, 0, ks, stride), acc)
        want = a @ bt.T
        for lane in range(LANES):
            for j in range(8):
                row, col = F["acc_row"](lane, block, j), F["acc_col"](lane)
                assert acc[lane, j] == pytest.approx(want[row, col], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_accumulator_as_b_operand_of_the_next_product(layout):
    """An accumulator C whose rows are the k of the next product (P^T in O^T = V^T P^T, dS in
    dK^T = Q^T dS) becomes its B operand through acc_as_b_block / _reg / _partner: element i of
    k step ks comes from block acc_as_b_block(ks), register acc_as_b_reg(ks, i), of this lane or
    (acc_as_b_partner) of lane ^ 16. Then A C from those fragments is A times the accumulator."""
    gfx12 = LAYOUTS[layout]
    F = kernel_functions(gfx12)
    rng = np.random.default_rng(10 + gfx12)
    k_total, stride = 32, 32 + LDS_PAD
    c = rng.standard_normal((k_total, 16))  # two 16-row accumulator blocks: rows are k
    c_regs = [np.array([[c[F["acc_row"](lane, blk, j), F["acc_col"](lane)] for j in range(8)]
                        for lane in range(LANES)]) for blk in range(2)]
    a = rng.standard_normal((16, k_total))
    sa = _padded(a, stride)
    acc = np.zeros((LANES, 8))
    for ks in range(k_total // 16):
        regs = c_regs[F["acc_as_b_block"](ks)]
        b = np.array([[regs[lane ^ 16 if F["acc_as_b_partner"](lane, i) else lane, F["acc_as_b_reg"](ks, i)]
                       for i in range(operand_elems(gfx12))] for lane in range(LANES)])
        acc = wmma(gfx12, _fragments(F, gfx12, sa, 0, ks, stride), b, acc)
    want = a @ c
    got = np.zeros((16, 16))
    for lane in range(LANES):
        for j in range(8):
            got[F["acc_row"](lane, 0, j), F["acc_col"](lane)] = acc[lane, j]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gfx11_needs_the_partner_lane_and_gfx12_does_not():
    """The reason the two layouts differ in acc_as_b: on gfx12 a lane's accumulator rows are its
    B fragment's k; on gfx11 half of them are the partner lane's."""
    partner = {g: {kernel_functions(g)["acc_as_b_partner"](lane, i) for lane in range(LANES)
                   for i in range(operand_elems(g))} for g in (0, 1)}
    assert partner == {0: {0, 1}, 1: {0}}


def test_acc_run_matches_the_accumulator_rows():
    """ACC_RUN (consecutive rows held in elements j.. j + ACC_RUN - 1, used for vector stores and
    16-byte lse/delta reads) agrees with acc_row in both layouts."""
    text = (ROOT / "kernels_hip" / "wmma.h").read_text()
    run = re.search(r"#define ACC_RUN \(WMMA_GFX12 \? (\d+) : (\d+)\)", text)
    for gfx12, acc_run in ((1, int(run[1])), (0, int(run[2]))):
        F = kernel_functions(gfx12)
        for lane in range(LANES):
            for j0 in range(0, 8, acc_run):
                rows = [F["acc_row"](lane, 0, j0 + i) for i in range(acc_run)]
                assert rows == list(range(rows[0], rows[0] + acc_run))
                if acc_run > 1:
                    assert rows[0] % min(acc_run, 4) == 0  # 16-byte aligned float4 reads
        if acc_run == 1:  # gfx11: no two consecutive elements hold consecutive rows
            assert F["acc_row"](0, 0, 1) - F["acc_row"](0, 0, 0) == 2


# ---- the products and the decode block (flash_decode_mfma.hip over wmma.h) ---------------------

def _lds(matrix, stride):
    """matrix [rows][cols] stored row by row with `stride` elements per row, NaN in the padding
    (a read of the padding would show in the result)."""
    out = np.full((matrix.shape[0], stride), np.nan)
    out[:, :matrix.shape[1]] = matrix
    return out


def load_frags(F, gfx12, s_b, stride, row0, k_steps):
    """FixedFrags.load / load_frags: the fragments of rows [row0, row0 + 16) of s_b[row][k]."""
    return [_fragments(F, gfx12, s_b, row0, ks, stride) for ks in range(k_steps)]


def tile_times_frags(F, gfx12, s_a, stride, blocks, b_frags):
    """matrix_tile.h's tile_times_frags: acc[b] = A_b B, A from s_a[row][k], B fragments per k step."""
    out = []
    for blk in range(blocks):
        acc = np.zeros((LANES, 8))
        for ks, b in enumerate(b_frags):
            acc = wmma(gfx12, _fragments(F, gfx12, s_a, blk * 16, ks, stride), b, acc)
        out.append(acc)
    return out


def tile_times_acc(F, gfx12, s_a, stride, blocks, c_acc):
    """matrix_tile.h's tile_times_acc: acc[b] = A_b C, C an accumulator set used as B through
    acc_as_b (this lane's element or, where acc_as_b_partner says so, lane ^ 16's)."""
    out = [np.zeros((LANES, 8)) for _ in range(blocks)]
    for ks in range(len(c_acc)):  # one 16-row accumulator block per k step of 16
        regs = c_acc[F["acc_as_b_block"](ks)]
        b = np.array([[regs[lane ^ 16 if F["acc_as_b_partner"](lane, i) else lane, F["acc_as_b_reg"](ks, i)]
                       for i in range(operand_elems(gfx12))] for lane in range(LANES)])
        for blk in range(blocks):
            out[blk] = wmma(gfx12, _fragments(F, gfx12, s_a, blk * 16, ks, stride), b, out[blk])
    return out


DECODE_ROWS = [r for r in configs.HIP_TABLE if r.kernel == "flash_decode_wmma"]


def decode_block(cfg, q_rows, k, v, visible, tiles, functions=None):
    """One block of flash_decode_wmma (one wave) through the shared decode model
    (tests/decode_model.py) in the row's WMMA layout (rdna3: gfx11, rdna4: gfx12) and wmma.h's
    index functions: 16 group rows per tile, lane ^ 16 holding the same row's other keys.
    `functions`: other index functions than wmma.h's."""
    gfx12 = int(cfg.arch == "rdna4")
    F = functions or kernel_functions(gfx12)
    core = MatrixCore(
        lanes=LANES, columns=16 * cfg.warps, per_lane=8, F=F, pad=LDS_PAD,
        q_frags=lambda lds, stride, d: load_frags(F, gfx12, lds, stride, 0, d // 16),
        scores=lambda lds, stride, n, q_frag: tile_times_frags(F, gfx12, lds, stride, n // 16, q_frag),
        pv=lambda lds, stride, d, p: tile_times_acc(F, gfx12, lds, stride, d // 16, p))
    return decode_model.decode_block(core, _lds, cfg, q_rows, k, v, visible, tiles)


@pytest.mark.parametrize("cfg", DECODE_ROWS, ids=lambda c: f"{c.arch}_D{c.head_dim}_N{c.block_n}")
@pytest.mark.parametrize("splits", [1, 2])
def test_decode_block_gives_each_group_row_its_attention(cfg, splits):
    """The GQA group x tokens as the 16 columns of the WMMA tile (row r: head r // Sq, token
    r % Sq), a causal sliding window bottom-right aligned with Sk, a last tile past the keys, split
    into runs of whole tiles whose partials the merge's formula combines: each row's
    softmax(q k^T) v in base 2 (scale_log2 = 1) and its LSE, as a float64 oracle gives them."""
    check_split_decode(decode_block, cfg, splits, seed=cfg.head_dim + splits + 100 * (cfg.arch == "rdna4"))


def test_decode_model_fails_without_the_gfx11_exchange():
    """The model can fail: with acc_as_b's exchange between lane halves removed (every lane its
    own elements), gfx11's P^T operand no longer has one value per element, which the model of
    the instruction rejects."""
    cfg = next(r for r in DECODE_ROWS if r.arch == "rdna3")
    broken = dict(kernel_functions(0), acc_as_b_partner=lambda lane, i: 0)
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((n, cfg.head_dim)) for n in (4, cfg.block_n, cfg.block_n))
    with pytest.raises(AssertionError, match="halves of the wave disagree"):
        decode_block(cfg, q, k, v, np.ones((4, cfg.block_n), bool), [0], functions=broken)


DKDV_ROWS = [r for r in configs.HIP_TABLE if r.kernel == "flash_bwd_wmma_dkdv"]


@pytest.mark.parametrize("cfg", DKDV_ROWS, ids=lambda c: f"{c.arch}_D{c.head_dim}_M{c.block_m}_split{c.dim_split}")
def test_dkdv_slices_give_the_gradients_of_the_waves_keys(cfg):
    """flash_bwd_wmma_dkdv in the row's layout: S = Q K^T and dP = dO V^T from the K and V
    fragments (in registers or read from LDS: the same fragments), then for each of the
    dim_split blocks of a key block dV^T and dK^T over its slice of dims, from rows [dim0, dim0 +
    SLICE_DIMS) of the transposed tiles (sdOt + dim0 * T_STRIDE); the slices put together are
    P^T dO and dS^T Q for the last wave's keys."""
    gfx12 = int(cfg.arch == "rdna4")
    F = kernel_functions(gfx12)
    rng = np.random.default_rng(cfg.head_dim + cfg.block_m + gfx12)
    d, m, stride, t_stride = cfg.head_dim, cfg.block_m, cfg.head_dim + LDS_PAD, cfg.block_m + LDS_PAD
    wave = cfg.warps - 1
    q, dout = rng.standard_normal((m, d)), rng.standard_normal((m, d))
    k, v = rng.standard_normal((cfg.block_n, d)), rng.standard_normal((cfg.block_n, d))
    keys = slice(wave * 16, wave * 16 + 16)

    def read_back(acc):
        out = np.full((16 * len(acc), 16), np.nan)
        for blk, block in enumerate(acc):
            for lane in range(LANES):
                for j in range(8):
                    out[F["acc_row"](lane, blk, j), F["acc_col"](lane)] = block[lane, j]
        assert not np.isnan(out).any()
        return out

    k_frag = load_frags(F, gfx12, _lds(k, stride), stride, wave * 16, d // 16)
    v_frag = load_frags(F, gfx12, _lds(v, stride), stride, wave * 16, d // 16)
    acc_s = tile_times_frags(F, gfx12, _lds(q, stride), stride, m // 16, k_frag)
    acc_dp = tile_times_frags(F, gfx12, _lds(dout, stride), stride, m // 16, v_frag)
    np.testing.assert_allclose(read_back(acc_s), q @ k[keys].T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(read_back(acc_dp), dout @ v[keys].T, rtol=1e-12, atol=1e-12)

    p, ds = np.tanh(acc_s), np.sin(acc_dp)  # stand-ins for P and dS, elementwise: same layout
    s_dot, s_qt = _lds(dout.T.copy(), t_stride), _lds(q.T.copy(), t_stride)
    slice_dims = d // cfg.dim_split
    dv_t, dk_t = np.zeros((d, 16)), np.zeros((d, 16))
    for part in range(cfg.dim_split):
        dim0 = part * slice_dims
        dv_t[dim0:dim0 + slice_dims] = read_back(tile_times_acc(F, gfx12, s_dot[dim0:], t_stride, slice_dims // 16, list(p)))
        dk_t[dim0:dim0 + slice_dims] = read_back(tile_times_acc(F, gfx12, s_qt[dim0:], t_stride, slice_dims // 16, list(ds)))
    np.testing.assert_allclose(dv_t, (read_back(p).T @ dout).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dk_t, (read_back(ds).T @ q).T, rtol=1e-12, atol=1e-12)
