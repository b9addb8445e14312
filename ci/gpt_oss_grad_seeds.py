"""Diagnostic, not a test: how far the bf16 GPT-OSS training step's gradients are from the float32
step, for xattn and for eager, over several random batches, the step of tests/test_transformers.py
(training_step_gradients; its test takes the median over seeds 5-9). Prints each parameter's
relative error per seed and the median over seeds, to tell a systematic excess of xattn's from the
noise of one draw.

    PYTHONPATH=. python ci/gpt_oss_grad_seeds.py [--seeds 8] [--family gpt_oss]
"""
import argparse
import copy
import statistics
import sys

import torch

sys.path.insert(0, "tests")
from test_transformers import models, rel_error, training_step_gradients  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--family", default="gpt_oss")
    args = parser.parse_args()
    mine, peer = models(args.family, "cuda", torch.bfloat16)
    truth_model = copy.deepcopy(peer).float()
    errors = {}
    for seed in range(args.seeds):  # the test's batches are seeds 5, 6, ...
        got, want, truth = (training_step_gradients(m, 5 + seed, "cuda") for m in (mine, peer, truth_model))
        for name in truth:
            errors.setdefault(name, []).append((rel_error(got[name], truth[name]),
                                                rel_error(want[name], truth[name])))
    print(f"{'parameter':45s} {'xattn median':>12s} {'eager median':>12s}  per seed (xattn/eager)")
    for name, pairs in errors.items():
        x, e = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        seeds = " ".join(f"{a:.3f}/{b:.3f}" for a, b in pairs)
        print(f"{name:45s} {x:12.4f} {e:12.4f}  {seeds}")


if __name__ == "__main__":
    main()
