"""LoRA training (models/lora.py) and the DSPy fine-tuning provider (models/provider.py), with the real
embedded model and real (tiny) training runs."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

from jointcli.errors import StepError
from jointcli.models.embedded import resolve_checkpoint
from jointcli.models.lora import TrainResult, train_lora
from jointcli.recipe import EMBEDDED_MODEL, Lora, Train

SENTENCES = [
    ("a gorgeous, witty, seductive movie.", "positive"),
    ("the plot is dull and the acting is worse.", "negative"),
    ("one of the most moving films of the year.", "positive"),
    ("a tedious, joyless exercise in style.", "negative"),
    ("funny, smart and beautifully made.", "positive"),
    ("i wanted my two hours back.", "negative"),
    ("an absolute delight from start to finish.", "positive"),
    ("boring, predictable and far too long.", "negative"),
]


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return resolve_checkpoint(EMBEDDED_MODEL)


def sentiment_rows() -> list[dict]:
    adapter = dspy.ChatAdapter()
    signature = dspy.Signature("sentence -> sentiment")
    return [adapter.format_finetune_data(signature, demos=[], inputs={"sentence": s}, outputs={"sentiment": y})
            for s, y in SENTENCES]


def test_zero_rows_is_a_step_error(tmp_path: Path):
    with pytest.raises(StepError, match="no training rows"):
        # a checkpoint that does not exist: the check must come before any model load
        train_lora(tmp_path / "no-model", [], tmp_path / "adapter", Lora(), Train())
    assert not (tmp_path / "adapter").exists()


def test_bad_row_is_a_step_error(tmp_path: Path):
    with pytest.raises(StepError, match="last message must be the assistant"):
        train_lora(tmp_path / "no-model", [{"messages": [{"role": "user", "content": "hi"}] * 2}],
                   tmp_path / "adapter", Lora(), Train())


def test_rows_longer_than_max_length_are_dropped(tmp_path: Path, checkpoint: Path):
    with pytest.raises(StepError, match="longer than train.max_length=16"):
        train_lora(checkpoint, sentiment_rows(), tmp_path / "adapter", Lora(), Train(max_length=16))
    assert not (tmp_path / "adapter").exists()


def test_same_seed_same_adapter_and_out_dir_is_replaced(tmp_path: Path, checkpoint: Path):
    rows, out = sentiment_rows()[:3], tmp_path / "adapter"
    train = Train(epochs=1, batch_size=3)
    first = train_lora(checkpoint, rows, out, Lora(r=2, alpha=4), train, seed=1, device="cpu")
    weights = (out / "adapter_model.safetensors").read_bytes()
    second = train_lora(checkpoint, rows, out, Lora(r=2, alpha=4), train, seed=1, device="cpu")
    assert first.steps == second.steps == 1 and first.final_loss == second.final_loss
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter.") and p.suffix != ".lock"]


def test_train_lora_writes_a_plain_peft_adapter(tmp_path: Path, checkpoint: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "adapters" / "classify"
    log = tmp_path / "train_log.jsonl"
    result = train_lora(checkpoint, sentiment_rows(), out, Lora(r=4, alpha=8),
                        Train(epochs=1, batch_size=4, learning_rate=1e-3), seed=0, log_path=log, device="cpu")

    assert isinstance(result, TrainResult)
    assert result.adapter_dir == out and result.rows == 8 and result.dropped_rows == 0
    assert result.steps == 2 and result.epochs == pytest.approx(1.0)
    assert result.device == "cpu" and result.dtype == "float32" and result.peak_cuda_mb is None
    assert 8 * 150 < result.train_tokens < 8 * 260  # ~190 tokens a row, each seen once, no padding counted
    assert result.tokens_per_second > 0 and result.peak_rss_mb > 500 and result.final_loss is not None
    # a standard adapter folder, nothing else of the training left behind
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.suffix != ".lock") == ["classify"]
    assert not any(p.name.startswith(("checkpoint-", "optimizer")) for p in out.rglob("*"))
    # loss logged per step
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2]
    assert all({"epoch", "loss", "learning_rate", "seconds"} <= e.keys() and e["loss"] > 0 for e in lines)
    assert result.final_loss == lines[-1]["loss"]

    # loads with plain peft, without jointopt; the trained B matrices moved away from their zero init
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(sentiment_rows()[0]["messages"][:-1], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_bootstrap_finetune_with_local_lm(tmp_path: Path, checkpoint: Path):
    """Stock dspy.BootstrapFinetune: traces from a teacher (a DummyLM that answers in DSPy's format,
    so the test does not depend on what the 135M model produces zero-shot), a real LoRA fine-tune
    of the student's local model, and a program that then answers through the adapter."""
    from dspy import lm15
    from dspy.utils.dummies import DummyLM

    from jointcli.models.provider import local_lm

    lm = local_lm(max_tokens=24, adapters_dir=tmp_path / "adapters", cache=False)
    student = dspy.Predict("sentence -> sentiment")
    student.set_lm(lm)
    teacher = dspy.Predict("sentence -> sentiment")
    teacher.set_lm(DummyLM({s: {"sentiment": y} for s, y in SENTENCES}))
    trainset = [dspy.Example(sentence=s, sentiment=y).with_inputs("sentence") for s, y in SENTENCES[:6]]

    optimizer = dspy.BootstrapFinetune(metric=lambda example, prediction, trace=None: True,
                                       train_kwargs={"epochs": 3, "batch_size": 6, "learning_rate": 2e-3},
                                       num_threads=2)
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        tuned = optimizer.compile(student, trainset=trainset, teacher=teacher)
        tuned_lm = tuned.predictors()[0].lm
        assert tuned_lm.model.startswith(lm.model + "@ft-")
        folders = [p for p in (tmp_path / "adapters").iterdir() if p.is_dir()]
        assert len(folders) == 1 and (folders[0] / "adapter_model.safetensors").is_file()

        # the base model does not produce DSPy's output format zero-shot; three LoRA steps teach it
        # enough that the program's answer parses (ChatAdapter raises otherwise, no JSON fallback)
        answer = tuned(sentence="a warm, funny and touching film.")
    assert isinstance(answer.sentiment, str) and answer.sentiment.strip()
    # the copy shares the engine, which serves the adapter's weights for the '@' model id
    system, user = dspy.ChatAdapter().format(student.signature, demos=[], inputs={"sentence": "a dull film."})
    def complete(model_lm):
        return model_lm(lm15.Request(model=model_lm.model, system=system["content"],
                                     messages=(lm15.Message.user(user["content"]),))).message.text

    tuned_text, base_text = complete(tuned_lm), complete(lm)
    assert "[[ ## sentiment ## ]]" in tuned_text and tuned_text != base_text

    # the same fine-tune asked again reuses the adapter folder: no second training
    again = dspy.Predict("sentence -> sentiment")
    again.set_lm(lm)
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        retuned = optimizer.compile(again, trainset=trainset, teacher=teacher)
    assert retuned.predictors()[0].lm.model == tuned_lm.model
    assert [p for p in (tmp_path / "adapters").iterdir() if p.is_dir()] == folders
