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
Both models live side by side and every measurement runs in --model-reps rounds, each timing
xattn and sdpa once (order rotated); times are medians, and a speed ratio is the median of the
per-round ratios, so that the host's drift between minutes cancels.
Ratios are xattn / sdpa in speed (above 1: xattn is faster) and in peak memory (below 1: xattn
needs less; a step's peak as a process holding only that model would see it). The JSON also
holds how far xattn's prefill logits are from sdpa's and the share of generated tokens on which
the two agree (bfloat16 rounding can flip a near-tie greedy choice).
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


def rotated_rounds(names: list, rounds: int):
    """For each of `rounds` rounds, every name once, the order rotated by one a round: within a
    round every implementation meets the same host (a shared host's pace drifts by tens of
    percent between minutes), and none always runs first. Used by --model and --overhead."""
    for round_ in range(rounds):
        start = round_ % len(names)
        yield names[start:] + names[:start]


def median_ratio(values: list, reference: list) -> float:
    """The median over rounds of values[i] / reference[i]."""
    return statistics.median(v / r for v, r in zip(values, reference))


def _interleaved_seconds(fns: dict, reps: int, device) -> tuple[dict, float | None]:
    """name -> median wall seconds of fns[name]() over `reps` rounds after one warm-up each; in
    each round every name runs once, in an order rotated from round to round. Also the median
    over rounds of the ratio of the second name's time to the first's (both met the same host
    in a round, rotated_rounds: timed in their own minutes, whole-model ratios moved by a third).
    The device is synchronized around each run (generate() and a training step are host-driven
    loops; wall time is what a user waits)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    names = list(fns)
    for name in names:
        fns[name]()
    times = {name: [] for name in names}
    for order in rotated_rounds(names, reps):
        for name in order:
            sync()
            began = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - began)
    ratio = median_ratio(times[names[1]], times[names[0]]) if len(names) == 2 else None
    return {name: statistics.median(t) for name, t in times.items()}, ratio


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def measure(models: dict, size: ModelSize, device, reps: int) -> dict:
    """Every measurement of every implementation (name -> its model), timed in interleaved rounds
    (_interleaved_seconds). Returns name -> results, and "ratios": key -> the per-round ratio
    of xattn's speed to sdpa's. A measurement that fails for one implementation records its
    error there and is timed for the others alone; the rest still run."""
    import torch

    results: dict = {name: {} for name in models}
    results["ratios"] = {}
    compiled = device.type == "cuda"  # transformers compiles static-cache decoding on GPUs only

    def timed(key, make, scale=1.0, higher_is_better=False):
        """Time make(name, model)'s function for every model; store scale / seconds for rates
        (higher_is_better) or scale * seconds for times."""
        fns = {}
        for name, model in models.items():
            try:
                fns[name] = make(name, model)
            except Exception as exc:  # report, keep measuring the others
                results[name][f"{key}_error"] = _error(exc)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if not fns:
            return
        try:
            seconds, sdpa_over_xattn = _interleaved_seconds(fns, reps, device)
        except Exception as exc:  # a later run failed: no timing of this key for anyone
            for name in fns:
                results[name][f"{key}_error"] = _error(exc)
            return
        for name, value in seconds.items():
            results[name][key] = scale / value if higher_is_better else scale * value
        if sdpa_over_xattn is not None and list(fns) == list(IMPLEMENTATIONS):
            results["ratios"][key] = sdpa_over_xattn  # xattn's speed over sdpa's

    batch, tokens = size.prefill
    prefill_ids = _random_ids(batch, tokens, size.vocab, 2, device)

    def prefill(name, model):
        with torch.no_grad():
            results[name]["prefill_logits"] = model(prefill_ids[:1], use_cache=False).logits.float()

        def run():
            with torch.no_grad():
                model(prefill_ids, use_cache=False)
        return run

    timed("prefill_ms", prefill, scale=1e3)

    ids, mask = prompts(size, device)
    generated = len(size.prompts) * size.new_tokens
    options = dict(attention_mask=mask, do_sample=False, max_new_tokens=size.new_tokens,
                   min_new_tokens=size.new_tokens, pad_token_id=PAD)
    for label, extra in (("dynamic", {}),
                         ("static", dict(cache_implementation="static",
                                         disable_compile=not compiled))):
        def generate(name, model, label=label, extra=extra):
            with torch.no_grad():  # the tokens, and the first call's compile, out of the timing
                results[name][f"generate_{label}_tokens"] = model.generate(ids, **options, **extra)

            def run():
                with torch.no_grad():
                    model.generate(ids, **options, **extra)
            return run

        timed(f"generate_{label}_tokens_per_s", generate, scale=generated, higher_is_better=True)
    for name in models:
        results[name]["static_compiled"] = compiled

    batch, tokens = size.train
    train_ids = _random_ids(batch, tokens, size.vocab, 3, device)
    optimizers = {}

    def train(name, model):
        model.train()
        optimizer = optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(record=True):
            # Peak memory of a step as a process holding only this model would see it: what the
            # step allocates beyond what was there before it, plus this model's weights and
            # optimizer state (the other model's stay out of it). Not the first step, which
            # allocates that state (it would count twice).
            record = record and device.type == "cuda"
            if record:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            loss = model(train_ids, labels=train_ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if record:
                own = sum(t.nbytes for t in model.parameters())
                own += sum(t.nbytes for state in optimizer.state.values() for t in state.values()
                           if isinstance(t, torch.Tensor))
                peak = torch.cuda.max_memory_allocated(device) - before + own
                results[name]["train_peak_gib"] = max(results[name].get("train_peak_gib", 0),
                                                      peak / 2**30)

        step(record=False)  # the optimizer's state exists from here on, as in a real run
        return step

    try:
        timed("train_step_ms", train, scale=1e3)
    finally:
        optimizers.clear()
        for model in models.values():
            model.eval()
            for parameter in model.parameters():
                parameter.grad = None
    return results


# (label, key, unit, True when more is better)
METRICS = [
    ("prefill {prefill}", "prefill_ms", "ms", False),
    ("generate, dynamic cache", "generate_dynamic_tokens_per_s", "tok/s", True),
    ("generate, static cache{compiled}", "generate_static_tokens_per_s", "tok/s", True),
    ("training step {train}", "train_step_ms", "ms", False),
    ("training step peak memory", "train_peak_gib", "GiB", False),
]


def ratio(key: str, higher_is_better: bool, results: dict) -> float | None:
    """xattn / sdpa: of speed for times and rates (the median of the per-round ratios where
    measure() timed both), of bytes for memory."""
    if key in results.get("ratios", {}):
        return results["ratios"][key]
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
            "key": key, "unit": unit, **{name: results[name].get(key) for name in IMPLEMENTATIONS},
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
    models = {}
    for implementation in IMPLEMENTATIONS:
        model = copy.deepcopy(base) if implementation != IMPLEMENTATIONS[-1] else base
        model.set_attn_implementation(implementation)
        models[implementation] = model
    del base
    results = measure(models, size, device, args.model_reps)
    del models
    if device.type == "cuda":
        torch.cuda.empty_cache()

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
