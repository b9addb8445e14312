"""The H200's measured memory bandwidth, the decode's yardstick: a 4 GiB device-to-device copy
(read + write bytes over the time) and a 4 GiB read (torch.sum: read bytes over the time), timed
as `python -m xattn bench` times (triton's do_bench, median).

    PYTHONPATH=. python ci/results/2026-11-30-decode-perf/copy_bandwidth.py
"""

import torch

from xattn.bench import _timer

timer = _timer()
x = torch.ones(2**31, dtype=torch.bfloat16, device="cuda")
y = torch.empty_like(x)
nbytes = x.numel() * x.element_size()
ms = timer(lambda: y.copy_(x))
print(f"copy: {2 * nbytes / ms / 1e9:.2f} TB/s (read + write of {nbytes / 2**30:.0f} GiB)")
ms = timer(lambda: x.sum(dtype=torch.float32))
print(f"read: {nbytes / ms / 1e9:.2f} TB/s (torch.sum of {nbytes / 2**30:.0f} GiB)")
