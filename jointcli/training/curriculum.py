"""Curriculum: a weight step's optimizer steps see the easy rows first (`train.curriculum`).

    difficulty = row_losses(model, rows, pad_id, "cpu", "float32", 1024)     # or the rows' lengths

    >>> difficulty, answers = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2], ["pos", "neg", "pos", "neg", "pos", "neg"]
    >>> rank(difficulty), rank(difficulty, answers)  # easiest first; balanced: the answers interleaved
    ([1, 5, 3, 2, 4, 0], [1, 2, 5, 4, 3, 0])
    >>> curriculum_steps(rank(difficulty, answers), rows_per_step=2, epochs=1, seed=0, stages=3)
    [[2, 1], [4, 5], [5, 1]]

The rows are ranked by difficulty (ties: the earlier row first): the model's loss per completion token
on each row before training (`by: loss`), or the row's length in tokens (`by: length`). The optimizer
steps (as many as without a curriculum: microbatch.plan_steps) are cut into `stages` equal runs; stage k
draws its rows from the easiest k/stages of them, in a fresh seeded shuffle each pass over that pool,
so the last stage trains on all rows. Deterministic for a seed and a difficulty list.

Balanced (`balance: true`, the default): when the rows' answers repeat (labels), each row is ranked
among the rows of its answer and the answers are interleaved, so every stage keeps the answers'
shares. Without it, a biased model's loss sorts the rows by label (docs/results.md, Curriculum: on sst2 the zero-shot
model's easiest third was all `positive`), and the first stage teaches a constant.
"""

from __future__ import annotations

import math
import random

from ..weights.device import autocast
from .microbatch import micro_batch_losses, plan_step, plan_steps


def curriculum_steps(
    ranked: list[int], rows_per_step: int, epochs: float, seed: int, stages: int, *, total: int | None = None
) -> list[list[int]]:
    """Row indices of every optimizer step, stage by stage (see the module docstring); `ranked`: every
    row, easiest first (`rank`); `total` optimizer steps when given, else those of `epochs`."""
    n = len(ranked)
    total = total if total is not None else len(plan_steps(n, rows_per_step, epochs, seed))
    steps: list[list[int]] = []
    for stage in range(1, stages + 1):
        end = round(total * stage / stages)
        pool = ranked[: math.ceil(n * stage / stages)]
        rounds = 0
        while len(steps) < end:
            order = list(pool)
            random.Random(f"{seed}:stage{stage}:{rounds}").shuffle(order)
            for i in range(0, len(order), rows_per_step):
                if len(steps) < end:
                    steps.append(order[i : i + rows_per_step])
            rounds += 1
    return steps


def rank(difficulty: list[float], answers: list[str] | None = None) -> list[int]:
    """The rows, easiest first (ties: the earlier row). With `answers` that repeat (label-like: fewer
    distinct answers than half the rows), balanced: each row is placed by its rank among the rows of
    the same answer (its quantile there), so every prefix of the ranking keeps the answers' shares."""
    n = len(difficulty)
    if answers is None or len(set(answers)) > n / 2:
        return sorted(range(n), key=lambda i: (difficulty[i], i))
    groups: dict[str, list[int]] = {}
    for i in sorted(range(n), key=lambda i: (difficulty[i], i)):
        groups.setdefault(answers[i], []).append(i)
    quantile = {i: (k + 0.5) / len(g) for g in groups.values() for k, i in enumerate(g)}
    return sorted(range(n), key=lambda i: (quantile[i], difficulty[i], i))


def row_losses(
    model, rows: list, pad_id: int, device: str, dtype: str, token_budget: int, soft=None, share_prefix: bool = True
) -> list[float]:
    """Each row's mean loss per completion token under `model` as it is (no gradients), computed in
    micro-batches of at most `token_budget` tokens, a shared prefix once unless `share_prefix` is off
    (microbatch.py's plan_step)."""
    import torch

    lengths = [len(ids) for ids, _ in rows]
    losses = [0.0] * len(rows)
    groups = plan_step(lengths, list(range(len(rows))), token_budget, rows if share_prefix else None)
    with torch.no_grad(), autocast(device, dtype):
        for micro, sums, counts in micro_batch_losses(model, rows, groups, pad_id, device, soft, per_row=True):
            for i, s, c in zip(micro, sums.tolist(), counts.tolist()):
                losses[i] = s / max(c, 1)
    return losses
