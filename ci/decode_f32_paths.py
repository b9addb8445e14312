"""The float32 decode on NVIDIA (flash_decode_f32.cu) from two source trees in one process: this
checkout's kernels against another tree's (e.g. the commit before the decode's CUDA-core body moved
into kernels_common/flash_decode_simt.h), side by side, to show the CUDA decode did not get slower
(issue 12: the faster of the two designs kept, measured). Python, the launch and the parameter
block are this checkout's for both; only the kernel sources differ.

    PYTHONPATH=. python ci/decode_f32_paths.py OLD

OLD: a folder holding the other tree's kernels_cuda/ and kernels_common/ (e.g. `git archive <commit>
kernels_cuda kernels_common | tar -x -C /tmp/decode_old`), or a git revision of this checkout,
extracted so into a temporary folder.

Each case is checked against a float64 oracle (both trees), then timed in interleaved rounds
(median milliseconds per call, as `python -m xattn bench` times; the ratio is the median of the
rounds' new / old). Cases: float32 caches (contiguous and paged) and FP8 caches (e4m3fn, float32
queries: the same kernel), decode steps of one token with GQA and a few query tokens.
"""

import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from xattn import jit, kvcache, sources
from xattn.bench import _timer
from xattn.kvcache import attention_with_kvcache, quantize

ROUNDS = 5

# (batch, heads_q, heads_k, seqlen_q, cached keys, head_dim, cache kind)
CASES = [(8, 32, 8, 1, 4096, 128, "f32"), (8, 32, 8, 1, 4096, 64, "f32"),
         (2, 32, 8, 4, 16384, 128, "f32"), (1, 8, 8, 1, 32768, 256, "f32"),
         (8, 32, 8, 1, 4096, 128, "paged"), (8, 32, 8, 1, 4096, 128, "fp8"),
         (2, 32, 8, 4, 16384, 64, "fp8")]
PAGE_SIZE = 64


def use_tree(root: Path | None):
    """Kernel sources from `root` (a tree with kernels_cuda/ and kernels_common/), or this
    checkout's (None). Compiled modules are memoized by source hash, so both stay loaded; the
    decode's plans (which hold the compiled kernels) are dropped."""
    if root is None:
        sources.kernel_source = _own_source
    else:
        def kernel_source(vendor, name):
            return (root / f"kernels_{vendor}" / name).read_text()
        sources.kernel_source = kernel_source
    jit.preprocess.cache_clear()
    jit._source_and_digest.cache_clear()
    kvcache._plans.clear()


_own_source = sources.kernel_source


def make_case(batch, heads_q, heads_k, seqlen_q, cached, head_dim, kind):
    gen = torch.Generator(device="cuda").manual_seed(0)
    smax = cached + 64
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, device="cuda", generator=gen)
    k, v = (torch.randn(batch, heads_k, smax, head_dim, device="cuda", generator=gen) for _ in range(2))
    lengths = torch.randint(cached // 2, cached + 1, (batch,), device="cuda", generator=gen, dtype=torch.int32)
    args = dict(cache_seqlens=lengths, causal=True)
    k_ref, v_ref = k.double(), v.double()
    if kind == "fp8":
        k_scale, v_scale = (torch.tensor(0.05, device="cuda") for _ in range(2))
        k, v = quantize(k, k_scale, torch.float8_e4m3fn), quantize(v, v_scale, torch.float8_e4m3fn)
        k_ref, v_ref = k.double() * k_scale.double(), v.double() * v_scale.double()
        args.update(k_scale=k_scale, v_scale=v_scale)
    if kind == "paged":  # pages in a shuffled order: (num_pages, page_size, Hk, D)
        pages_per_seq = smax // PAGE_SIZE
        order = torch.randperm(batch * pages_per_seq, device="cuda", generator=gen)
        table = order.reshape(batch, pages_per_seq).to(torch.int32)
        paged = [torch.empty(batch * pages_per_seq, PAGE_SIZE, heads_k, head_dim, device="cuda")
                 for _ in range(2)]
        for src, dst in zip((k, v), paged):
            blocks = src.reshape(batch, heads_k, pages_per_seq, PAGE_SIZE, head_dim).permute(0, 2, 3, 1, 4)
            dst[table.reshape(-1).long()] = blocks.reshape(-1, PAGE_SIZE, heads_k, head_dim)
        k, v = paged
        args.update(block_table=table)
    return q, k, v, args, oracle(q, k_ref, v_ref, lengths)


def oracle(q, k, v, lengths):
    """float64 attention of each sequence's queries against its first lengths[b] keys, causal
    bottom-right aligned."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    group = heads_q // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(batch):
        n = int(lengths[b])
        kb = k[b, :, :n].repeat_interleave(group, 0)
        vb = v[b, :, :n].repeat_interleave(group, 0)
        s = q[b].double() @ kb.transpose(-1, -2) / math.sqrt(head_dim)
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        s = s.masked_fill(j > i + n - seqlen_q, float("-inf"))
        out[b] = torch.softmax(s, -1) @ vb
    return out


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    old = Path(sys.argv[1])
    if not old.is_dir():  # a revision: its kernel sources into a temporary folder
        old = Path(tempfile.mkdtemp(prefix="decode_old_"))
        archive = subprocess.run(["git", "archive", sys.argv[1], "kernels_cuda", "kernels_common"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    old = old.resolve()
    ms = _timer()
    print("| B Hq Hk Sq keys D | cache | err old | err new | ms old | ms new | new / old |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        q, k, v, args, want = make_case(*case)

        def call():
            return attention_with_kvcache(q, k, v, **args)

        errors, times = {}, {"old": [], "new": []}
        for tree in ("old", "new"):
            use_tree(old if tree == "old" else None)
            errors[tree] = (call().double() - want).abs().max().item()
        for _ in range(ROUNDS):  # interleaved: clocks and caches drift alike for both
            for tree in ("old", "new"):
                use_tree(old if tree == "old" else None)
                call()  # the plan, outside the timing
                times[tree].append(ms(call))
        ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
        b, hq, hk, sq, keys, d, kind = case
        print(f"| {b} {hq} {hk} {sq} {keys} {d} | {kind} | {errors['old']:.1e} | {errors['new']:.1e} | "
              f"{statistics.median(times['old']):.4f} | {statistics.median(times['new']):.4f} | "
              f"{ratio:.3f} |", flush=True)
    use_tree(None)


if __name__ == "__main__":
    main()
