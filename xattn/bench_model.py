"""`python -m xattn bench --model`: a whole Llama-style decoder with attn_implementation "xattn"
and "sdpa", side by side in one process, on identical random weights.

The model comes from a transformers LlamaConfig with random weights (nothing is downloaded):
  --model-size 1b    16 layers, hidden 2048, 16 query heads and 4 KV heads of 128, MLP 8192,
                     vocabulary 32000, tied embeddings: 1.0e9 parameters, bfloat16, on the GPU.
  --model-size tiny  2 layers, hidden 64, 4 and 2 heads of 16: float32, on the GPU or the CPU
                     (the reference backend), in seconds, so that a CPU test runs every path.
Measured for each implementation, each on its own copy of the weights:
  prefill   one forward of 4 x 2048 tokens without a cache: ms
  generate  4 prompts of 96 tokens, left-padded (96, 72, 48 and 24 real tokens), 64 new tokens
            each, greedy: tokens/s of the whole generate() call, with the dynamic cache, and with
            the static cache (cache_implementation="static"), whose decoding step transformers
            compiles with torch.compile(mode="reduce-overhead") (CUDA graphs) on a GPU
  train     one step on 2 x 4096 tokens (forward, cross-entropy loss, backward, AdamW): ms and
            peak allocated memory
Ratios are xattn / sdpa in speed (above 1: xattn is faster) and in peak memory (below 1: xattn
needs less). The JSON also holds how far xattn's prefill logits are from sdpa's and the share of
generated tokens on which the two agree (bfloat16 rounding can flip a near-tie greedy choice).
A benchmark, not a test: it prints a table and writes bench_model.json and (with matplotlib)
bench_model.png.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from typing import NamedTuple

IMPLEMENTATIONS = ("xattn", "sdpa")


class ModelSize(NamedTuple):
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype: str
    prefill: tuple[int, int]  # (batch, tokens)
    prompts: tuple[int, ...]  # real tokens of each prompt; padded on the left to the longest
    new_tokens: int
    train: tuple[int, int]  # (batch, tokens)


SIZES = {
    "1b": ModelSize(layers=16, hidden=2048, heads=16, kv_heads=4, intermediate=8192, vocab=32000,
                    dtype="bfloat16", prefill=(4, 2048), prompts=(96, 72, 48, 24), new_tokens=64,
                    train=(2, 4096)),
    "tiny": ModelSize(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=128,
                      dtype="float32", prefill=(2, 32), prompts=(12, 9, 6, 3), new_tokens=4,
                      train=(2, 16)),
}
PAD, BOS, EOS = 0, 1, 2


def add_arguments(parser) -> None:
    """bench's options for --model (xattn.bench owns the parser)."""
    parser.add_argument("--model", action="store_true",
                        help="a whole Llama-style model with 'xattn' and with 'sdpa': prefill, "
                             "generate() tokens/s (dynamic and static cache), a training step")
    parser.add_argument("--model-size", choices=sorted(SIZES), default="1b",
                        help="1b: ~1e9 parameters, bf16, GPU; tiny: float32, runs on the CPU "
                             "(default: %(default)s)")
    parser.add_argument("--model-reps", type=int, default=3,
                        help="timed repetitions of each --model measurement, after one warm-up "
                             "(median; default: %(default)s)")


def build(size: ModelSize, device, seed: int = 0):
    """The random-weight model of `size`, in eval mode, with attn_implementation "sdpa"."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads, max_position_embeddings=8192,
        tie_word_embeddings=True, attention_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=EOS)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                          dtype=getattr(torch, size.dtype))
    return model.to(device).eval()


def _random_ids(batch, length, vocab, seed, device):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator).to(device)


def prompts(size: ModelSize, device):
    """(input_ids, attention_mask): the prompts of `size`, padded on the left."""
    import torch

    width = max(size.prompts)
    ids = _random_ids(len(size.prompts), width, size.vocab, 1, device)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(size.prompts):
        ids[row, :width - length] = PAD
        mask[row, width - length:] = 1
    return ids, mask


def _seconds(fn, reps: int, device) -> float:
    """Median wall seconds of fn() over `reps` runs after one warm-up, the device synchronized
    around each run (generate() and a training step are host-driven loops; wall time is what a
    user waits)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(reps):
        sync()
        began = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def measure(model, size: ModelSize, device, reps: int) -> dict:
    """Every measurement of one implementation; a failing one records its error and the rest
    still run."""
    import torch

    result: dict = {}
    compiled = device.type == "cuda"  # transformers compiles static-cache decoding on GPUs only

    def attempt(name, fn):
        try:
            fn()
        except Exception as exc:  # report, keep measuring the others
            result[f"{name}_error"] = _error(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    batch, tokens = size.prefill
    prefill_ids = _random_ids(batch, tokens, size.vocab, 2, device)

    def prefill():
        with torch.no_grad():
            result["prefill_ms"] = 1e3 * _seconds(lambda: model(prefill_ids, use_cache=False),
                                                  reps, device)
            result["prefill_logits"] = model(prefill_ids[:1], use_cache=False).logits.float()

    attempt("prefill", prefill)

    ids, mask = prompts(size, device)
    generated = len(size.prompts) * size.new_tokens
    options = dict(attention_mask=mask, do_sample=False, max_new_tokens=size.new_tokens,
                   min_new_tokens=size.new_tokens, pad_token_id=PAD)
    for label, extra in (("dynamic", {}),
                         ("static", dict(cache_implementation="static",
                                         disable_compile=not compiled))):
        def generate(label=label, extra=extra):
            with torch.no_grad():
                seconds = _seconds(lambda: model.generate(ids, **options, **extra), reps, device)
                result[f"generate_{label}_tokens_per_s"] = generated / seconds
                result[f"generate_{label}_tokens"] = model.generate(ids, **options, **extra)

        attempt(f"generate_{label}", generate)
    result["static_compiled"] = compiled

    batch, tokens = size.train
    train_ids = _random_ids(batch, tokens, size.vocab, 3, device)

    def train():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            loss = model(train_ids, labels=train_ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            step()  # the optimizer's state exists from here on, as in a real run
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            result["train_step_ms"] = 1e3 * _seconds(step, reps, device)
            if device.type == "cuda":
                result["train_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        finally:
            model.eval()
            del optimizer
            for parameter in model.parameters():
                parameter.grad = None

    attempt("train", train)
    return result


# (label, key, unit, True when more is better)
METRICS = [
    ("prefill {prefill}", "prefill_ms", "ms", False),
    ("generate, dynamic cache", "generate_dynamic_tokens_per_s", "tok/s", True),
    ("generate, static cache{compiled}", "generate_static_tokens_per_s", "tok/s", True),
    ("training step {train}", "train_step_ms", "ms", False),
    ("training step peak memory", "train_peak_gib", "GiB", False),
]


def ratio(key: str, higher_is_better: bool, results: dict) -> float | None:
    """xattn / sdpa: of speed for times and rates, of bytes for memory."""
    mine, theirs = results["xattn"].get(key), results["sdpa"].get(key)
    if not mine or not theirs:
        return None
    if key.endswith("_gib") or higher_is_better:
        return mine / theirs
    return theirs / mine  # a time: sdpa's time over xattn's is xattn's relative speed


def table(size: ModelSize, results: dict, compiled: bool) -> list[dict]:
    rows = []
    for label, key, unit, higher in METRICS:
        rows.append({
            "metric": label.format(prefill="x".join(map(str, size.prefill)),
                                   train="x".join(map(str, size.train)),
                                   compiled=" + torch.compile" if compiled else ""),
            "key": key, "unit": unit, **{name: results[name].get(key) for name in results},
            "ratio": ratio(key, higher, results)})
    return rows


def _agreement(results: dict, label: str) -> float | None:
    mine, theirs = (results[name].get(f"generate_{label}_tokens") for name in IMPLEMENTATIONS)
    if mine is None or theirs is None or mine.shape != theirs.shape:
        return None
    return float((mine == theirs).float().mean())


def _plot(rows, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [row for row in rows if row["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([row["metric"] for row in shown], [row["ratio"] for row in shown])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("xattn / sdpa (speed; memory: bytes)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(args) -> int:
    import torch
    import transformers

    import xattn.integrations.transformers as xattn_hf

    size = SIZES[args.model_size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.model_size != "tiny":
        print(f"bench --model --model-size {args.model_size} needs a CUDA GPU "
              f"(torch.cuda.is_available() is False); --model-size tiny runs on the CPU",
              file=__import__("sys").stderr)
        return 2
    xattn_hf.register()
    base = build(size, device)
    parameters = sum(p.numel() for p in base.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"# {name}, torch {torch.__version__}, transformers {transformers.__version__}: "
          f"Llama-style model of {parameters:.3g} parameters ({size.layers} layers, hidden "
          f"{size.hidden}, GQA {size.heads}/{size.kv_heads}), {size.dtype}, random weights")
    results = {}
    for implementation in IMPLEMENTATIONS:
        model = copy.deepcopy(base) if implementation != IMPLEMENTATIONS[-1] else base
        model.set_attn_implementation(implementation)
        results[implementation] = measure(model, size, device, args.model_reps)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del base

    compiled = results["xattn"]["static_compiled"]
    rows = table(size, results, compiled)
    print(f"{'metric':42} {'unit':>6} {'xattn':>10} {'sdpa':>10} {'xattn/sdpa':>10}")
    for row in rows:
        cells = [f"{row[n]:10.2f}" if row[n] is not None else f"{'-':>10}" for n in IMPLEMENTATIONS]
        ratio_cell = f"{row['ratio']:9.2f}x" if row["ratio"] is not None else f"{'-':>10}"
        print(f"{row['metric']:42} {row['unit']:>6} {cells[0]} {cells[1]} {ratio_cell}")
    checks = {f"generate_{label}_token_agreement": _agreement(results, label)
              for label in ("dynamic", "static")}
    mine, theirs = (results[n].get("prefill_logits") for n in IMPLEMENTATIONS)
    if mine is not None and theirs is not None:
        checks["prefill_logits_rel_diff"] = float((mine - theirs).norm() / theirs.norm())
    errors = {f"{n}_{key}": value for n in IMPLEMENTATIONS for key, value in results[n].items()
              if key.endswith("_error")}
    for key, value in {**checks, **errors}.items():
        print(f"# {key}: {value}")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "model_size": args.model_size,
            "parameters": parameters, "size": size._asdict(), "reps": args.model_reps,
            "static_compiled": compiled}
    path = args.out / "bench_model.json"
    path.write_text(json.dumps({"meta": meta, "model": rows, "checks": checks, "errors": errors},
                               indent=1))
    plotted = _plot(rows, args.out / "bench_model.png")
    print(f"# wrote {path}" + (f" and {args.out / 'bench_model.png'}" if plotted
                               else " (no matplotlib: no plot)"))
    return 0
