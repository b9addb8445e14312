"""`python -m xattn bench` with the tile rows an sm_80 GPU (A100) selects, on the GPU at hand.

Issue 14 asks for the mma.sync backward at head dim 256 against FlashAttention-2 on sm_80-class
code paths; with no A100 lent, the H200 runs the A100's rows: xattn.cuda caches each device's
compute capability, and this script records 80 there before the first call, so the table and
the kernels (mma.sync, cp.async; no Hopper kernel) are the A100's while the compile target stays
the device's own. The peers (SDPA flash, cuDNN) run as they would on this GPU. Arguments are
bench's own, e.g.

    PYTHONPATH=. python ci/bench_sm80_rows.py --bwd --head-dims 256 --seqlens 2048 8192
"""

import sys

from xattn import bench, cuda

if __name__ == "__main__":
    cuda._arch_cache[0] = 80
    print("# tile rows of sm_80 (A100) forced on this GPU: xattn.cuda._arch_cache[0] = 80")
    sys.exit(bench.main(sys.argv[1:]))
