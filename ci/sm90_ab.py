"""The Hopper kernels of this tree against another copy of their sources, side by side in one
process (launches taken in turns, cuDNN among them): what a change to kernels_cuda/sm90/ gained.

    git archive <commit> kernels_cuda/sm90 | tar -x --strip-components=2 -C kernels_cuda/sm90_old
    PYTHONPATH=. python ci/sm90_ab.py --old sm90_old [--variant NAME:KEY=VALUE,...] \
        [--head-dims 64 128 256] [--fwd-seqlens 2048 8192] [--bwd-seqlens 4096]

--old names a folder under kernels_cuda/ (one level, as the sm90 sources are) holding the other
copy of flash_fwd.cu, flash_bwd.cu and the headers they include; it is made for the run and never
committed. Each --variant adds the current sources with extra defines (e.g. "nohint:
MBAR_SUSPEND_NS=0"). Prints TFLOP/s per implementation (bf16, B S = 16384, H D = 2048; forward
4 B H S^2 D, backward 2.5 times that, halved causal; the median of --turns launches of each, taken
in turns: xattn.bench.in_turns) and each one's ratio to cuDNN. A benchmark: it asserts nothing.
"""

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sm90_bwd_check import bwd_tflops  # noqa: E402
from sm90_fwd_check import tflops  # noqa: E402

from xattn import cuda, kernels, launch, sm90  # noqa: E402
from xattn.bench import in_turns  # noqa: E402

ENTRIES = ("flash_fwd_sm90", "flash_bwd_sm90")


def with_sources(folder: str | None, extra: dict):
    """A context in which the sm90 entries compile from kernels_cuda/<folder>/ (None: their own)
    with `extra` defines added."""
    class Swap:
        def __enter__(self):
            self.saved = {e: kernels.KERNELS["cuda", e] for e in ENTRIES}
            for e, k in self.saved.items():
                source = k.source if folder is None else f"{folder}/{Path(k.source).name}"
                defines = k.defines if not extra else (
                    lambda *a, _d=k.defines, **kw: {**_d(*a, **kw), **extra})
                kernels.KERNELS["cuda", e] = dataclasses.replace(k, source=source, defines=defines)

        def __exit__(self, *exc):
            kernels.KERNELS.update({("cuda", e): k for e, k in self.saved.items()})
    return Swap()


def forward_runner(q, k, v, causal, swap):
    """The sm90 forward of the table's row, planned under `swap`, as a launch of its own."""
    b, h, s, d = q.shape
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    Q, K, V, O, L = (launch.describe(a) for a in (q, k, v, out, lse))
    with swap:
        step = sm90.plan(Q, K, V, O, L, causal=causal, scale=1 / math.sqrt(d), window=(-1, -1),
                         softcap=0.0, slopes=None)
    pointers = {"q": Q.ptr, "k": K.ptr, "v": V.ptr, "o": O.ptr, "lse": L.ptr}
    stream = torch.cuda.current_stream().cuda_stream
    return lambda: (out, cuda._run((step,), pointers, stream, q.device.index))


def backward_runner(q, k, v, dout, out, lse, causal, swap):
    """The whole backward (delta, the sm90 kernel, dQ conversion) planned under `swap`."""
    stream = torch.cuda.current_stream().cuda_stream
    grads = [torch.empty_like(x) for x in (q, k, v)]
    launch._plans.clear()
    with swap:
        cuda.backward(q, k, v, out, dout, lse, *grads, causal=causal, scale=1 / math.sqrt(q.shape[3]),
                      deterministic=False, stream=stream)
    steps, scratch = launch._plans.pop(next(key for key in launch._plans if key[0] == "bwd"))
    buffer = torch.empty(scratch.floats, device="cuda")
    ptrs = {"q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "o": out.data_ptr(),
            "dout": dout.data_ptr(), "lse": lse.data_ptr(), "dq": grads[0].data_ptr(),
            "dk": grads[1].data_ptr(), "dv": grads[2].data_ptr(), **scratch.pointers(buffer.data_ptr())}
    return lambda: (buffer, grads, cuda._run(steps, ptrs, stream, q.device.index))


def cudnn_forward(q, k, v, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def cudnn_backward(q, k, v, dout, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    return lambda: torch.autograd.grad(o, (qs, ks, vs), dout, retain_graph=True)


def report(label, ms: dict, to_tflops):
    got = {name: to_tflops(t) for name, t in ms.items()}
    cells = " ".join(f"{n} {got[n]:.0f} ({got[n] / got['cudnn']:.3f})" for n in got if n != "cudnn")
    print(f"{label}: {cells} cudnn {got['cudnn']:.0f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="folder under kernels_cuda/ with the other sources")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:KEY=VALUE,... the current sources with extra defines")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--fwd-seqlens", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--bwd-seqlens", type=int, nargs="*", default=[4096])
    parser.add_argument("--turns", type=int, default=50)
    args = parser.parse_args()
    swaps = {"new": with_sources(None, {})}
    if args.old:
        swaps["old"] = with_sources(args.old, {})
    for spec in args.variant:
        name, _, defines = spec.partition(":")
        swaps[name] = with_sources(None, {k: int(v) for k, v in (d.split("=") for d in defines.split(","))})
    print(f"sm90 A/B {torch.cuda.get_device_name()}: TFLOP/s (ratio to cuDNN), bf16, B S = 16384, "
          f"H D = 2048, median of {args.turns} launches taken in turns; implementations {list(swaps)}")
    for d in args.head_dims:
        for causal in (False, True):
            for s in args.fwd_seqlens:
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                fns = {name: forward_runner(q, k, v, causal, swap) for name, swap in swaps.items()}
                fns["cudnn"] = cudnn_forward(q, k, v, causal)
                report(f"fwd D{d} {'causal' if causal else 'full'} S{s}", in_turns(fns, args.turns),
                       lambda ms: tflops(b, h, s, d, causal, ms))
            for s in args.bwd_seqlens:
                b, h = 16384 // s, 2048 // d
                q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
                cuda.forward(q, k, v, out, lse, causal=causal, scale=1 / math.sqrt(d),
                             stream=torch.cuda.current_stream().cuda_stream)
                fns = {name: backward_runner(q, k, v, dout, out, lse, causal, swap)
                       for name, swap in swaps.items()}
                fns["cudnn"] = cudnn_backward(q, k, v, dout, causal)
                report(f"bwd D{d} {'causal' if causal else 'full'} S{s}", in_turns(fns, args.turns),
                       lambda ms: bwd_tflops(b, h, s, d, causal, ms))
    print("SUMMARY ab: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
