"""The FP8 decode's tensor-core fragments (kernels_cuda/flash_decode.cu, KV_FP8), checked on the
CPU against a NumPy model of ldmatrix and mma.sync m16n8k16: K and V stay FP8 codes in shared
memory and ldmatrix reads them as if they were 16-bit elements (two codes each), so

  S = Q K^T: a lane's non-transposed K register holds codes 4t..4t+3 of key row g (t = lane % 4,
             g = lane / 4), which serve as the head-dim positions 2t, 2t+1 (b0) and 2t+8, 2t+9
             (b1) of the k16 step: Q's tile is stored with the same permutation of each 16
             columns (fp8_q_column), and the sum over the head dim does not care about the order;
  O = P V:   a lane's transposed V register holds codes 2g, 2g+1 of key rows 2t and 2t+1; one
             byte permutation (0x3120) pairs the keys for head-dim column 2g (the even n8 tile)
             and 2g+1 (the odd one); the epilogue puts O's columns back (fp8_o_column).

The model mirrors the kernel's index arithmetic (lane addresses, register halves, the byte
permutation, the column maps) and checks both products against the plain ones, for every head
dim of the table."""

from __future__ import annotations

import numpy as np
import pytest

WARP = 32


def ldmatrix(smem: np.ndarray, addresses: list[int], trans: bool) -> np.ndarray:
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 on a byte array: lane i gives the 16-byte
    row address of row i % 8 of matrix i // 8. Returns (32, 4) uint32 registers."""
    regs = np.zeros((WARP, 4), np.uint32)
    for j in range(4):
        rows = [smem[a:a + 16] for a in addresses[8 * j:8 * j + 8]]
        for lane in range(WARP):
            g, t = lane // 4, lane % 4
            if trans:  # elements (2t, g) and (2t + 1, g) of the 8x8 matrix of 2-byte elements
                data = np.concatenate([rows[2 * t][2 * g:2 * g + 2], rows[2 * t + 1][2 * g:2 * g + 2]])
            else:      # elements (g, 2t) and (g, 2t + 1)
                data = rows[g][4 * t:4 * t + 4]
            regs[lane, j] = int.from_bytes(bytes(data), "little")
    return regs


def mma(c: np.ndarray, a_matrix: np.ndarray, b_halves) -> np.ndarray:
    """mma m16n8k16 with A given as a 16x16 matrix and B by each lane's (b0, b1) register halves
    (decoded values): b0 = B[2t, g], B[2t + 1, g]; b1 = B[2t + 8, g], B[2t + 9, g]. c (16 x 8)."""
    b = np.zeros((16, 8))
    for lane in range(WARP):
        g, t = lane // 4, lane % 4
        (b00, b01), (b10, b11) = b_halves[lane]
        b[2 * t, g], b[2 * t + 1, g], b[2 * t + 8, g], b[2 * t + 9, g] = b00, b01, b10, b11
    return c + a_matrix @ b


def fp8_q_column(logical: int) -> int:
    """The kernel's Q permutation: logical column l of each 16-column group holds Q's column
    fp8_q_column(l) (2t + j -> 4t + j, 2t + 8 + j -> 4t + 2 + j)."""
    group, l = divmod(logical, 16)
    t, j = divmod(l % 8, 2)
    return 16 * group + 4 * t + j + (2 if l >= 8 else 0)


def fp8_o_column(dt: int, t: int, e: int) -> int:
    """The physical head-dim column of accumulator e (0..3) of logical n8 tile dt in lane t."""
    return 16 * (dt // 2) + 4 * t + 2 * (e & 1) + (dt & 1)


def ring_swizzle(row: int, chunks: int) -> int:
    """decode_common.h's ring_swizzle: the XOR on the 16-byte chunk index of ring row `row`, for
    rows of `chunks` chunks."""
    return (row & 7) if chunks >= 8 else (row & 7) // (8 // chunks)


def ring_tile(codes: np.ndarray) -> np.ndarray:
    """A ring tile as the copies write it (decode_common.h, ring_col): unpadded rows, 16-byte
    chunk c of row r at chunk c ^ ring_swizzle(r)."""
    keys, row_bytes = codes.shape
    chunks = row_bytes // 16
    smem = np.zeros(keys * row_bytes, np.uint8)
    for r in range(keys):
        for c in range(chunks):
            at = r * row_bytes + 16 * (c ^ ring_swizzle(r, chunks))
            smem[at:at + 16] = codes[r, 16 * c:16 * c + 16]
    return smem


def ring_addresses(row_bytes: int, lane_row, lane_chunk, rows: int, chunks: int) -> list[int]:
    """flash_decode.cu's ring_lane and ring_at: each lane's swizzled chunk XOR the fragment's
    (even) chunk offset, in the row `rows` (a multiple of 8) past the lane's own."""
    n = row_bytes // 16
    out = []
    for i in range(WARP):
        r, c = lane_row(i), lane_chunk(i)
        assert rows % 8 == 0 and chunks % 2 == 0 and c in (0, 1)
        out.append((r + rows) * row_bytes + ((16 * (c ^ ring_swizzle(r, n))) ^ (16 * chunks)))
    return out


def assert_conflict_free(addresses: list[int]) -> None:
    """Each 8-lane group of an ldmatrix reads 8 rows of 16 bytes: conflict-free when they fall in
    8 different 16-byte bank groups of the 128-byte bank line."""
    for j in range(4):
        groups = {(a // 16) % 8 for a in addresses[8 * j:8 * j + 8]}
        assert len(groups) == 8, addresses[8 * j:8 * j + 8]


def decode(codes: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return torch.from_numpy(codes.astype(np.uint8)).view(torch.float8_e4m3fn).double().numpy()


def halves(reg: int) -> tuple[np.ndarray, np.ndarray]:
    """A 32-bit register of four codes as its two 16-bit halves, each two decoded values."""
    codes = np.array([(reg >> (8 * i)) & 0xFF for i in range(4)], np.uint8)
    values = decode(codes)
    return values[:2], values[2:]


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_q_kt_from_fp8_codes(head_dim):
    rng = np.random.default_rng(head_dim)
    keys = 16  # one n-pair of keys
    codes = rng.integers(0, 0x7F, (keys, head_dim)).astype(np.uint8)  # finite codes of both signs
    codes |= rng.integers(0, 2, codes.shape).astype(np.uint8) << 7
    codes[codes == 0xFF] = 0x80
    smem = ring_tile(codes)
    q = rng.standard_normal((16, head_dim))
    sq = q[:, [fp8_q_column(c) for c in range(head_dim)]]  # the permuted Q tile
    s = np.zeros((16, keys))
    for kk in range(0, head_dim // 16, 2):  # one ldmatrix.x4: 2 n8 tiles x 2 k16 steps
        # lane i: matrix i / 8 = (n tile (i / 16), k step kk + (i / 8) % 2), row i % 8
        addresses = ring_addresses(head_dim, lambda i: i // 16 * 8 + i % 8, lambda i: i // 8 % 2, 0, kk)
        assert_conflict_free(addresses)
        regs = ldmatrix(smem, addresses, trans=False)
        for step, (lo, hi) in ((kk, (0, 2)), (kk + 1, (1, 3))):
            a = sq[:, 16 * step:16 * step + 16]
            for nt, j in ((0, lo), (1, hi)):
                s[:, 8 * nt:8 * nt + 8] = mma(s[:, 8 * nt:8 * nt + 8], a,
                                              [halves(int(regs[lane, j])) for lane in range(WARP)])
    np.testing.assert_allclose(s, q @ decode(codes).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_p_v_from_fp8_codes(head_dim):
    rng = np.random.default_rng(head_dim + 1)
    keys = 16
    codes = rng.integers(0, 0x7F, (keys, head_dim)).astype(np.uint8)
    smem = ring_tile(codes)
    p = rng.random((16, keys))
    acc = np.zeros((head_dim // 8, 16, 8))  # logical n8 tiles
    for c in range(0, head_dim // 16, 2):  # one ldmatrix.x4.trans: 2 key halves x 2 d chunks
        # lane i: matrix i / 8 = (keys (i / 8) % 2 * 8.., chunk c + i / 16), row i % 8
        addresses = ring_addresses(head_dim, lambda i: i // 8 % 2 * 8 + i % 8, lambda i: i // 16, 0, c)
        assert_conflict_free(addresses)
        regs = ldmatrix(smem, addresses, trans=True)
        for chunk, (klo, khi) in ((c, (0, 1)), (c + 1, (2, 3))):
            for parity in (0, 1):  # byte_perm(x, 0, 0x3120): halves (b0, b2) and (b1, b3)
                b = []
                for lane in range(WARP):
                    pair = []
                    for j in (klo, khi):
                        x = int(regs[lane, j])
                        permuted = sum(((x >> (8 * src)) & 0xFF) << (8 * dst)
                                       for dst, src in enumerate((0, 2, 1, 3)))
                        pair.append(halves(permuted)[parity])
                    b.append(tuple(pair))
                dt = 2 * chunk + parity
                acc[dt] = mma(acc[dt], p, b)
    out = np.zeros((16, head_dim))
    for dt in range(head_dim // 8):  # the epilogue's column map
        for lane in range(WARP):
            g, t = lane // 4, lane % 4
            for e in range(4):
                row, col = g + 8 * (e // 2), 2 * t + (e & 1)
                out[row, fp8_o_column(dt, t, e)] = acc[dt][row, col]
    np.testing.assert_allclose(out, p @ decode(codes), rtol=1e-12, atol=1e-12)


def test_the_column_maps_are_permutations():
    for head_dim in (32, 128):
        assert sorted(fp8_q_column(c) for c in range(head_dim)) == list(range(head_dim))
        cols = [fp8_o_column(dt, t, e) for dt in range(head_dim // 8) for t in range(4) for e in (0, 1)]
        assert sorted(cols) == list(range(head_dim))


@pytest.mark.parametrize("row_bytes", [64, 128, 256, 512])
def test_16_bit_ring_reads_are_conflict_free_and_in_bounds(row_bytes):
    """The 16-bit products' ring addresses (flash_decode.cu, mma_q_k and mma_p_v) for 16-bit rows
    of 32..256 elements: every fragment's 8-lane groups hit 8 bank groups, and each lane reads the
    chunk the copy wrote its (row, chunk) to."""
    chunks = row_bytes // 16
    k_row, k_chunk = (lambda i: i % 8 + i // 16 * 8), (lambda i: i // 8 % 2)
    v_row, v_chunk = (lambda i: i % 16), (lambda i: i // 16)
    for lane_row, lane_chunk in ((k_row, k_chunk), (v_row, v_chunk)):
        for rows in (0, 16):
            for step in range(0, chunks, 2):
                addresses = ring_addresses(row_bytes, lane_row, lane_chunk, rows, step)
                assert_conflict_free(addresses)
                for i, a in enumerate(addresses):
                    r, c = lane_row(i) + rows, lane_chunk(i) + step
                    assert a == r * row_bytes + 16 * (c ^ ring_swizzle(r, chunks))
