"""float32 on NVIDIA: the CUDA-core kernels (flash_fwd_f32.cu, flash_bwd_simt.cu) against the
portable HIP kernels compiled by NVRTC (the test hook xattn.hip.on_cuda, RDNA's wave32 rows), side
by side, to decide which one body stays (issue 12: one portable float32 path, the faster kept).
Both pairs are one body now (kernels_common/flash_fwd_simt.h, flash_bwd_simt.h): what still
differs is the platform (hip_on_cuda's exp2f against ex2.approx, no MIN_BLOCKS) and RDNA's tiles
(row groups: the forward at D128 and D256, the backward's step of 16 keys or queries).

    PYTHONPATH=. python ci/f32_paths.py

Milliseconds per call (median, timed as `python -m xattn bench` times) of the forward and of
forward+backward, B=2 H=8, float32.
"""

import sys
from pathlib import Path

import torch

import xattn
from xattn import hip
from xattn.bench import _timer

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import HIP_ON_CUDA, WAVE32_TARGET  # noqa: E402
from test_hip_sources import HIP_ON_CUDA_OPTIONS  # noqa: E402


def main():
    ms = _timer()  # median milliseconds, as `python -m xattn bench` times
    print("| S | D | causal | fwd cuda | fwd portable | fwd+bwd cuda | fwd+bwd portable |")
    print("|---|---|---|---|---|---|---|")
    for seqlen in (1024, 4096):
        for head_dim in (64, 128):
            for causal in (False, True):
                q, k, v = (torch.randn(2, 8, seqlen, head_dim, device="cuda",
                                       requires_grad=True) for _ in range(3))
                dout = torch.randn_like(q)

                def fwd():
                    with torch.no_grad():
                        xattn.attention(q, k, v, causal=causal)

                def fwd_bwd():
                    torch.autograd.grad(xattn.attention(q, k, v, causal=causal), (q, k, v), dout)

                cells = [ms(fwd), None, ms(fwd_bwd), None]
                with hip.on_cuda(prefix=HIP_ON_CUDA.read_text(), options=tuple(HIP_ON_CUDA_OPTIONS),
                                 forward_target=WAVE32_TARGET, backward_target=WAVE32_TARGET):
                    cells[1], cells[3] = ms(fwd), ms(fwd_bwd)
                print(f"| {seqlen} | {head_dim} | {causal} | "
                      + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
