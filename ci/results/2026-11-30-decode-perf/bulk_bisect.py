"""Next step for the bulk-copy hang (README.md here; not run yet): the decode's copy pattern taken
apart into standalone kernels, from the smallest up, each launched in its own process with a time
limit so that one that never finishes cannot stall the rest. Prints OK / WRONG / FAIL / HANG per
kernel; the first one that hangs names the piece to look at.

  one_copy       one thread: init a barrier, expect 256 bytes, one cp.async.bulk row, wait phase 0
  warp_copies    lane 0 inits and expects 32 rows, each lane copies one row (the waterfall loop)
  lane_init      as warp_copies, but barriers initialized by lanes 0-2 (the decode's init)
  ring           lanes 0-2 init a 3-slot ring; 8 steps, each lane 0's expect then 32 rows into
                 slot t % 3, waited with parity (t / 3) & 1 (the decode's pipeline, no math)
  ring_4warps    ring in each of 4 warps, 256 blocks, 2 per SM (the decode's launch shape)

    PYTHONPATH=. python ci/results/2026-11-30-decode-perf/bulk_bisect.py      (needs CuPy, sm_90)
"""

import subprocess
import sys

SOURCE = r"""
typedef unsigned int u32;
#define ROW 256  // bytes per row, as D = 128 bf16
__device__ __forceinline__ u32 sa(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void init(u32 bar) { asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar)); }
__device__ __forceinline__ void fence_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void expect(u32 bar, u32 n) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(n) : "memory");
}
__device__ __forceinline__ void copy(u32 dst, const void* src, u32 n, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(n), "r"(bar) : "memory");
}
__device__ __forceinline__ void wait(u32 bar, u32 parity) {
    asm volatile("{\n.reg .pred done;\nW:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra.uni W;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
// out[block * 32 + lane] = sum of the lane's row as bytes after the last step: checks the data too
extern "C" __global__ void bisect(const unsigned char* src, unsigned* out, int mode, int steps) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int stages = mode >= 2 ? 3 : 1;  // mode 2: three barriers inited, one used
    const u32 bars = sa(smem) + warp * 64;                       // 8 barriers of 8 bytes per warp
    unsigned char* ring = smem + 1024 + warp * stages * 32 * 272;   // rows padded to 272 bytes
    if (mode == 0) {
        if (threadIdx.x == 0) {
            init(bars);
            fence_init();
            expect(bars, ROW);
            copy(sa(ring), src + (size_t)blockIdx.x * ROW, ROW, bars);
            wait(bars, 0);
            unsigned s = 0;
            for (int i = 0; i < ROW; ++i) s += ring[i];
            out[blockIdx.x * 32] = s;
        }
        return;
    }
    if (mode == 1 ? lane == 0 : lane < stages) init(bars + 8 * lane);
    fence_init();
    __syncwarp();
    const size_t base = ((size_t)blockIdx.x * (blockDim.x / 32) + warp) * steps * 32;
    for (int t = 0; t < steps; ++t) {
        const int slot = t % stages;
        if (lane == 0) expect(bars + 8 * slot, 32 * ROW);
        __syncwarp();
        copy(sa(ring + (slot * 32 + lane) * 272), src + (base + t * 32 + lane) * ROW, ROW, bars + 8 * slot);
        wait(bars + 8 * slot, (t / stages) & 1);
        __syncwarp();
    }
    const unsigned char* row = ring + (((steps - 1) % stages) * 32 + lane) * 272;
    unsigned s = 0;
    for (int i = 0; i < ROW; ++i) s += row[i];
    out[(blockIdx.x * (blockDim.x / 32) + warp) * 32 + lane] = s;
}
"""

MODES = {  # name: (mode, blocks, warps, steps)
    "one_copy": (0, 1, 1, 1),
    "warp_copies": (1, 1, 1, 1),
    "lane_init": (2, 1, 1, 1),
    "ring": (3, 1, 1, 8),
    "ring_4warps": (3, 256, 4, 8),
}

CHILD = r"""
import sys
import cupy, numpy as np
mode, blocks, warps, steps = eval(sys.argv[1])
source = sys.argv[2]
kernel = cupy.RawKernel(source, "bisect", options=("-std=c++17",))
rows = blocks * warps * steps * 32
src = cupy.asarray(np.random.default_rng(0).integers(0, 256, rows * 256, dtype=np.uint8))
out = cupy.zeros(blocks * warps * 32, dtype=cupy.uint32)
smem = 1024 + warps * 3 * 32 * 272
kernel.max_dynamic_shared_size_bytes = smem
kernel((blocks,), (warps * 32,), (src, out, np.int32(mode), np.int32(steps)), shared_mem=smem)
cupy.cuda.Device().synchronize()
host = cupy.asnumpy(src).reshape(blocks, warps, steps, 32, 256).astype(np.uint64)
want = host[:, :, -1].sum(-1).reshape(-1) if mode else host[:, 0, 0, 0].sum(-1)
got = cupy.asnumpy(out).reshape(-1) if mode else cupy.asnumpy(out)[::32]
sys.exit(0 if np.array_equal(got.astype(np.uint64), want) else 3)
"""

if __name__ == "__main__":
    failed = 0
    for name, case in MODES.items():
        try:
            rc = subprocess.run([sys.executable, "-c", CHILD, repr(case), SOURCE], timeout=30,
                                capture_output=True, text=True).returncode
            verdict = {0: "OK", 3: "WRONG"}.get(rc, "FAIL")
        except subprocess.TimeoutExpired:
            verdict = "HANG"
        failed += verdict != "OK"
        print(f"{verdict:5} {name}", flush=True)
    sys.exit(1 if failed else 0)
