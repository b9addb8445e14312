"""Where the host time of a small xattn call goes (issue 12's per-call cost): cProfile over many
forward calls and many forward+backward calls at bench --overhead's shape (B1 H8 S128 D64 fp16,
on a CUDA GPU), the top functions by their own time. A diagnostic, not a benchmark: the profiler
slows every Python call, so read the shares, and take the times from `python -m xattn bench
--overhead`.

    PYTHONPATH=. python ci/profile_overhead.py [--calls 3000] [--top 25]
"""
import argparse
import cProfile
import io
import pstats

import torch

import xattn
from xattn.bench import OVERHEAD_SHAPE


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for mode in ("forward", "forward+backward"):
        grad = mode != "forward"
        q, k, v = (torch.randn(OVERHEAD_SHAPE, device="cuda", dtype=torch.float16, requires_grad=grad)
                   for _ in range(3))
        dout = torch.randn_like(q)

        def call():
            out = xattn.attention(q, k, v)
            return torch.autograd.grad(out, (q, k, v), dout) if grad else out

        for _ in range(50):  # plans built, kernels compiled
            call()
        torch.cuda.synchronize()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            call()
        profile.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        print(f"==== {mode}: {args.calls} calls, top {args.top} by own time")
        print(text.getvalue())


if __name__ == "__main__":
    main()
