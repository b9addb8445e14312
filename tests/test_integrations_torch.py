"""xattn inside the tools torch training uses: torch.compile(fullgraph=True) and CUDA graphs.

* A small pre-norm transformer block (QKV projection, causal GQA xattn.attention, output
  projection, MLP) compiled with fullgraph=True — so any graph break is an error — gives the
  same outputs and gradients as the same block run eagerly, and the eager block matches a float64
  copy of itself that uses the exact attention oracle. The compiled graph must call the xattn
  custom op (not a traced-through fallback). CPU tensors run the reference backend (every CI
  run); CUDA tensors the cuda backend (`gpu` marker).
* CUDA graphs (`gpu`): forward and backward captured in one torch.cuda.CUDAGraph, replayed
  with new inputs copied into the static tensors, give the float64 oracle's out, dQ, dK, dV.
  A capture fails if xattn synchronizes with the host, allocates outside torch's allocator or
  compiles inside the captured region, so this also checks that none of these happens there.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
nn = torch.nn

import xattn  # noqa: E402
from tolerances import TOLERANCES  # noqa: E402
from xattn import reference  # noqa: E402

# Relative errors ‖got − want‖ / ‖want‖: tests/tolerances.py's rows.
BLOCK_TOLERANCE = TOLERANCES["block"]
COMPILED_VS_EAGER = TOLERANCES["compiled_vs_eager"]
ATTENTION_TOLERANCE = TOLERANCES["out"]  # attention alone against the float64 oracle
GRAD_TOLERANCE = TOLERANCES["grad"]


def rel_error(got, want) -> float:
    got = got.detach().double().cpu()
    want = torch.as_tensor(want).detach().double().cpu()
    return float((got - want).norm() / want.norm())


def exact_sdpa(q, k, v, causal):
    """Float64 attention with K/V repeated for GQA, in (B, S, H, D): the block's oracle."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2)


def xattn_attention(q, k, v, causal):
    return xattn.attention(q, k, v, causal=causal, layout="bshd")


class Block(nn.Module):
    """Pre-norm decoder block with grouped-query attention, in the (B, S, H, D) layout."""

    def __init__(self, dim=64, heads=4, kv_heads=2, head_dim=16, attend=xattn_attention):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attend = attend

    def forward(self, x):
        batch, seqlen, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, seqlen, -1, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        attended = self.attend(q, k, v, True)
        x = x + self.proj(attended.reshape(batch, seqlen, -1))
        return x + self.mlp(self.norm2(x))


def _devices():
    return [pytest.param("cpu", id="cpu-reference"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _skip_unless_usable(device):
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("torch does not see a CUDA GPU")
        usable, why = xattn.available_backends()["cuda"]
        if not usable:
            pytest.skip(f"cuda backend unusable: {why}")


def _compile_backends(device):
    # aot_eager traces exactly as inductor does (Dynamo, fake tensors, AOTAutograd) without
    # generating code; inductor needs a C++ compiler on the CPU.
    backends = ["aot_eager"]
    if device == "cuda" or shutil.which("g++") or shutil.which("c++"):
        backends.append("inductor")
    return backends


def _recording(backend_name, graphs):
    """A torch.compile backend that keeps Dynamo's graph and hands it on to backend_name."""
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(backend_name)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    return backend


def _run_block(block, x, weights):
    """Output, and gradients of sum(out * weights) with respect to x and every parameter."""
    x = x.detach().clone().requires_grad_()
    out = block(x)
    params = [p for p in block.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return out.detach(), grads


@pytest.mark.parametrize("device", _devices())
def test_compiled_block_matches_eager_and_the_oracle(device):
    _skip_unless_usable(device)
    torch._dynamo.reset()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    name = str(dtype).removeprefix("torch.")
    generator = torch.Generator().manual_seed(0)
    block = Block().to(device=device, dtype=dtype)
    x = torch.randn(2, 100, 64, generator=generator).to(device=device, dtype=dtype)
    weights = torch.randn(2, 100, 64, generator=generator).to(device=device, dtype=dtype)

    eager_out, eager_grads = _run_block(block, x, weights)

    # Oracle: the same weights in float64 on the CPU, with exact attention.
    exact = copy.deepcopy(block).to(device="cpu", dtype=torch.float64)
    exact.attend = exact_sdpa
    exact_out, exact_grads = _run_block(exact, x.cpu().double(), weights.cpu().double())
    assert rel_error(eager_out, exact_out) <= BLOCK_TOLERANCE[name]
    for got, want in zip(eager_grads, exact_grads):
        assert rel_error(got, want) <= 3 * BLOCK_TOLERANCE[name]

    for backend_name in _compile_backends(device):
        torch._dynamo.reset()
        graphs = []
        compiled = torch.compile(block, fullgraph=True, backend=_recording(backend_name, graphs))
        out, grads = _run_block(compiled, x, weights)
        assert len(graphs) == 1, f"{backend_name}: {len(graphs)} graphs (a graph break?)"
        targets = {str(node.target) for node in graphs[0].graph.nodes}
        assert "xattn.attention_forward.default" in targets, sorted(targets)
        assert rel_error(out, eager_out) <= COMPILED_VS_EAGER[name], backend_name
        for got, want in zip(grads, eager_grads):
            assert rel_error(got, want) <= COMPILED_VS_EAGER[name], backend_name
    torch._dynamo.reset()


@pytest.mark.parametrize("device", _devices())
def test_compiled_attention_alone_with_dynamic_lengths(device):
    """Two sequence lengths through one compiled function, marked dynamic: the fake
    implementation must give symbolic shapes, and each result must still be exact."""
    _skip_unless_usable(device)
    torch._dynamo.reset()
    dtype = torch.float32 if device == "cpu" else torch.float16
    name = str(dtype).removeprefix("torch.")

    @torch.compile(fullgraph=True, dynamic=True, backend="aot_eager")
    def attend(q, k, v):
        return xattn.attention(q, k, v, causal=True)

    for seqlen in (37, 130):
        q = torch.randn(1, 4, seqlen, 32, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, 2, seqlen + 5, 32, device=device, dtype=dtype,
                            requires_grad=True) for _ in range(2))
        dout = torch.randn_like(q)
        out = attend(q, k, v)
        out.backward(dout)
        want, _ = xattn.exact_attention(q, k, v, causal=True)
        assert rel_error(out, want) <= ATTENTION_TOLERANCE[name]
        scale = 1 / np.sqrt(32)
        exact = reference.exact_attention_grad_bhsd(
            *(t.detach().double().cpu().numpy() for t in (q, k, v, dout)), causal=True,
            scale=scale)
        for got, want in zip((q.grad, k.grad, v.grad), exact):
            assert rel_error(got, want) <= GRAD_TOLERANCE[name]
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ CUDA graphs

@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_cuda_graph_capture_and_replay_forward_and_backward(dtype_name):
    _skip_unless_usable("cuda")
    dtype = getattr(torch, dtype_name)
    shape_q, shape_kv = (2, 8, 200, 64), (2, 2, 200, 64)
    static_q = torch.randn(shape_q, device="cuda", dtype=dtype, requires_grad=True)
    static_k, static_v = (torch.randn(shape_kv, device="cuda", dtype=dtype, requires_grad=True)
                          for _ in range(2))
    static_dout = torch.randn(shape_q, device="cuda", dtype=dtype)

    def step():
        out = xattn.attention(static_q, static_k, static_v, causal=True)
        grads = torch.autograd.grad(out, (static_q, static_k, static_v), static_dout)
        return (out, *grads)

    # Warm up on a side stream, as torch.cuda.graphs asks: compiles the kernels (outside the
    # capture) and settles the allocator.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_results = step()

    generator = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):  # new data each replay: results must follow it
        for static in (static_q, static_k, static_v, static_dout):
            with torch.no_grad():
                static.copy_(torch.randn(static.shape, device="cuda", dtype=dtype,
                                         generator=generator))
        for result in static_results:
            result.fill_(float("nan"))  # poisoned: replay has to write every element
        graph.replay()
        torch.cuda.synchronize()
        host = [t.detach().double().cpu().numpy()
                for t in (static_q, static_k, static_v, static_dout)]
        want_out, _ = reference.exact_attention_bhsd(*host[:3], causal=True, scale=1 / 8)
        want_grads = reference.exact_attention_grad_bhsd(*host, causal=True, scale=1 / 8)
        assert rel_error(static_results[0], want_out) <= ATTENTION_TOLERANCE[dtype_name]
        for got, want in zip(static_results[1:], want_grads):
            assert rel_error(got, want) <= GRAD_TOLERANCE[dtype_name]


@pytest.mark.gpu
def test_cuda_graph_of_a_training_step_of_the_block():
    """Forward, backward and an SGD update of the block, captured whole and replayed: the
    parameters after each replay match the same steps run eagerly on a copy."""
    _skip_unless_usable("cuda")
    torch.manual_seed(0)
    block = Block().to(device="cuda", dtype=torch.float16)
    twin = copy.deepcopy(block)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    static_x = torch.randn(2, 128, 64, device="cuda", dtype=torch.float16)

    def step(model, opt, x):
        opt.zero_grad(set_to_none=False)
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # the same warm-up steps on both copies
            step(block, optimizer, static_x)
            step(twin, twin_optimizer, static_x)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(block, optimizer, static_x)

    for _ in range(3):
        x = torch.randn(2, 128, 64, device="cuda", dtype=torch.float16)
        static_x.copy_(x)
        graph.replay()
        eager_loss = step(twin, twin_optimizer, x)
        torch.cuda.synchronize()
        assert rel_error(static_loss, eager_loss) <= 1e-2
        for p, q in zip(block.parameters(), twin.parameters()):
            assert rel_error(p, q) <= 1e-2
