"""Curriculum (`train.curriculum`, training/curriculum.py): easy rows first, in stages, deterministic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jointcli.recipe import Curriculum, Lora, Train
from jointcli.training.curriculum import curriculum_steps, rank, row_losses
from jointcli.training.microbatch import plan_steps

DIFFICULTY = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.05, 0.95, 0.35]  # 12 rows


def test_stages_draw_from_the_easy_rows_first_and_end_on_all():
    steps = curriculum_steps(rank(DIFFICULTY), rows_per_step=2, epochs=1, seed=0, stages=3)
    assert len(steps) == len(plan_steps(12, 2, 1, 0)) == 6  # as many steps as without a curriculum
    steps = curriculum_steps(rank(DIFFICULTY), rows_per_step=2, epochs=2, seed=0, stages=3)
    ranked = sorted(range(12), key=lambda i: DIFFICULTY[i])
    for stage, part in enumerate([steps[0:4], steps[4:8], steps[8:12]], start=1):
        pool = set(ranked[: math.ceil(12 * stage / 3)])
        rows = [i for step in part for i in step]
        assert set(rows) <= pool
        if stage < 3:  # 8 rows drawn from a pool of 4 or 8: all of it
            assert set(rows) == pool
        else:  # 8 of 12: one pass, no row twice before the others
            assert len(set(rows)) == len(rows)
    assert all(1 <= len(s) <= 2 for s in steps)


def test_curriculum_is_deterministic_for_a_seed():
    a = curriculum_steps(rank(DIFFICULTY), 3, 1.5, seed=4, stages=2)
    assert a == curriculum_steps(rank(DIFFICULTY), 3, 1.5, seed=4, stages=2)
    assert a != curriculum_steps(rank(DIFFICULTY), 3, 1.5, seed=5, stages=2)
    # ties go to the earlier row
    assert curriculum_steps(rank([1.0, 1.0, 0.0, 1.0]), 1, 1, seed=0, stages=4)[:2] == [[2], [0]]


def test_balanced_ranking_keeps_the_answers_shares_in_every_stage():
    """Rows whose loss sorts them by answer (as a biased model's does): one ranking puts every 'positive'
    first; the balanced one interleaves the answers, each ranked by its own difficulty."""
    answers = ["positive"] * 6 + ["negative"] * 6
    difficulty = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] + [1.6, 1.1, 1.5, 1.2, 1.4, 1.3]
    assert {answers[i] for i in rank(difficulty)[:6]} == {"positive"}
    balanced = rank(difficulty, answers)
    for k in (2, 4, 6, 8):
        assert sum(answers[i] == "positive" for i in balanced[:k]) == k // 2
    assert [i for i in balanced if answers[i] == "negative"] == [7, 9, 11, 10, 8, 6]  # by their own loss
    # free-text answers (no repeats) rank by difficulty alone
    assert rank(difficulty, [f"answer {i}" for i in range(12)]) == rank(difficulty)
    steps = curriculum_steps(rank(difficulty, answers), 2, 1, 0, 3)
    assert sorted(answers[i] for i in steps[0] + steps[1]) == ["negative"] * 2 + ["positive"] * 2


def test_recipe_refuses_a_bad_curriculum():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Curriculum(by="size", stages=3)
    with pytest.raises(ValidationError):
        Curriculum(by="loss", stages=1)


@pytest.mark.model
def test_training_by_loss_ranks_the_rows_by_the_starting_models_loss(tmp_path: Path):
    """The order training.json records is the rows ranked by the loss a fresh adapter (the base model)
    gives them, each computed alone, balanced between the two answers; the first stage trains on the
    easiest half only. Four rows, two of each answer: two stages of one optimizer step."""
    import torch

    from jointcli.recipe import EMBEDDED_MODEL
    from jointcli.training.lora import load_for_training, train_lora
    from jointcli.training.microbatch import collate, completion_nll
    from jointcli.training.rows import to_prompt_completion, tokenize_pair
    from jointcli.weights.checkpoint import load_tokenizer, resolve_checkpoint

    from .test_lora import sentiment_rows

    checkpoint = resolve_checkpoint(EMBEDDED_MODEL)
    out, pairs = tmp_path / "adapter", sentiment_rows()[:4]  # positive, negative, positive, negative
    train = Train(epochs=1, batch_size=2, curriculum=Curriculum(by="loss", stages=2))
    train_lora(
        checkpoint,
        pairs,
        out,
        Lora(r=2, alpha=4),
        train,
        seed=0,
        device="cpu",
        dtype="float32",
        log_path=tmp_path / "log.jsonl",
    )
    order = json.loads((out / "training.json").read_text())["curriculum"]

    tokenizer = load_tokenizer(checkpoint)
    rows = [tokenize_pair(tokenizer, p) for p in to_prompt_completion(pairs)]
    model = load_for_training(checkpoint, Lora(r=2, alpha=4), "cpu", "float32", seed=0)
    with torch.no_grad():
        alone = [float(s / c) for s, c in (completion_nll(model, *collate([r], tokenizer.pad_token_id)) for r in rows)]
    answers = [p["completion"][-1]["content"] for p in to_prompt_completion(pairs)]
    assert order == rank(alone, answers)
    assert sorted(answers[i] for i in order[:2]) == sorted(answers[i] for i in order[2:])  # 1 and 1
    batched = row_losses(model, rows, tokenizer.pad_token_id, "cpu", "float32", 1024)
    assert batched == pytest.approx(alone, rel=1e-4)
    steps = curriculum_steps(rank(batched, answers), 2, 1, 0, 2)
    assert {i for s in steps[:1] for i in s} == set(order[:2])
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == len(steps) == 2
