"""The shapes the issues' shortfalls are on, each once through xattn and once through cuDNN, for
Nsight Compute (ci/ncu_profile.sh profiles only the launches inside the NVTX range "profile"):

    ncu --nvtx --nvtx-include "profile/" ... python ci/ncu_cases.py [CASE ...]

Cases (bf16; B*S = 16384 and H*D = 2048 as `bench` uses, decode as `bench --decode`):
  fwd128   forward D128 S2048, not causal    (0.84x cuDNN, issue 13)
  fwd64    forward D64 S4096, not causal     (0.86-0.91x)
  fwd128c  forward D128 S2048, causal        (0.94x)
  fwd64c   forward D64 S2048, causal         (0.92-0.94x)
  bwd64c   backward D64 S4096, causal        (0.90-0.93x: red.global dQ, issue 14)
  bwd128   backward D128 S4096, not causal   (0.92x, issue 14)
  bwd256   backward D256 S4096, not causal (the sm90 D256 row: 0.91x cuDNN, issue 14)
  decode   decode B8 Hq32 Hk8 D128 Sk32768, contiguous bf16 cache (0.90x, issue 17)
Each is warmed up (compiles, plans, cuDNN's heuristics) outside the range; the order of the
profiled launches is printed so that ncu's report can be read against it.
"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import xattn


def cudnn(fn):
    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return fn()
    return run


def attention_inputs(d, s, grad=False):
    b, h = 16384 // s, 2048 // d
    return [torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
            for _ in range(3)]


def case_forward(d, s, causal=False):
    q, k, v = attention_inputs(d, s)
    return {"xattn": lambda: xattn.attention(q, k, v, causal=causal),
            "cudnn": cudnn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))}


def case_backward(d, s, peer="cudnn", causal=False):
    """The backward runs on autograd's device thread, outside the caller's NVTX range: a hook on
    the output (before the attention's backward node) opens a range there, one on q (after it)
    closes it, so the range holds that node's kernels and nothing else."""
    q, k, v = attention_inputs(d, s, grad=True)
    dout = torch.randn_like(q)
    state = {"profile": False}

    def push(grad):
        if state["profile"]:
            torch.cuda.nvtx.range_push("profile")

    def pop(grad):
        if state["profile"]:
            torch.cuda.nvtx.range_pop()

    def attention(fn):
        out = fn(q, k, v)
        out.register_hook(push)
        return out

    q.register_hook(pop)
    outs = {"xattn": attention(lambda *a: xattn.attention(*a, causal=causal))}
    backend = SDPBackend.CUDNN_ATTENTION if peer == "cudnn" else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        outs[peer] = attention(lambda *a: F.scaled_dot_product_attention(*a, is_causal=causal))

    def grads(name):
        def run(profile=False):
            state["profile"] = profile
            # retain_graph: the same graph's backward runs in the warm-up and in the profiled launch
            torch.autograd.grad(outs[name], (q, k, v), dout, retain_graph=True)
            state["profile"] = False
        run.own_range = True
        return run
    return {name: grads(name) for name in outs}


def case_decode(batch=8, heads_q=32, heads_k=8, seqlen=32768, d=128):
    q = torch.randn(batch, heads_q, 1, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads_k, seqlen, d, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    lengths = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
    return {"xattn": lambda: xattn.attention_with_kvcache(q, k, v, cache_seqlens=lengths),
            "cudnn": cudnn(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))}


CASES = {"fwd128": lambda: case_forward(128, 2048), "fwd64": lambda: case_forward(64, 4096),
         "fwd128c": lambda: case_forward(128, 2048, causal=True),
         "fwd64c": lambda: case_forward(64, 2048, causal=True),
         "bwd128": lambda: case_backward(128, 4096), "decode": case_decode,
         "bwd256": lambda: case_backward(256, 4096),
         "bwd64c": lambda: case_backward(64, 4096, causal=True)}


def main(names):
    for name in names or CASES:
        impls = CASES[name]()
        for impl, fn in impls.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            print(f"profiled: {name} {impl}", flush=True)
            if getattr(fn, "own_range", False):
                fn(profile=True)
            else:
                torch.cuda.nvtx.range_push("profile")
                fn()
                torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
        del impls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
