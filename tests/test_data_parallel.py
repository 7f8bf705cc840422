"""Data-parallel LoRA training (training/data_parallel.py): two real CPU processes (gloo) train the
adapter that one process trains, and write the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jointcli.errors import StepError
from jointcli.recipe import Groups, Lora, ParamGroup, SoftPrompt, Train
from jointcli.training.lora import SoftTraining, load_for_training, train_lora
from jointcli.training.ranks import Ranks
from jointcli.weights.soft_prompt import init_soft_prompt, load_soft_prompt

from .test_lora import checkpoint, sentiment_rows  # noqa: F401 - checkpoint is a fixture


def test_each_process_computes_its_share_of_a_step_and_together_all_of_it():
    step = [7, 2, 5, 0, 3]
    shares = [Ranks(i, 2).share(step) for i in range(2)]
    assert shares == [[7, 5, 3], [2, 0]] and Ranks().share(step) == step
    assert sorted(shares[0] + shares[1]) == sorted(step)


@pytest.mark.model
def test_two_processes_train_the_adapter_of_one(tmp_path: Path, checkpoint: Path):  # noqa: F811
    """The s step's training: a LoRA adapter and a soft prompt, whose gradients are summed over the
    processes in one all-reduce. A LoRA adapter alone (the w step) is this case less the soft prompt's
    tensor, so its every check (steps, tokens, losses, gradient norms, adapter weights, files) is
    made here, on the adapter, and the soft prompt's on top."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    # 5 rows in steps of 3: in the first step one process computes 2 rows and the other 1
    rows, lora = sentiment_rows()[:5], Lora(r=2, alpha=4)
    soft = SoftTraining(
        SoftPrompt(virtual_tokens=4),
        Groups(soft_prompt=ParamGroup(learning_rate=3e-2)),
        1e-2,
        "Classify the sentiment.",
    )
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        results[processes] = train_lora(
            checkpoint,
            rows,
            out / "adapter",
            lora,
            Train(epochs=1, batch_size=3, learning_rate=1e-2, processes=processes),
            seed=3,
            log_path=out / "log.jsonl",
            device="cpu",
            soft=soft,
        )
    one, two = results[1], results[2]
    assert (one.processes, two.processes) == (1, 2) and one.steps == two.steps == 2
    assert one.train_tokens == two.train_tokens and one.rows == two.rows == 5
    assert two.final_loss == pytest.approx(one.final_loss, rel=1e-4)
    logs = [[json.loads(line) for line in (tmp_path / f"p{n}" / "log.jsonl").read_text().splitlines()] for n in (1, 2)]
    assert [e["step"] for e in logs[1]] == [1, 2]  # one log, written by process 0
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # The same gradients (loss and norm above) up to float order; AdamW's first steps move a weight by
    # about lr whatever its gradient's size, so a near-zero gradient whose sign the order flips moves
    # a few weights apart: bounded by lr, and rare.
    a, b = (load_file(str(tmp_path / f"p{n}" / "adapter" / "adapter_model.safetensors")) for n in (1, 2))
    assert a.keys() == b.keys()
    apart = sum(int((~torch.isclose(a[k], b[k], rtol=1e-4, atol=1e-6)).sum()) for k in a)
    assert apart <= 0.002 * sum(v.numel() for v in a.values()), apart
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-2  # less than one step moves a weight (lr)
    soft_one, soft_two = (load_soft_prompt(tmp_path / f"p{n}" / "adapter") for n in (1, 2))
    initial = init_soft_prompt(
        load_for_training(checkpoint, lora, "cpu", "float32", seed=3).get_base_model(),
        AutoTokenizer.from_pretrained(checkpoint),
        4,
        "Classify the sentiment.",
        seed=3,
    )
    assert float((soft_one - initial).abs().max()) > 1e-2  # trained: moved by about its rate a step
    torch.testing.assert_close(soft_two, soft_one, rtol=1e-3, atol=1e-4)
    assert json.loads((tmp_path / "p2" / "adapter" / "training.json").read_text())["processes"] == 2
    left = sorted(p.name for p in (tmp_path / "p2").iterdir())
    assert left == ["adapter", "log.jsonl"] or left == [".adapter.lock", "adapter", "log.jsonl"], left


@pytest.mark.model
def test_a_failing_process_is_one_step_error(tmp_path: Path, checkpoint: Path):  # noqa: F811
    with pytest.raises(
        StepError,
        match=r"LoRA training in 2 processes failed: process \d: .*longer than "
        r"train.max_length=16",
    ):
        train_lora(
            checkpoint,
            sentiment_rows()[:2],
            tmp_path / "adapter",
            Lora(r=2, alpha=4),
            Train(max_length=16, processes=2),
            device="cpu",
        )
    assert not (tmp_path / "adapter").exists()
