"""kernels_common/fp8.h, the FP8 encoders and decoders of the decode kernels, compiled with the
host C compiler and checked bit for bit against torch on the CPU: every code of both formats
through the decoders, and floats of every magnitude through the encoders (the midpoints between
neighbouring FP8 values and one float32 step either side of them, subnormals, the saturation
edges, infinities, NaN of both signs, random bit patterns) against xattn.kvcache.quantize, the
reference backend's rule. The GPU compiles the same header (below sm_89 it is the conversion the
kernels run; tests/test_kvcache_fp8.py checks the kernels end to end)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from xattn.kvcache import quantize  # noqa: E402

FP8_H = Path(__file__).resolve().parents[1] / "kernels_common" / "fp8.h"
FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}

PROGRAM = r"""
#include "FP8_H"
#include <stdio.h>
#include <stdlib.h>
/* argv[1]: a file of float32 values; writes, per value, the e4m3fn and e5m2 codes, then the
   float32 bits of every decoded code (e4m3fn, then e5m2) to argv[2]. */
int main(int argc, char** argv) {
    FILE* in = fopen(argv[1], "rb");
    FILE* out = fopen(argv[2], "wb");
    float x;
    while (fread(&x, sizeof x, 1, in) == 1) {
        unsigned char codes[2] = {float_to_e4m3fn(x), float_to_e5m2(x)};
        fwrite(codes, 1, 2, out);
    }
    for (unsigned code = 0; code < 256; ++code) {
        float values[2] = {e4m3fn_to_float(code), e5m2_to_float(code)};
        fwrite(values, sizeof(float), 2, out);
    }
    fclose(in);
    fclose(out);
    return 0;
}
"""


def _floats() -> np.ndarray:
    """float32 inputs for the encoders: every FP8 value of both formats, the midpoints between
    neighbours (the ties) and one float32 step either side, subnormals, edges, random bits."""
    values = []
    for fmt in FORMATS.values():
        finite = torch.arange(256, dtype=torch.uint8).view(fmt).float().numpy()
        finite = np.unique(finite[np.isfinite(finite)]).astype(np.float64)
        mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)  # exact in float32
        values += [finite.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
                   np.nextafter(mids, np.float32(-np.inf))]
        largest = np.float32(torch.finfo(fmt).max)
        values.append(np.array([largest, np.nextafter(largest, np.float32(np.inf)), 2 * largest,
                                1e30, torch.finfo(fmt).tiny, torch.finfo(fmt).tiny / 2], np.float32))
    values.append(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, 1e-38, 3.4e38], np.float32))
    rng = np.random.default_rng(0)
    values.append(rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32))
    values.append((rng.standard_normal(50_000) * 10.0 ** rng.uniform(-8, 6, 50_000)).astype(np.float32))
    x = np.concatenate(values).astype(np.float32)
    nan_negative = np.array([0xFFC00000, 0xFF800001, 0x7F800001], np.uint32).view(np.float32)
    return np.concatenate([x, -x, nan_negative])


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler (gcc) here")
    folder = tmp_path_factory.mktemp("fp8")
    source = folder / "codec.c"
    source.write_text(PROGRAM.replace("FP8_H", str(FP8_H)))
    binary = folder / "codec"
    subprocess.run(["gcc", "-std=c11", "-O2", "-o", str(binary), str(source)], check=True,
                   capture_output=True, text=True)
    x = _floats()
    (folder / "in.bin").write_bytes(x.tobytes())
    subprocess.run([str(binary), str(folder / "in.bin"), str(folder / "out.bin")], check=True)
    raw = (folder / "out.bin").read_bytes()
    codes = np.frombuffer(raw[:2 * x.size], np.uint8).reshape(-1, 2)
    decoded = np.frombuffer(raw[2 * x.size:], np.float32).reshape(256, 2)
    return x, codes, decoded


@pytest.mark.parametrize("index, name", [(0, "e4m3fn"), (1, "e5m2")])
def test_encoder_matches_the_reference_rule(codec, index, name):
    x, codes, _ = codec
    want = quantize(torch.from_numpy(x), torch.tensor(1.0), FORMATS[name]).view(torch.uint8).numpy()
    bad = np.flatnonzero(codes[:, index] != want)
    assert bad.size == 0, [(float(x[i]), hex(int(x[i:i + 1].view(np.uint32)[0])), int(codes[i, index]),
                            int(want[i])) for i in bad[:10]]


@pytest.mark.parametrize("index, name", [(0, "e4m3fn"), (1, "e5m2")])
def test_decoder_is_exact(codec, index, name):
    _, _, decoded = codec
    want = torch.arange(256, dtype=torch.uint8).view(FORMATS[name]).float().numpy()
    got = decoded[:, index]
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    # bitwise: -0.0 and the infinities of e5m2 included
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
