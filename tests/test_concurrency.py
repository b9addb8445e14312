"""Concurrency (gpu): first calls from many threads, two streams at once, a second GPU.

- 16 threads make the first call of the same uncompiled variant (fresh CUPY_CACHE_DIR, xattn's and
  CuPy's memos cleared): xattn.jit compiles it once (counted by wrapping jit._build) and every
  thread gets the right result.
- Two torch streams run different shapes at once, many times over: every result equals the one
  computed alone on the default stream, bit for bit (the forward is deterministic).
- Tensors on cuda:1 run on cuda:1 while cuda:0 is current (skipped with fewer than 2 GPUs).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import xattn
from tolerances import tolerance
from xattn import jit

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.fixture
def cuda_ready(cuda_backend):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return cuda_backend


def oracle_error(q, k, v, out, causal):
    want, _ = xattn.exact_attention(q, k, v, causal=causal)
    got = out.detach().double().cpu().numpy()
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def test_16_threads_compile_a_new_variant_once(cuda_ready, monkeypatch):
    from xattn import call, launch
    # A process that has compiled nothing yet: xattn's memo, validated calls and plans empty
    # (CuPy's disk cache may be warm; jit._build runs once per new variant either way, which is
    # what is counted).
    monkeypatch.setattr(jit, "_modules", {})
    monkeypatch.setattr(call, "_calls", {})
    monkeypatch.setattr(launch, "_plans", {})
    monkeypatch.setattr(launch, "_smem_configured", set())  # keyed by kernel handles
    builds = []
    real_build = jit._build

    def counting_build(*args, **kwargs):
        builds.append(args[2][-3:])  # a few options, for the message
        return real_build(*args, **kwargs)

    monkeypatch.setattr(jit, "_build", counting_build)
    inputs = [tuple(torch.randn(1, 3, 97, 80, device="cuda", dtype=torch.bfloat16)
                    for _ in range(3)) for _ in range(16)]
    torch.cuda.synchronize()
    barrier = threading.Barrier(16)
    results, errors = [None] * 16, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = xattn.attention(*inputs[i], causal=True)
            torch.cuda.current_stream().synchronize()
        except Exception as error:  # reported below, not swallowed
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(builds) == 1, builds
    for i in range(16):
        assert oracle_error(*inputs[i], results[i], True) <= tolerance("out", "bfloat16")


def test_two_streams_with_different_shapes_stay_correct(cuda_ready):
    shapes = [((2, 8, 1000, 64), (2, 2, 1500, 64), True), ((1, 4, 333, 128), (1, 4, 4096, 128), False)]
    problems = [tuple(torch.randn(s, device="cuda", dtype=torch.float16)
                      for s in (qs, kvs, kvs)) + (causal,) for qs, kvs, causal in shapes]
    alone = [xattn.attention(q, k, v, causal=c) for q, k, v, c in problems]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [[], []]
    for _ in range(20):
        for i, stream in enumerate(streams):
            stream.wait_stream(torch.cuda.default_stream())
            with torch.cuda.stream(stream):
                q, k, v, c = problems[i]
                outs[i].append(xattn.attention(q, k, v, causal=c))
    torch.cuda.synchronize()
    for i in range(2):
        for out in outs[i]:
            assert torch.equal(out, alone[i]), f"stream {i} result differs from the lone run"
        assert oracle_error(*problems[i][:3], alone[i], problems[i][3]) <= tolerance("out", "float16")


def test_tensors_on_cuda1_run_on_cuda1_while_cuda0_is_current(cuda_ready):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    import cupy
    with torch.cuda.device(0):
        q, k, v = (torch.randn(2, 4, 130, 64, device="cuda:1", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        out = xattn.attention(q, k, v, causal=True)
        assert out.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
        assert oracle_error(q, k, v, out, True) <= tolerance("out", "bfloat16")
        out.float().sum().backward()  # the backward too runs on cuda:1
        assert q.grad.device == torch.device("cuda:1") and torch.isfinite(q.grad).all()
        with cupy.cuda.Device(0):
            with cupy.cuda.Device(1):
                cq, ck, cv = (cupy.random.standard_normal((1, 2, 70, 32)).astype(cupy.float16)
                              for _ in range(3))
            cout = xattn.attention(cq, ck, cv)
            assert cout.device.id == 1 and cupy.cuda.Device().id == 0
            want, _ = xattn.exact_attention(cq, ck, cv)
            got = cupy.asnumpy(cout).astype(np.float64)
            assert np.linalg.norm(got - want) <= tolerance("out", "float16") * np.linalg.norm(want)
