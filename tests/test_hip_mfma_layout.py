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
PAD = int(re.search(r"#define PAD (\d+)", (ROOT / "kernels_hip" / "flash_fwd_mfma.hip").read_text())[1])
MFMA_ROWS = [r for r in configs.HIP_TABLE if r.kernel == "flash_fwd_mfma"]


def test_every_mapping_function_was_read():
    assert {"k_frag_offset", "q_frag_offset", "vt_frag_offset", "score_key", "acc_query",
            "out_dim", "p_acc_block", "p_acc_reg"} <= set(F)


def _frag(smem, offset_of, lanes=LANES):
    """Per-lane 4-element fragments read at offset_of(lane) (4 consecutive 16-bit elements)."""
    return np.array([[smem[offset_of(lane) + i] for i in range(4)] for lane in range(lanes)])


@pytest.mark.parametrize("cfg", MFMA_ROWS, ids=lambda c: f"D{c.head_dim}_N{c.block_n}")
def test_scores_are_k_times_q_transposed(cfg):
    """S^T = K Q^T through the model reproduces Q K^T, read back with score_key / acc_query."""
    rng = np.random.default_rng(cfg.head_dim)
    d, n, stride = cfg.head_dim, cfg.block_n, cfg.head_dim + PAD
    wave = cfg.warps - 1                       # the last wave's queries: exercises query0
    q = rng.standard_normal((cfg.block_m, d))
    k = rng.standard_normal((n, d))
    s_q = np.full(cfg.block_m * stride, np.nan)
    s_k = np.full(n * stride, np.nan)          # padding NaN: reading it would show
    for row in range(cfg.block_m):
        s_q[row * stride:row * stride + d] = q[row]
    for key in range(n):
        s_k[key * stride:key * stride + d] = k[key]

    want = q @ k.T
    for nb in range(n // 32):
        acc = np.zeros((LANES, 16))
        for ks in range(d // 8):
            a = _frag(s_k, lambda lane: F["k_frag_offset"](lane, nb, ks, stride))
            b = _frag(s_q, lambda lane: F["q_frag_offset"](lane, wave * 32, ks, stride))
            acc = mfma_32x32(a, b, acc)
        for lane in range(LANES):
            for j in range(16):
                query = wave * 32 + F["acc_query"](lane)
                np.testing.assert_allclose(acc[lane, j], want[query, F["score_key"](lane, nb, j)],
                                           rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", MFMA_ROWS, ids=lambda c: f"D{c.head_dim}_N{c.block_n}")
def test_output_is_v_transposed_times_p_transposed(cfg):
    """O^T = V^T P^T with P taken from S^T's accumulators (p_acc_*) reproduces P V."""
    rng = np.random.default_rng(cfg.block_n)
    d, n, stride = cfg.head_dim, cfg.block_n, cfg.block_n + PAD
    p = rng.random((32, n))
    v = rng.standard_normal((n, d))
    s_vt = np.full(d * stride, np.nan)
    for dim in range(d):
        s_vt[dim * stride:dim * stride + n] = v[:, dim]
    acc_s = [np.array([[p[F["acc_query"](lane), F["score_key"](lane, nb, j)] for j in range(16)]
                       for lane in range(LANES)]) for nb in range(n // 32)]

    want = p @ v
    for db in range(d // 32):
        acc = np.zeros((LANES, 16))
        for ks in range(n // 8):
            a = _frag(s_vt, lambda lane: F["vt_frag_offset"](lane, db, ks, stride))
            b = np.array([[acc_s[F["p_acc_block"](ks)][lane, F["p_acc_reg"](ks, i)]
                           for i in range(4)] for lane in range(LANES)])
            acc = mfma_32x32(a, b, acc)
        for lane in range(LANES):
            for j in range(16):
                got = acc[lane, j]
                np.testing.assert_allclose(got, want[F["acc_query"](lane), F["out_dim"](lane, db, j)],
                                           rtol=1e-12, atol=1e-12)


def test_gfx908_bf16_pair_equals_one_k8_step():
    """Two 32x32x4bf16 on the low and high halves of the fragments = one 32x32x8 step."""
    rng = np.random.default_rng(3)
    a, b, c = rng.standard_normal((LANES, 4)), rng.standard_normal((LANES, 4)), rng.standard_normal((LANES, 16))
    pair = mfma_32x32(a[:, 2:], b[:, 2:], mfma_32x32(a[:, :2], b[:, :2], c))
    np.testing.assert_allclose(pair, mfma_32x32(a, b, c), rtol=1e-12, atol=1e-12)


def test_mask_offsets_do_not_depend_on_the_lane():
    """mask_scores compares score_key(lane, nb, j) - score_key(lane, 0, 0) to a per-lane limit:
    that difference must be the same for every lane (a compile-time constant after unrolling)."""
    for nb in range(4):
        for j in range(16):
            assert len({F["score_key"](lane, nb, j) - F["score_key"](lane, 0, 0)
                        for lane in range(LANES)}) == 1


@pytest.mark.parametrize("cfg", MFMA_ROWS, ids=lambda c: f"D{c.head_dim}_N{c.block_n}")
def test_fragment_reads_are_free_of_bank_conflicts(cfg):
    """LDS: 32 banks of 4 bytes; an 8-byte read (ds_read_b64) serves 16 lanes per cycle. The
    padded strides must put those 16 lanes' 2 dwords each into 32 different banks."""
    kq, vt = cfg.head_dim + PAD, cfg.block_n + PAD
    reads = [lambda lane: F["k_frag_offset"](lane, 0, 1, kq),
             lambda lane: F["q_frag_offset"](lane, 32, 1, kq),
             lambda lane: F["vt_frag_offset"](lane, 0, 1, vt)]
    for offset_of in reads:
        for first in range(0, LANES, 16):
            banks = [(offset_of(lane) * 2 // 4 + w) % 32 for lane in range(first, first + 16)
                     for w in range(2)]
            assert len(set(banks)) == 32, f"{cfg}: banks {sorted(banks)}"
