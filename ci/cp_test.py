"""Context parallelism over xattn: forward + backward equal to one GPU on the whole sequence.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        torchrun --nproc-per-node N ci/cp_test.py          # any N >= 1

With "xattn" activated, PyTorch's context_parallel (zigzag load balancing when causal, plain
sharding otherwise) runs SDPA as a ring over the ranks; each case is compared with single-GPU
xattn (xattn.attention, its own API, autograd) on the full sequence that every rank also holds:
out, dq, dk, dv, relative error bound per dtype below. A profiler trace of one CP step on rank 0
must show xattn's kernels (flash_fwd*, flash_bwd*) and none of torch's FA2 (pytorch_flash::).
The same cases also run through xattn's own ring (xattn.distributed.ring_attention, NCCL
point-to-point). Exits 1 if any case fails; prints one line per case on rank 0.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from cp_common import cp_forward_backward, implementation, ring_forward_backward, setup

import xattn

# ‖cp - single‖ / ‖single‖: both sides are xattn's kernels in bfloat16 with float32 accumulation;
# CP adds the float32 merge of partial results by their lse and float32 gradient sums, and
# rounds the output and gradients to bfloat16 once more (about 4e-3 relative each).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}

CASES = [  # (causal, Hq, Hk, dtype)
    (True, 8, 8, torch.bfloat16),
    (False, 8, 8, torch.bfloat16),
    (True, 8, 2, torch.bfloat16),    # GQA
    (False, 8, 2, torch.float16),
]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main():
    rank, world, mesh = setup()
    seq = 2 * world * 192 + 0  # 2N chunks for the zigzag, each 192 rows (not a tile multiple)
    failures = 0
    for causal, hq, hk, dtype in CASES:
        label = f"causal={causal!s:5} Hq={hq} Hk={hk} {str(dtype)[6:]:8} S={seq} N={world}"
        try:
            g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
            q = torch.randn(2, hq, seq, 128, generator=g).to("cuda", dtype)
            k, v = (torch.randn(2, hk, seq, 128, generator=g).to("cuda", dtype)
                    for _ in range(2))
            dout = torch.randn(2, hq, seq, 128, generator=g).to("cuda", dtype)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            want = xattn.attention(*leaves, causal=causal)
            want.backward(dout)
            wants = [want.detach()] + [t.grad for t in leaves]

            with implementation("xattn"):
                if rank == 0:
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CUDA]) as trace:
                        gots = cp_forward_backward(mesh, q, k, v, dout, causal)
                        torch.cuda.synchronize()
                    names = {e.name for e in trace.events()
                             if e.device_type == torch.autograd.DeviceType.CUDA}
                else:
                    gots = cp_forward_backward(mesh, q, k, v, dout, causal)
                    names = None
            errors = [rel(got, w) for got, w in zip(gots, wants)]
            # xattn's own ring (xattn.distributed) on the same case, NCCL P2P.
            errors += [rel(got, w) for got, w in zip(
                ring_forward_backward(q, k, v, dout, causal), wants)]
            ok = all(e <= TOLERANCE[dtype] for e in errors)
            if names is not None:
                ran = (any(n.startswith("flash_fwd") for n in names)
                       and any(n.startswith("flash_bwd") for n in names)
                       and not any("pytorch_flash" in n for n in names))
                ok = ok and ran
                errors.append("xattn kernels ran" if ran else f"KERNELS: {sorted(names)[:8]}")
            verdict = torch.tensor([int(ok)], device="cuda")
            dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
            ok = bool(verdict.item())
        except Exception as error:  # report the case, keep going with the others
            ok, errors = False, [f"{type(error).__name__}: {error}"]
        failures += not ok
        if rank == 0:
            shown = ", ".join(f"{e:.1e}" if isinstance(e, float) else e for e in errors)
            print(f"{'PASS' if ok else 'FAIL'} {label}  rel err out/dq/dk/dv (PyTorch CP, then "
                  f"xattn ring): {shown}",
                  flush=True)
    if rank == 0:
        print(f"cp_test: {len(CASES) - failures}/{len(CASES)} cases passed on {world} ranks",
              flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
