"""Benchmark: the g step's rollouts, sampled rows decoded one at a time against one batch.

    .venv/bin/python bench/rollouts.py                       # 4 examples x 4 samples, 2 rounds
    .venv/bin/python bench/rollouts.py --examples 8 --group 8

The workload is what one step of recipes/sst2.yaml's `g` optimizer samples: its module with 4
labeled demos (LabeledFewShot k=4, as the recipe's p step starts), `group_size` runs of each of
`train.batch_size` training examples at the g step's temperature, through the g step's own
collect_rollouts (jointcli/steps/rollouts.py) and the recipe's threads. One engine in this process
(the default dtype) serves both ways, alternated:

- one at a time: the decoder's max_batch set to 1, so every sampled request runs alone;
- batched: the recipe's limits, so the concurrent rollouts decode as one batch over their shared prompt.

Each way prints its mean reward and parsed share beside its time (the draws differ: a rollout's
generator is seeded from torch's RNG in the order the engine meets them). Ends with one line
`rollouts: <one at a time / batched>x`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jointcli.weights.device import set_process_defaults

set_process_defaults()  # a benchmark is an entry point, like the CLI: before torch loads


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=None, help="training examples (default: g's train.batch_size)")
    ap.add_argument("--group", type=int, default=None, help="samples of each (default: g's group_size)")
    ap.add_argument("--rounds", type=int, default=2, help="alternated measurements of each way")
    return ap.parse_args()


def main():
    args = parse_args()
    import dspy
    import torch

    from jointcli.data import load_splits
    from jointcli.metrics import build_metric
    from jointcli.models import build_lm
    from jointcli.program import build_program
    from jointcli.recipe import load_recipe
    from jointcli.steps.rollouts import collect_rollouts, sampling
    from jointcli.weights.device import cpu_kind

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    logging.getLogger("dspy").setLevel(logging.ERROR)  # a truncated sampled answer is a rollout like any other
    recipe = load_recipe(ROOT / "recipes" / "sst2.yaml")
    g = recipe.optimizers["g"]
    n, group = args.examples or g.train.batch_size, args.group or g.group_size
    splits = load_splits(recipe.data)
    metric = build_metric(recipe.metric, recipe.label_field)
    lm = build_lm("small", recipe.models["small"], cache=False)
    program = dspy.LabeledFewShot(k=4).compile(build_program(recipe), trainset=splits.train)
    program.set_lm(lm)
    program = sampling(program, g.temperature)
    decoder = lm.engine.decoder
    print(
        f"workload: {n} sst2 training examples x {group} samples at temperature {g.temperature}, "
        f"{recipe.runtime.num_threads} threads, 4 labeled demos, engine {str(lm.engine.dtype)[6:]}; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    def run(max_batch: int, seed: int) -> float:
        decoder.max_batch = max_batch
        torch.manual_seed(seed)
        start = time.perf_counter()
        got = collect_rollouts(
            program, splits.train[:n], metric, group, g.format_failure, ["classify"], recipe.runtime.num_threads
        )
        seconds = time.perf_counter() - start
        reward, parsed = sum(r.reward for r in got) / len(got), sum(r.parsed for r in got) / len(got)
        print(f"  max_batch {max_batch}: {seconds:.1f} s, mean reward {reward:.2f}, parsed {parsed:.2f}", flush=True)
        return seconds

    limit = decoder.max_batch
    run(limit, 0)  # warm-up: the shared prefix, the kernels
    times: dict[str, list[float]] = {"one at a time": [], "batched": []}
    for r in range(args.rounds):
        print(f"round {r + 1}:", flush=True)
        times["one at a time"].append(run(1, r + 1))
        times["batched"].append(run(limit, r + 1))
    best = {k: min(v) for k, v in times.items()}
    print(
        f"rollouts: {best['one at a time'] / best['batched']:.2f}x "
        f"[{n * group} rollouts; best of {args.rounds}: {best['one at a time']:.1f} s vs {best['batched']:.1f} s; "
        f"cpu {cpu_kind()}]"
    )


if __name__ == "__main__":
    main()
