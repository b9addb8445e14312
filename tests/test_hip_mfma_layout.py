"""The MFMA kernel's fragment index mapping, checked on the CPU against a NumPy model of the
matrix instruction.

No AMD GPU is available, so the one part of kernels_hip/flash_fwd_mfma.hip that cannot run
elsewhere -- which lane holds which element of which operand -- is tested here. The model below
is written from AMD's documented register layouts (CDNA2/CDNA3 ISA, matrix instruction
layouts; the same tables as AMD's matrix instruction calculator) for v_mfma_f32_32x32x8f16 /
v_mfma_f32_32x32x8bf16_1k and gfx908's v_mfma_f32_32x32x4bf16. The kernel's mapping is not
mirrored by hand: the one-line index functions are read from kernels_hip/mfma.h and evaluated.
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
LANES = 64


# ---- the instruction, from the documented layouts ------------------------------------------------

def _a_index(lane, i, k_per_lane):   # A (32 x K): lane l, element i -> (row, k)
    return lane % 32, k_per_lane * (lane // 32) + i


def _acc_index(lane, j):              # C, D (32 x 32): lane l, element j -> (row, column)
    return 8 * (j // 4) + 4 * (lane // 32) + j % 4, lane % 32


def mfma_32x32(a_regs, b_regs, c_regs):
    """D = A B + C for one wave: a_regs, b_regs (64, k_per_lane), c_regs (64, 16) per lane.
    k_per_lane = 4: v_mfma_f32_32x32x8{f16,bf16_1k}; 2: v_mfma_f32_32x32x4bf16 (gfx908)."""
    k_per_lane = a_regs.shape[1]
    a = np.full((32, 2 * k_per_lane), np.nan)
    b = np.full((2 * k_per_lane, 32), np.nan)
    c = np.full((32, 32), np.nan)
    for lane in range(LANES):
        for i in range(k_per_lane):
            a[_a_index(lane, i, k_per_lane)] = a_regs[lane, i]
            row, k = _a_index(lane, i, k_per_lane)   # B is laid out as A transposed
            b[k, row] = b_regs[lane, i]
        for j in range(16):
            c[_acc_index(lane, j)] = c_regs[lane, j]
    assert not (np.isnan(a).any() or np.isnan(b).any() or np.isnan(c).any()), "layout not onto"
    d = a @ b + c
    return np.array([[d[_acc_index(lane, j)] for j in range(16)] for lane in range(LANES)])


def test_model_layouts_are_bijections():
    cells = {_acc_index(lane, j) for lane in range(LANES) for j in range(16)}
    assert len(cells) == 32 * 32
    for k_per_lane in (2, 4):
        cells = {_a_index(lane, i, k_per_lane) for lane in range(LANES) for i in range(k_per_lane)}
        assert len(cells) == 32 * 2 * k_per_lane


# ---- the kernel's mapping, read from its source ------------------------------------------------

def _kernel_functions():
    """{name: python function} for the one-line `int name(int a, ...) { return expr; }` helpers."""
    text = (ROOT / "kernels_hip" / "mfma.h").read_text()
    pattern = re.compile(r"__device__ __forceinline__ int (\w+)\(([^)]*)\) \{ return ([^;]+); \}")
    functions = {}
    for name, params, expr in pattern.findall(text):
        args = ", ".join(p.split()[-1] for p in params.split(","))
        functions[name] = eval(f"lambda {args}: {expr.replace('/', '//')}")  # ints >= 0 only
    return functions


F = _kernel_functions()
PAD = int(re.search(r"#define LDS_PAD (\d+)", (ROOT / "kernels_hip" / "mfma.h").read_text())[1])
MFMA_ROWS = [r for r in configs.HIP_TABLE if r.kernel == "flash_fwd_mfma"]
DKDV_ROWS = [r for r in configs.HIP_TABLE if r.kernel == "flash_bwd_mfma_dkdv"]
DQ_ROWS = [r for r in configs.HIP_TABLE if r.kernel == "flash_bwd_mfma_dq"]


def test_every_mapping_function_was_read():
    assert {"frag_offset", "acc_row", "acc_col", "acc_as_b_block", "acc_as_b_reg"} <= set(F)


def _frag(smem, offset_of, lanes=LANES):
    """Per-lane 4-element fragments read at offset_of(lane) (4 consecutive 16-bit elements)."""
    return np.array([[smem[offset_of(lane) + i] for i in range(4)] for lane in range(lanes)])


def _lds(matrix, stride):
    """matrix [rows][cols] stored row by row with `stride` elements per row, NaN in the padding
    (a read of the padding would show in the result)."""
    rows, cols = matrix.shape
    smem = np.full(rows * stride, np.nan)
    for r in range(rows):
        smem[r * stride:r * stride + cols] = matrix[r]
    return smem


# The two product shapes of mfma_tile.h, through the model and the kernels' index functions.

def tile_times_frags(s_a, a_stride, blocks, b_frags):
    """acc[b] = A_b B: A from the LDS tile s_a[row][k], B given as per-lane fragments per k step."""
    out = []
    for blk in range(blocks):
        acc = np.zeros((LANES, 16))
        for ks, b in enumerate(b_frags):
            a = _frag(s_a, lambda lane: F["frag_offset"](lane, blk * 32, ks, a_stride))
            acc = mfma_32x32(a, b, acc)
        out.append(acc)
    return out


def load_frags(s_b, b_stride, row0, k_steps):
    """The fragments of rows [row0, row0 + 32) of the LDS tile s_b[row][k], per k step."""
    return [_frag(s_b, lambda lane: F["frag_offset"](lane, row0, ks, b_stride)) for ks in range(k_steps)]


def tile_times_acc(s_a, a_stride, blocks, c_acc):
    """acc[b] = A_b C: A from s_a[row][k], C an accumulator set used as B (acc_as_b_*)."""
    out = [np.zeros((LANES, 16)) for _ in range(blocks)]
    for ks in range(4 * len(c_acc)):
        b = np.array([[c_acc[F["acc_as_b_block"](ks)][lane, F["acc_as_b_reg"](ks, i)] for i in range(4)]
                      for lane in range(LANES)])
        for blk in range(blocks):
            a = _frag(s_a, lambda lane: F["frag_offset"](lane, blk * 32, ks, a_stride))
            out[blk] = mfma_32x32(a, b, out[blk])
    return out


def read_back(acc, col0=0):
    """The matrix an accumulator set holds: element j of block b of lane l is at
    (acc_row(l, b, j), col0 + acc_col(l))."""
    rows = 32 * len(acc)
    m = np.full((rows, col0 + 32), np.nan)
    for blk, block in enumerate(acc):
        for lane in range(LANES):
            for j in range(16):
                m[F["acc_row"](lane, blk, j), col0 + F["acc_col"](lane)] = block[lane, j]
    assert not np.isnan(m[:, col0:]).any(), "accumulator layout not onto"
    return m[:, col0:]


def acc_set(matrix):
    """An accumulator set holding matrix (rows: 32-blocks, 32 columns), as the kernels' layout."""
    return [np.array([[matrix[F["acc_row"](lane, blk, j), F["acc_col"](lane)] for j in range(16)]
                      for lane in range(LANES)]) for blk in range(matrix.shape[0] // 32)]


# ---- the forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", MFMA_ROWS, ids=lambda c: f"D{c.head_dim}_N{c.block_n}")
def test_forward_scores_are_k_times_q_transposed(cfg):
    """S^T = K Q^T (compute_scores) reproduces Q K^T for the last wave's queries."""
    rng = np.random.default_rng(cfg.head_dim)
    d, n, stride = cfg.head_dim, cfg.block_n, cfg.head_dim + PAD
    wave = cfg.warps - 1                       # the last wave's queries: exercises row0
    q = rng.standard_normal((cfg.block_m, d))
    k = rng.standard_normal((n, d))
    q_frag = load_frags(_lds(q, stride), stride, wave * 32, d // 8)
    s_t = read_back(tile_times_frags(_lds(k, stride), stride, n // 32, q_frag))
    np.testing.assert_allclose(s_t, (q @ k.T)[wave * 32:wave * 32 + 32].T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", MFMA_ROWS, ids=lambda c: f"D{c.head_dim}_N{c.block_n}")
def test_forward_output_is_v_transposed_times_p_transposed(cfg):
    """O^T = V^T P^T with P^T the accumulator of S^T (accumulate_pv) reproduces P V."""
    rng = np.random.default_rng(cfg.block_n)
    d, n, stride = cfg.head_dim, cfg.block_n, cfg.block_n + PAD
    p = rng.random((32, n))
    v = rng.standard_normal((n, d))
    o_t = read_back(tile_times_acc(_lds(v.T.copy(), stride), stride, d // 32, acc_set(p.T.copy())))
    np.testing.assert_allclose(o_t, (p @ v).T, rtol=1e-12, atol=1e-12)


# ---- the backward ------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", DKDV_ROWS, ids=lambda c: f"D{c.head_dim}_M{c.block_m}")
def test_dkdv_products_give_the_gradients_of_the_waves_keys(cfg):
    """flash_bwd_mfma_dkdv: S = Q K^T and dP = dO V^T (K, V fragments in registers), then
    dV^T = dO^T P and dK^T = Q^T dS from the transposed tiles and the accumulators of S and dP,
    reproduce P^T dO and dS^T Q for the last wave's keys."""
    rng = np.random.default_rng(cfg.head_dim + cfg.block_m)
    d, m, stride, t_stride = cfg.head_dim, cfg.block_m, cfg.head_dim + PAD, cfg.block_m + PAD
    wave = cfg.warps - 1
    q, dout = rng.standard_normal((m, d)), rng.standard_normal((m, d))
    k, v = rng.standard_normal((cfg.block_n, d)), rng.standard_normal((cfg.block_n, d))
    keys = slice(wave * 32, wave * 32 + 32)

    k_frag = load_frags(_lds(k, stride), stride, wave * 32, d // 8)
    v_frag = load_frags(_lds(v, stride), stride, wave * 32, d // 8)
    acc_s = tile_times_frags(_lds(q, stride), stride, m // 32, k_frag)
    acc_dp = tile_times_frags(_lds(dout, stride), stride, m // 32, v_frag)
    np.testing.assert_allclose(read_back(acc_s), q @ k[keys].T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(read_back(acc_dp), dout @ v[keys].T, rtol=1e-12, atol=1e-12)

    # Stand-ins for P and dS with the same layout (the elementwise step keeps the layout).
    p, ds = np.tanh(read_back(acc_s)), np.sin(read_back(acc_dp))
    dv_t = read_back(tile_times_acc(_lds(dout.T.copy(), t_stride), t_stride, d // 32, acc_set(p)))
    dk_t = read_back(tile_times_acc(_lds(q.T.copy(), t_stride), t_stride, d // 32, acc_set(ds)))
    np.testing.assert_allclose(dv_t, (p.T @ dout).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dk_t, (ds.T @ q).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", DQ_ROWS, ids=lambda c: f"D{c.head_dim}_N{c.block_n}")
def test_dq_products_give_the_gradient_of_the_waves_queries(cfg):
    """flash_bwd_mfma_dq: S^T = K Q^T, dP^T = V dO^T (Q, dO fragments in registers), then
    dQ^T = K^T dS^T from the K^T tile and the accumulator of dP^T reproduce dS K."""
    rng = np.random.default_rng(cfg.head_dim + cfg.block_n)
    d, n, stride, t_stride = cfg.head_dim, cfg.block_n, cfg.head_dim + PAD, cfg.block_n + PAD
    wave = cfg.warps - 1
    q, dout = rng.standard_normal((cfg.block_m, d)), rng.standard_normal((cfg.block_m, d))
    k, v = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    rows = slice(wave * 32, wave * 32 + 32)

    q_frag = load_frags(_lds(q, stride), stride, wave * 32, d // 8)
    do_frag = load_frags(_lds(dout, stride), stride, wave * 32, d // 8)
    acc_s = tile_times_frags(_lds(k, stride), stride, n // 32, q_frag)
    acc_dp = tile_times_frags(_lds(v, stride), stride, n // 32, do_frag)
    np.testing.assert_allclose(read_back(acc_s), k @ q[rows].T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(read_back(acc_dp), v @ dout[rows].T, rtol=1e-12, atol=1e-12)

    ds_t = np.sin(read_back(acc_dp))  # dS^T stand-in, same layout
    dq_t = read_back(tile_times_acc(_lds(k.T.copy(), t_stride), t_stride, d // 32, acc_set(ds_t)))
    np.testing.assert_allclose(dq_t, (ds_t.T @ k).T, rtol=1e-12, atol=1e-12)


def test_row_vectors_are_read_in_aligned_runs_of_four():
    """softmax_backward_step reads lse and delta of rows acc_row(lane, qb, j0 .. j0 + 3) as one
    float4: the four rows must be consecutive and the first a multiple of 4 (16-byte aligned)."""
    for lane in range(LANES):
        for blk in range(4):
            for j0 in range(0, 16, 4):
                first = F["acc_row"](lane, blk, j0)
                assert first % 4 == 0
                assert [F["acc_row"](lane, blk, j0 + i) for i in range(4)] == [first + i for i in range(4)]


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_lanes_l_and_l_plus_32_hold_every_dim_of_their_row_once(blocks):
    """acc_to_lds / store_acc_row: the column of lanes l and l + 32 is one output row; together
    their acc_row values cover each of its 32 * blocks dims exactly once."""
    for lane in range(32):
        dims = [F["acc_row"](l, blk, j) for l in (lane, lane + 32) for blk in range(blocks) for j in range(16)]
        assert sorted(dims) == list(range(32 * blocks))


def test_gfx908_bf16_pair_equals_one_k8_step():
    """Two 32x32x4bf16 on the low and high halves of the fragments = one 32x32x8 step."""
    rng = np.random.default_rng(3)
    a, b, c = rng.standard_normal((LANES, 4)), rng.standard_normal((LANES, 4)), rng.standard_normal((LANES, 16))
    pair = mfma_32x32(a[:, 2:], b[:, 2:], mfma_32x32(a[:, :2], b[:, :2], c))
    np.testing.assert_allclose(pair, mfma_32x32(a, b, c), rtol=1e-12, atol=1e-12)


def test_mask_offsets_do_not_depend_on_the_lane():
    """The masks compare acc_row(lane, b, j) - acc_row(lane, 0, 0) to a per-lane limit: that
    difference must be the same for every lane (a compile-time constant after unrolling)."""
    for blk in range(4):
        for j in range(16):
            assert len({F["acc_row"](lane, blk, j) - F["acc_row"](lane, 0, 0)
                        for lane in range(LANES)}) == 1


def _reads_are_conflict_free(offset_of):
    """LDS: 32 banks of 4 bytes; an 8-byte read (ds_read_b64) serves 16 lanes per cycle, which
    must then touch 32 different banks (2 dwords each)."""
    for first in range(0, LANES, 16):
        banks = [(offset_of(lane) * 2 // 4 + w) % 32 for lane in range(first, first + 16) for w in range(2)]
        if len(set(banks)) != 32:
            return False
    return True


@pytest.mark.parametrize("cfg", MFMA_ROWS + DKDV_ROWS + DQ_ROWS,
                         ids=lambda c: f"{c.kernel}_D{c.head_dim}_M{c.block_m}_N{c.block_n}")
def test_fragment_reads_are_free_of_bank_conflicts(cfg):
    """Every LDS tile the MFMA kernels read fragments from: [row][dim] tiles (stride HEAD_DIM + PAD)
    and transposed [dim][row] tiles (stride rows + PAD)."""
    streamed = cfg.block_m if cfg.kernel == "flash_bwd_mfma_dkdv" else cfg.block_n
    for stride in (cfg.head_dim + PAD, streamed + PAD):
        for row0 in (0, 32):
            assert _reads_are_conflict_free(lambda lane: F["frag_offset"](lane, row0, 1, stride)), (cfg, stride)


# ---- the decode (flash_decode_mfma.hip) ------------------------------------------------------------

DECODE_ROWS = [r for r in configs.HIP_TABLE if r.kernel == "flash_decode_mfma"]


def decode_block(cfg, q_rows, k, v, visible, tiles):
    """One block of flash_decode_mfma through the shared decode model (tests/decode_model.py) on
    the MFMA layout and the kernels' index functions: 32 group rows per wave, lane ^ 32 holding
    the same row."""
    core = MatrixCore(
        lanes=LANES, columns=32, per_lane=16, F=F, pad=PAD,
        q_frags=lambda lds, stride, d: load_frags(lds, stride, 0, d // 8),
        scores=lambda lds, stride, n, q_frag: tile_times_frags(lds, stride, n // 32, q_frag),
        pv=lambda lds, stride, d, p: tile_times_acc(lds, stride, d // 32, p))
    return decode_model.decode_block(core, _lds, cfg, q_rows, k, v, visible, tiles)


@pytest.mark.parametrize("cfg", DECODE_ROWS, ids=lambda c: f"D{c.head_dim}_N{c.block_n}")
@pytest.mark.parametrize("splits", [1, 2])
def test_decode_block_gives_each_group_row_its_attention(cfg, splits):
    """The GQA group x tokens as the columns of the MFMA tile (row r: head r // Sq, token r % Sq),
    a causal sliding window bottom-right aligned with Sk, a last tile past the keys, split into
    runs of whole tiles whose partials the merge's formula combines: each row's softmax(q k^T) v
    in base 2 (scale_log2 = 1) and its LSE, as a float64 oracle gives them."""
    check_split_decode(decode_block, cfg, splits, seed=cfg.head_dim + splits)
