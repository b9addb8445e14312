"""(Ran at commit 56d7ce7; the bulk path and XATTN_DECODE_BULK were removed after it.) Probe of the
sm_90 bulk-copy decode path before it is benchmarked: one call per case, each in
its own process with a time limit (a kernel that never finishes cannot stall the others), output
compared with the cp.async path's (XATTN_DECODE_BULK=0) on the same inputs. Prints one line per
case: OK / DIFF / FAIL / HANG. Exit 1 unless every case is OK.

    PYTHONPATH=. python ci/results/2026-11-30-decode-perf/probe.py
"""

import os
import subprocess
import sys

CASES = {  # name: (B, Hq, Hk, Smax, page size, FP8, forced splits): steps of 64 keys per block
    "3 steps, no slot reuse": (1, 8, 2, 192, 0, False, 1),
    "4 steps, one slot reused": (1, 8, 2, 256, 0, False, 1),
    "64 steps": (1, 8, 2, 4096, 0, False, 1),
    "bench Hk8 Sk4096": (8, 32, 8, 4096, 0, False, 0),
    "bench Hk8 Sk4096 paged": (8, 32, 8, 4096, 16, False, 0),
    "bench Hk8 Sk4096 fp8": (8, 32, 8, 4096, 0, True, 0),
    "bench Hk8 Sk4096 fp8 paged": (8, 32, 8, 4096, 16, True, 0),
    "bench Hk32 Sk4096": (8, 32, 32, 4096, 0, False, 0),
}

CHILD = r"""
import sys, time, torch, xattn
from xattn import kvcache
from xattn.bench import _decode_caches
b, hq, hk, smax, page, fp8, splits = eval(sys.argv[1])
kvcache._FORCED_SPLITS = splits
gen = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(b, hq, 1, 128, generator=gen, device="cuda").bfloat16()
k, v = (torch.randn(b, hk, smax, 128, generator=gen, device="cuda").bfloat16() for _ in range(2))
kc, vc, table, ks, vs = _decode_caches(k, v, page, fp8, torch.Generator().manual_seed(0))
lengths = torch.full((b,), smax, dtype=torch.int32, device="cuda")
outs = []
for bulk in (False, True):
    kvcache.BULK_COPY = bulk
    kvcache._plans.clear()
    out = xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, causal=False, block_table=table,
                                       k_scale=ks, v_scale=vs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        xattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, causal=False, block_table=table,
                                     k_scale=ks, v_scale=vs)
    torch.cuda.synchronize()
    outs.append((out.float(), (time.perf_counter() - start) / 5 * 1e6))
diff = (outs[0][0] - outs[1][0]).abs().max().item()
print(f"maxdiff {diff:.3g} us cp.async {outs[0][1]:.0f} bulk {outs[1][1]:.0f}")
sys.exit(0 if diff == 0 else 3)
"""

procs = {name: subprocess.Popen([sys.executable, "-c", CHILD, repr(case)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
         for name, case in CASES.items()}
bad = 0
for name, proc in procs.items():
    try:
        out, _ = proc.communicate(timeout=60)
        verdict = {0: "OK", 3: "DIFF"}.get(proc.returncode, "FAIL")
        detail = out.strip().splitlines()[-1] if out.strip() else ""
    except subprocess.TimeoutExpired:
        proc.kill()
        verdict, detail = "HANG", "no result within 60 s"
    bad += verdict != "OK"
    print(f"{verdict:5} {name}: {detail}", flush=True)
sys.exit(1 if bad else 0)
