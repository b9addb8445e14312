"""Where the host time of one call goes: cProfile over 200 calls of a decode step
(attention_with_kvcache, B=8 Hq=32 Hk=8 Sk=4096 D=128 bf16) and of a small forward
(attention, B=1 H=8 S=128 D=64 fp16), the same forward and backward through autograd, and a
packed batch of 16 x 128 tokens (attention_varlen), after 20 warm-up calls. Prints the top functions by own time.

    PYTHONPATH=. python ci/profile_overhead.py
"""

import cProfile
import io
import pstats

import torch

import xattn


def main() -> None:
    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((8,), 4096, dtype=torch.int32, device="cuda")
    small = torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.float16)
    leaf = small.clone().requires_grad_()
    packed = torch.randn(16 * 128, 8, 64, device="cuda", dtype=torch.float16)
    cu = torch.arange(0, 17 * 128, 128, dtype=torch.int32, device="cuda")

    def train_step():
        torch.autograd.grad(xattn.attention(leaf, leaf, leaf), (leaf,), small)

    calls = {"decode": lambda: xattn.attention_with_kvcache(q, k, v, cache_seqlens=lengths, causal=False),
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


if __name__ == "__main__":
    main()
