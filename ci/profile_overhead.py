"""Where the host time of one call goes.

    PYTHONPATH=. python ci/profile_overhead.py [--cprofile]

Stages (default): per-call microseconds of the forward+backward of `bench --overhead` (B=1 H=8
S=128 D=64 fp16) split by timers wrapped around xattn's own layers (the custom autograd
Function's forward and backward, the CUDA backend's calls, allocations, launches), beside the
floors that are not xattn's: SDPA flash's forward and forward+backward, and an autograd.Function
that does nothing but allocate its outputs (what any Python-level autograd node costs here).
--cprofile: cProfile's top functions for a decode step, the small forward, its forward+backward
and a packed batch, after 20 warm-up calls.
--generate: one decoding step of a Hugging Face dynamic cache as the transformers integration
makes it (xattn.attention on (B, 1, H, D) queries against (B, Hk, Sk, D) caches, Sk one longer
at every call), beside the same calls at a fixed Sk and SDPA's; then cProfile of the growing one.
Then `bench --model`'s dynamic-cache generate() (1b model, left-padded prompts, the same
prompts unpadded, and one unpadded 8192-token prompt) with "xattn" and "sdpa", and cProfile of
xattn's padded one (--generate-model: only this part).
"""

import argparse
import cProfile
import os
import collections
import functools
import io
import pstats
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import xattn
from xattn import cuda, launch, torch_ops

CALLS = 400


def per_call_us(fn, calls=CALLS):
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):  # the best of three: this is the host's pace, noise only adds
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - began)
        torch.cuda.synchronize()
    return best * 1e6 / calls


class Timers:
    """Wraps functions so that their cumulative time and call count are kept by name."""

    def __init__(self):
        self.total = collections.Counter()
        self.count = collections.Counter()

    def wrap(self, owner, name, label):
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - began
                self.count[label] += 1

        setattr(owner, name, timed)
        return original


class Floor(torch.autograd.Function):
    """The cheapest Python autograd node: allocate out and lse, save five tensors."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def stages():
    from xattn import tma

    timers = Timers()  # tensor-map re-pointing: wrapped before any plan keeps a reference to it
    timers.wrap(tma, "repoint", "tma.repoint (cuTensorMapReplaceAddress)")
    shape = (1, 8, 128, 64)
    plain = [torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(3)]
    leaves = [t.clone().requires_grad_() for t in plain]
    dout = torch.randn(shape, device="cuda", dtype=torch.float16)

    def grad_of(out):
        return torch.autograd.grad(out, leaves, dout)

    rows = {}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        rows["flash forward"] = per_call_us(lambda: F.scaled_dot_product_attention(*plain))
        rows["flash forward, inputs requiring grad"] = per_call_us(
            lambda: F.scaled_dot_product_attention(*leaves))
        rows["flash forward+backward"] = per_call_us(
            lambda: grad_of(F.scaled_dot_product_attention(*leaves)))
    rows["floor: empty autograd.Function, forward+backward"] = per_call_us(
        lambda: grad_of(Floor.apply(*leaves)[0]))
    rows["floor: torch.empty x1"] = per_call_us(lambda: torch.empty(shape, device="cuda",
                                                                    dtype=torch.float16))
    rows["xattn forward"] = per_call_us(lambda: xattn.attention(*plain))
    rows["xattn forward, inputs requiring grad"] = per_call_us(lambda: xattn.attention(*leaves))
    rows["xattn forward+backward"] = per_call_us(lambda: grad_of(xattn.attention(*leaves)))
    for name, us in rows.items():
        print(f"{us:8.1f} us  {name}")

    originals = [
        (torch_ops._EagerAttention, "forward", timers.wrap(torch_ops._EagerAttention, "forward",
                                                           "Function.forward (xattn)")),
        (torch_ops._EagerAttention, "backward", timers.wrap(torch_ops._EagerAttention, "backward",
                                                            "Function.backward (xattn)")),
        (cuda, "attention", timers.wrap(cuda, "attention", "cuda.attention")),
        (cuda, "attention_backward", timers.wrap(cuda, "attention_backward",
                                                 "cuda.attention_backward")),
        (cuda, "_run", timers.wrap(cuda, "_run", "cuda._run (launches incl. patching)")),
        (launch.Launch, "__call__", timers.wrap(launch.Launch, "__call__", "Launch.__call__")),
        (launch.Sequence, "__call__", timers.wrap(launch.Sequence, "__call__", "Sequence.__call__")),
        (launch.Launch, "launch", timers.wrap(launch.Launch, "launch",
                                              "Launch.launch (tensor-map re-pointing + cuLaunchKernel)")),
    ]
    calls = CALLS
    for _ in range(30):
        xattn.attention(*plain)
    timers.total.clear()
    timers.count.clear()
    for _ in range(calls):
        xattn.attention(*plain)
    print(f"\nxattn forward alone: tma.repoint {timers.count['tma.repoint (cuTensorMapReplaceAddress)'] / calls:.1f}x a call")
    for _ in range(30):
        grad_of(xattn.attention(*leaves))
    torch.cuda.synchronize()
    timers.total.clear()
    timers.count.clear()
    began = time.perf_counter()
    for _ in range(calls):
        grad_of(xattn.attention(*leaves))
    whole = (time.perf_counter() - began) * 1e6 / calls
    torch.cuda.synchronize()
    for owner, name, original in originals:
        setattr(owner, name, original)
    print(f"\nxattn forward+backward with timers: {whole:.1f} us per call "
          f"(the timers add about 1 us each)")
    for label, seconds in timers.total.most_common():
        print(f"{seconds * 1e6 / calls:8.1f} us  {timers.count[label] / calls:4.1f}x  {label}")


def cprofile():
    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((8,), 4096, dtype=torch.int32, device="cuda")
    small = torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.float16)
    leaf = small.clone().requires_grad_()
    packed = torch.randn(16 * 128, 8, 64, device="cuda", dtype=torch.float16)
    cu = torch.arange(0, 17 * 128, 128, dtype=torch.int32, device="cuda")

    def train_step():
        torch.autograd.grad(xattn.attention(leaf, leaf, leaf), (leaf,), small)

    calls = {"decode": lambda: xattn.attention_with_kvcache(q, k, v, cache_seqlens=lengths,
                                                             causal=False),
             "attention": lambda: xattn.attention(small, small, small),
             "forward+backward": train_step,
             "varlen": lambda: xattn.attention_varlen(packed, packed, packed, cu, cu, 128, 128)}
    for name, call in calls.items():
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            call()
        profile.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(18)
        print("=====", name)
        print(text.getvalue())


def generate(layers=16, steps=48, rounds=3):
    """Per-call host time of the dynamic-cache decode of a 16-layer model: in each step every
    layer sees caches of one length, one key longer than the step before (new tensors, as
    DynamicCache's torch.cat makes them), so a step's first call meets a new shape."""
    batch, heads, heads_k, head_dim, start = 1, 16, 4, 128, 64
    q = torch.randn(batch, 1, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    lengths = start + (rounds + 1) * steps
    caches = [[torch.randn(batch, heads_k, n, head_dim, device="cuda", dtype=torch.bfloat16)
               for n in range(lengths)] for _ in range(2)]

    def xattn_step(n):
        k, v = caches[0][n], caches[1][n]
        return xattn.attention(q, k.transpose(1, 2), v.transpose(1, 2), layout="bshd", causal=True)

    def kvcache_step(n):  # the transformers integration's decoding path
        k, v = caches[0][n], caches[1][n]
        return xattn.attention_with_kvcache(q, k.transpose(1, 2), v.transpose(1, 2),
                                            cache_seqlens=n, layout="bshd", causal=True)

    def sdpa_step(n):
        k, v = caches[0][n], caches[1][n]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True)

    def timed(step, fixed):
        for n in range(start - 8, start):  # warm-up: compiles, first-call costs
            step(n)
        torch.cuda.synchronize()
        best = float("inf")
        for r in range(rounds):
            began = time.perf_counter()
            for t in range(steps):
                for _ in range(layers):
                    step(start - 1 if fixed else start + r * steps + t)
            best = min(best, time.perf_counter() - began)
            torch.cuda.synchronize()
        return best * 1e6 / (steps * layers)

    with torch.no_grad():
        for name, step in (("xattn", xattn_step), ("xattn attention_with_kvcache", kvcache_step),
                           ("sdpa", sdpa_step)):
            print(f"{timed(step, False):8.1f} us  {name}, Sk growing (a step's first call: a new shape)")
            print(f"{timed(step, True):8.1f} us  {name}, Sk fixed")
        if os.environ.get("NO_PROFILE"):
            return
        profile = cProfile.Profile()
        first = start + rounds * steps
        profile.enable()
        for t in range(steps):
            for _ in range(layers):
                xattn_step(first + t)
        profile.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())
    generate_model()


def generate_model():
    from xattn import bench_model
    import xattn.integrations.transformers as xattn_hf

    xattn_hf.register()
    size = bench_model.SIZES["1b"]
    model = bench_model.build(size, torch.device("cuda"))
    ids, mask = bench_model.prompts(size, torch.device("cuda"))
    options = dict(do_sample=False, max_new_tokens=size.new_tokens, min_new_tokens=size.new_tokens,
                   pad_token_id=bench_model.PAD)
    long_ids = torch.randint(3, size.vocab, (1, 8192), device="cuda")
    runs = {"padded": dict(input_ids=ids, attention_mask=mask),
            "unpadded": dict(input_ids=ids, attention_mask=torch.ones_like(mask)),
            "one 8192-token prompt": dict(input_ids=long_ids, attention_mask=torch.ones_like(long_ids))}
    with torch.no_grad():
        for implementation in ("xattn", "sdpa"):
            model.set_attn_implementation(implementation)
            for name, inputs in runs.items():
                model.generate(**inputs, **options)
                torch.cuda.synchronize()
                began = time.perf_counter()
                model.generate(**inputs, **options)
                torch.cuda.synchronize()
                made = inputs["input_ids"].shape[0] * size.new_tokens
                print(f"{made / (time.perf_counter() - began):8.1f} tok/s  generate, "
                      f"{implementation}, {name} (prefill included)")
        model.set_attn_implementation("xattn")
        profile = cProfile.Profile()
        profile.enable()
        model.generate(**runs["padded"], **options)
        profile.disable()
        torch.cuda.synchronize()
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(30)
        print(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--generate-model", action="store_true")
    args = parser.parse_args()
    if args.generate_model:
        generate_model()
    else:
        generate() if args.generate else cprofile() if args.cprofile else stages()


if __name__ == "__main__":
    main()
