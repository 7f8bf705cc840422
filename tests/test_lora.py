"""LoRA training (training/lora.py, training/microbatch.py) and the DSPy fine-tuning provider
(models/provider.py), with the real embedded model and real (tiny) training runs."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

from jointcli.errors import StepError
from jointcli.recipe import EMBEDDED_MODEL, Lora, Train
from jointcli.training.lora import TrainResult, load_for_training, train_lora
from jointcli.training.microbatch import (
    MIN_SHARED_PREFIX,
    collate,
    collate_shared,
    completion_nll,
    micro_batch_losses,
    micro_batches,
    plan_step,
    plan_steps,
    prefix_groups,
    shared_completion_nll,
    shared_prefix,
)
from jointcli.training.rows import to_prompt_completion, tokenize_pair
from jointcli.weights.checkpoint import resolve_checkpoint

from .conftest import requires_native_bf16

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
    return [
        adapter.format_finetune_data(signature, demos=[], inputs={"sentence": s}, outputs={"sentiment": y})
        for s, y in SENTENCES
    ]


def model_with_gradients(checkpoint: Path):
    """The embedded model with a small LoRA adapter whose B matrices are drawn (PEFT starts them at zero,
    which makes every A gradient zero), in training mode; and its trainable parameters."""
    import torch

    model = load_for_training(checkpoint, Lora(r=2, alpha=4), "cpu", "float32", seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model, [p for p in model.parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def trainable(checkpoint: Path):
    """model_with_gradients, loaded once for the tests that compare two ways of computing a loss (and its
    gradients): each zeroes the gradients first, none changes a weight, and one that switches the
    attention switches it back."""
    return model_with_gradients(checkpoint)


def test_zero_rows_is_a_step_error(tmp_path: Path):
    with pytest.raises(StepError, match="no training rows"):
        # a checkpoint that does not exist: the check must come before any model load
        train_lora(tmp_path / "no-model", [], tmp_path / "adapter", Lora(), Train())
    assert not (tmp_path / "adapter").exists()


def test_bad_row_is_a_step_error(tmp_path: Path):
    with pytest.raises(StepError, match="last message must be the assistant"):
        train_lora(
            tmp_path / "no-model",
            [{"messages": [{"role": "user", "content": "hi"}] * 2}],
            tmp_path / "adapter",
            Lora(),
            Train(),
        )


@pytest.mark.model
def test_rows_longer_than_max_length_are_dropped(tmp_path: Path, checkpoint: Path):
    with pytest.raises(StepError, match="longer than train.max_length=16"):
        train_lora(checkpoint, sentiment_rows(), tmp_path / "adapter", Lora(), Train(max_length=16))
    assert not (tmp_path / "adapter").exists()


@pytest.mark.model
def test_same_seed_same_adapter_and_out_dir_is_replaced(tmp_path: Path, checkpoint: Path):
    rows, out = sentiment_rows()[:2], tmp_path / "adapter"
    train = Train(epochs=1, batch_size=2)
    first = train_lora(checkpoint, rows, out, Lora(r=2, alpha=4), train, seed=1, device="cpu")
    weights = (out / "adapter_model.safetensors").read_bytes()
    second = train_lora(checkpoint, rows, out, Lora(r=2, alpha=4), train, seed=1, device="cpu")
    assert first.steps == second.steps == 1 and first.final_loss == second.final_loss
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter.") and p.suffix != ".lock"]


@pytest.mark.model
def test_train_lora_writes_a_plain_peft_adapter(tmp_path: Path, checkpoint: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "adapters" / "classify"
    log = tmp_path / "train_log.jsonl"
    result = train_lora(
        checkpoint,
        sentiment_rows()[:4],
        out,
        Lora(r=4, alpha=8),
        Train(epochs=1, batch_size=2, learning_rate=1e-3),
        seed=0,
        log_path=log,
        device="cpu",
    )

    assert isinstance(result, TrainResult)
    assert result.adapter_dir == out and result.rows == 4 and result.dropped_rows == 0
    assert result.steps == 2 and result.epochs == pytest.approx(1.0)
    # dtype auto trains in fp32 on every CPU, bf16 ones included (weights/device.py)
    assert result.device == "cpu" and result.dtype == "float32" and result.peak_cuda_mb is None
    assert 4 * 150 < result.train_tokens < 4 * 260  # ~190 tokens a row, each seen once, no padding counted
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
    ids = tokenizer.apply_chat_template(
        sentiment_rows()[0]["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.fixture(scope="module")
def encoded(checkpoint: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer, [tokenize_pair(tokenizer, p) for p in to_prompt_completion(sentiment_rows())]


@pytest.mark.model
def test_completion_starts_at_the_answer(encoded):
    tokenizer, data = encoded
    ids, start = data[0]
    assert tokenizer.decode(ids[start:]) == "[[ ## sentiment ## ]]\npositive\n\n[[ ## completed ## ]]\n<|im_end|>\n"


def test_plan_keeps_the_effective_batch_and_micro_batches_fit_the_budget():
    steps = plan_steps(10, 4, 2.0, seed=3)
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]  # batch_size x grad_accum rows a step, 2 epochs
    assert sorted(sum(steps[:3], [])) == list(range(10)) and steps[:3] != steps[3:]
    assert plan_steps(10, 4, 2.0, seed=3) == steps and plan_steps(10, 4, 0.5, seed=3) == steps[:2]
    lengths = [100, 480, 470, 90, 300, 2000]
    micro = micro_batches(lengths, [0, 1, 2, 3, 4, 5], token_budget=1000)
    assert sorted(sum(micro, [])) == [0, 1, 2, 3, 4, 5]
    assert micro[0] == [5]  # a row over the budget trains alone, never cut
    assert all(len(m) * max(lengths[i] for i in m) <= 1000 for m in micro[1:])
    assert micro[1:] == [[1, 2], [4, 0, 3]]  # longest first: rows of similar length pad little


@pytest.mark.model
def test_completion_head_loss_equals_the_models_loss(trainable, encoded):
    """Only the label positions go through the LM head; the loss is the model's own, padding included."""
    import torch

    tokenizer, data = encoded
    model, _ = trainable
    by_length = sorted(data, key=lambda row: len(row[0]))
    rows = [by_length[0], by_length[4], by_length[-1]]
    input_ids, mask, labels = collate(rows, tokenizer.pad_token_id)
    assert mask is not None and (mask == 0).any()  # rows of different lengths: right padding
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        nll, count = completion_nll(model, input_ids, mask, labels)
    assert count == int((labels[:, 1:] != -100).sum()) == sum(len(ids) - start for ids, start in rows)
    assert float(nll) / count == pytest.approx(float(reference), rel=1e-5)


@pytest.mark.model
def test_micro_batches_give_the_gradient_of_one_batch(trainable, encoded):
    import torch

    tokenizer, data = encoded
    model, params = trainable
    rows = [2, 3, 4]  # of 193, 192 and 191 tokens: one batch pads
    lengths = [len(ids) for ids, _ in data]
    n_labels = sum(lengths[i] - data[i][1] for i in rows)

    def gradient(budget: int):
        model.zero_grad(set_to_none=True)
        micro = micro_batches(lengths, rows, budget)
        for m in micro:
            nll, _ = completion_nll(model, *collate([data[i] for i in m], tokenizer.pad_token_id))
            (nll / n_labels).backward()
        return len(micro), torch.cat([p.grad.flatten() for p in params])

    n_one, one = gradient(10_000)
    n_many, many = gradient(300)
    assert n_one == 1 and n_many == 3
    assert one.abs().max() > 0
    torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-6)


def demo_rows() -> list[dict]:
    """Rows of one module with two demos: ~210 prompt tokens shared, the sentence and the answer not."""
    adapter = dspy.ChatAdapter()
    signature = dspy.Signature("sentence -> sentiment")
    demos = [dspy.Example(sentence=s, sentiment=y) for s, y in SENTENCES[6:]]
    return [
        adapter.format_finetune_data(signature, demos=demos, inputs={"sentence": s}, outputs={"sentiment": y})
        for s, y in SENTENCES[:6]
    ]


def test_shared_prefix_is_capped_before_the_completions():
    prefix = list(range(100, 160))  # 60 shared tokens
    rows = [(prefix + [1, 2, 3, 4, 5], 62), (prefix + [1, 9, 9], 61), (prefix + [7, 8], 61)]
    assert shared_prefix(rows) == 60  # the common prefix, every row keeps its own tokens
    assert shared_prefix([rows[0], rows[1]]) == 60  # common 61, capped at first completion (61) - 1
    assert shared_prefix([rows[0], rows[0]]) == 61  # identical rows: all but the token before the completion
    assert shared_prefix(rows[:1]) == 0  # one row: nothing to share
    short = [(ids[30:], start - 30) for ids, start in rows[1:]]  # 30 tokens in common, under MIN_SHARED_PREFIX
    assert MIN_SHARED_PREFIX > 30
    assert shared_prefix(short) == 0


def test_a_step_computes_its_shared_prefix_once():
    """With the rows' tokens, rows that share a long prompt form one group whose prefix is computed
    once, and its micro-batches cost rows x longest suffix within the budget less the prefix; without
    them (or without a long common prefix) the plan is rows x longest row, as before."""
    prefix = list(range(1000, 1400))  # 400 shared tokens
    rows = [(prefix + [i] * (60 - i), 440 + i) for i in range(8)]  # suffixes of 60..53 tokens, answer 20..13
    lengths = [len(ids) for ids, _ in rows]
    step = list(range(8))
    assert plan_step(lengths, step, 900, rows) == [(400, [step])]  # 400 + 8 x 60 = 880 tokens
    assert plan_step(lengths, step, 900) == [(0, [[i] for i in step])]  # 2 x 460 padded tokens > 900
    # 400 + 3 x 60 = 580: 3, 3 and 2 rows a micro-batch, the prefix still computed once for all 8
    assert plan_step(lengths, step, 600, rows) == [(400, [[0, 1, 2], [3, 4, 5], [6, 7]])]
    assert plan_step(lengths, step, 300, rows) == [
        (400, [[i] for i in step])
    ]  # a prefix over the budget: rows one by one
    unrelated = [([7000 + 10 * i] + ids[1:], start) for i, (ids, start) in enumerate(rows)]  # first token differs
    assert plan_step(lengths, step, 900, unrelated) == plan_step(lengths, step, 900)


def test_rows_of_two_modules_form_two_groups():
    """Two modules' prompts share their first 40 tokens (a chat template, the start of DSPy's system
    message) and then differ: computing those 40 once for all rows would leave each module's own 300
    computed per row, so the step keeps two groups, each with its own long prefix."""
    head = list(range(1000, 1040))
    a, b = head + list(range(2000, 2300)), head + list(range(3000, 3300))
    rows = [(a + [i, i, 5], len(a) + 2) if i % 2 else (b + [i, i, i, 5], len(b) + 3) for i in range(6)]
    groups = prefix_groups(list(range(6)), rows)
    assert sorted(map(sorted, groups)) == [[0, 2, 4], [1, 3, 5]]
    lengths = [len(ids) for ids, _ in rows]
    plan = plan_step(lengths, list(range(6)), 10_000, rows)
    assert sorted(prefix for prefix, _ in plan) == [340, 340]
    assert sorted(sorted(sum(micros, [])) for _, micros in plan) == [[0, 2, 4], [1, 3, 5]]
    lone = rows + [([9] * 50, 40)]  # shares nothing: trained whole, in a group without a prefix
    assert (0, [[6]]) in plan_step(lengths + [50], list(range(7)), 10_000, lone)


def test_resume_fingerprint_changes_with_the_micro_batch_plan(tmp_path: Path):
    from jointcli.training.job import TrainJob
    from jointcli.training.work import resume_fingerprint

    def key(train: Train) -> str:
        job = TrainJob(tmp_path, [], tmp_path / "adapter", Lora(), train, 0, None, "cpu", "float32")
        return resume_fingerprint(job, sentiment_rows())

    shared = key(Train())
    assert key(Train()) == shared
    assert key(Train(share_prefix=False)) != shared


def test_fingerprints_of_the_default_settings_stay_the_same():
    """A work folder or a fine-tuned adapter made with the default settings is found again: the resume
    fingerprint and the provider's job hash of a fixed job keep these values, whatever train's knobs of
    how a step is computed (token_budget, save_steps, share_prefix) are set to, as long as they compute
    the same."""
    from types import SimpleNamespace

    from jointcli.models.provider import _job_hash
    from jointcli.recipe import Groups, SoftPrompt
    from jointcli.training.job import SoftTraining, TrainJob
    from jointcli.training.work import resume_fingerprint

    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}]
    where = (Path("/models/m"), rows, Path("/runs/a/adapter"))

    def key(train: Train) -> str:
        # one row: train.min_steps lengthens its default training (48 steps, not 2; a new fingerprint,
        # test_the_floor_on_steps_changes_the_fingerprint_only_where_it_lengthens_training); min_steps=1 does not
        train = train.model_copy(update={"min_steps": 1})
        return resume_fingerprint(TrainJob(*where, Lora(), train, 0, None, "cpu", "float32"), rows)

    # the CPU's default token budget is part of it (the micro-batches fix the order of float additions):
    # 512 since `make run` fits in 3 GB; a work folder of the 1024-token default starts over
    default = "276aec7ec1921e51f2d0955e1041b0e8bf2c349378e09670520d17eab0a217b9"
    assert key(Train()) == key(Train(save_steps=2, token_budget=512, processes=2)) == default
    assert key(Train(token_budget=1024)) == "058d103f1873ff2e6b9fa7e0851fa41d8ade12d3be9c35bff2dde2f8816f8436"
    assert key(Train(token_budget=400)) != default and key(Train(share_prefix=False)) != default
    soft = SoftTraining(SoftPrompt(virtual_tokens=4), Groups(), 1e-3, "Classify.")
    s_step = TrainJob(*where, Lora(r=2), Train(epochs=1, batch_size=2), 3, None, "cuda", "bfloat16", soft=soft)
    assert resume_fingerprint(s_step, rows).startswith("32893dbdd40eb739")
    engine = SimpleNamespace(weights_id="w123", device="cpu", checkpoint="/models/m")
    assert _job_hash(engine, None, rows, Lora(), Train(min_steps=1), 0) == "65b4d96957a181f68f5d"
    assert _job_hash(engine, None, rows, Lora(), Train(min_steps=1, save_steps=5, share_prefix=False), 0) == (
        "65b4d96957a181f68f5d"
    )


def test_out_of_memory_names_the_settings_that_bound_it():
    import torch

    from jointcli.training.job import TrainJob
    from jointcli.training.loop import _training_errors
    from jointcli.training.model import TrainState

    train = Train(token_budget=400)
    job = TrainJob(Path("/models/m"), [], Path("/runs/a/adapters/classify"), Lora(), train, 0, None, "cpu", "float32")
    for error in (torch.OutOfMemoryError("out of memory"), MemoryError()):
        with pytest.raises(StepError) as raised:
            with _training_errors(job, TrainState(None, None, [], [])):
                raise error
        assert str(raised.value) == (
            "out of cpu memory training classify: lower train.token_budget (now 400) or train.max_length (now 1024)"
        )


def test_adapter_folder_is_replaced_whole_or_not_at_all(tmp_path: Path):
    """The adapter's folder (files.staged_dir, as loop._save_adapter writes it): a failed write keeps the
    old folder and leaves no temporary one; a finished one replaces it whole."""
    from jointcli.files import staged_dir

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed midway")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (out / "old.txt").is_file()
    with staged_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and [p.name for p in out.iterdir()] == ["new.txt"]


@pytest.mark.model
@pytest.mark.parametrize("same_length", [False, True], ids=["padded-suffixes", "equal-suffixes"])
def test_shared_prefix_gives_the_loss_and_gradient_of_whole_rows(checkpoint: Path, trainable, same_length: bool):
    """The prefix computed once (batch 1) and its cache repeated for every row: the same loss and
    LoRA gradients as every row computed whole, the prefix's share of the gradient included."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    data = [tokenize_pair(tokenizer, p) for p in to_prompt_completion(demo_rows()[3:])]
    rows = [data[0], data[0]] if same_length else data  # equal suffixes: no padding, no attention mask
    assert len({len(ids) for ids, _ in rows}) == (1 if same_length else 3)
    prefix = shared_prefix(rows)
    assert prefix >= 200 and prefix < min(start for _, start in rows)
    model, params = trainable
    assert model.training
    n_labels = sum(len(ids) - start for ids, start in rows)

    def loss_and_gradient(shared: bool):
        model.zero_grad(set_to_none=True)
        if shared:
            batch = collate_shared(rows, prefix, tokenizer.pad_token_id)
            assert (batch[2] is None) == same_length  # the attention mask
            nll, count = shared_completion_nll(model, *batch)
        else:
            nll, count = completion_nll(model, *collate(rows, tokenizer.pad_token_id))
        assert count == n_labels
        (nll / n_labels).backward()
        return nll.detach() / n_labels, torch.cat([p.grad.flatten() for p in params])

    whole_loss, whole = loss_and_gradient(False)
    shared_loss, shared = loss_and_gradient(True)
    assert whole.abs().max() > 0
    torch.testing.assert_close(shared_loss, whole_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared, whole, rtol=1e-4, atol=1e-6)
    # the gradient of the prefix is really there: the first layer's LoRA A sees only the inputs,
    # and the prefix tokens are most of them
    a0 = next(p for name, p in model.named_parameters() if "layers.0." in name and "lora_A" in name)
    assert a0.grad.abs().max() > 0


@pytest.mark.model
def test_a_step_over_several_micro_batches_gives_the_loss_and_gradient_of_whole_rows(checkpoint: Path, trainable):
    """The step's prefix computed once, its suffixes in two micro-batches (each leaving its share of
    the prefix's gradient on the detached cache, summed through the prefix once at the end): the same
    loss and LoRA gradients as every row computed whole."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rows = [tokenize_pair(tokenizer, p) for p in to_prompt_completion(demo_rows()[2:])]
    lengths = [len(ids) for ids, _ in rows]
    assert len(set(lengths)) == 4  # every micro-batch pads
    prefix = shared_prefix(rows)
    budget = prefix + 2 * max(n - prefix for n in lengths)  # two rows a micro-batch
    groups = plan_step(lengths, list(range(len(rows))), budget, rows)
    assert [(p, len(micros)) for p, micros in groups] == [(prefix, 2)]
    model, params = trainable
    n_labels = sum(len(ids) - start for ids, start in rows)

    model.zero_grad(set_to_none=True)
    whole_nll, count = completion_nll(model, *collate(rows, tokenizer.pad_token_id))
    assert count == n_labels
    (whole_nll / n_labels).backward()
    whole = torch.cat([p.grad.flatten() for p in params])

    model.zero_grad(set_to_none=True)
    total, seen = 0.0, []
    for micro, nll, _ in micro_batch_losses(model, rows, groups, tokenizer.pad_token_id, "cpu"):
        (nll / n_labels).backward()
        total += float(nll.detach())
        seen += micro
    shared = torch.cat([p.grad.flatten() for p in params])
    assert sorted(seen) == list(range(len(rows)))
    assert whole.abs().max() > 0
    assert total == pytest.approx(float(whole_nll), rel=1e-5)
    torch.testing.assert_close(shared, whole, rtol=1e-4, atol=1e-6)
    a0 = next(p for name, p in model.named_parameters() if "layers.0." in name and "lora_A" in name)
    assert a0.grad.abs().max() > 0  # the prefix's share reached the first layer


@pytest.mark.model
def test_training_shares_the_prefix_and_reports_progress(tmp_path: Path, checkpoint: Path, monkeypatch):
    """train_lora with the default token budget computes the prefix that a step's rows share once and
    runs their suffixes against it, and reports one progress tick per optimizer step, with its loss."""
    from contextlib import contextmanager

    import jointcli.training.loop as loop
    import jointcli.training.microbatch as microbatch

    prefixes, suffixes, phases = [], [], []
    real_init, real_nll = microbatch.SharedPrefix.__init__, microbatch.SharedPrefix.nll

    def counting_init(self, model, prefix_ids, *rest, **options):
        prefixes.append(prefix_ids.shape[1])
        real_init(self, model, prefix_ids, *rest, **options)

    def counting_nll(self, input_ids, *rest, **options):
        suffixes.append(input_ids.shape[0])
        return real_nll(self, input_ids, *rest, **options)

    @contextmanager
    def recording(label, total):
        notes: list[str] = []
        phases.append((label, total, notes))
        yield lambda n=1, note="": notes.append(note)

    monkeypatch.setattr(microbatch.SharedPrefix, "__init__", counting_init)
    monkeypatch.setattr(microbatch.SharedPrefix, "nll", counting_nll)
    monkeypatch.setattr(loop, "phase", recording)
    log = tmp_path / "log.jsonl"
    train_lora(
        checkpoint,
        sentiment_rows()[:4],
        tmp_path / "adapter",
        Lora(r=2, alpha=4),
        Train(epochs=1, batch_size=2),
        seed=0,
        log_path=log,
        device="cpu",
        dtype="float32",
    )
    assert len(prefixes) == 2 and all(p >= MIN_SHARED_PREFIX for p in prefixes)  # one prefix per step
    assert suffixes == [2, 2]  # one micro-batch of 2 rows per step
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert phases == [("LoRA training adapter", 2, [f"loss {x:.3f}" for x in losses])]


@pytest.mark.model
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=requires_native_bf16)])
def test_loss_falls(tmp_path: Path, checkpoint: Path, dtype: str):
    """fp32 (the CPU default) and bf16 autocast (the GPU default, opt-in on CPU) with micro-batches:
    the training loss falls. Four rows, two epochs of two steps, each of two micro-batches of a row."""
    log = tmp_path / "log.jsonl"
    result = train_lora(
        checkpoint,
        sentiment_rows()[:4],
        tmp_path / "adapter",
        Lora(r=4, alpha=8),
        Train(epochs=2, batch_size=1, grad_accum=2, learning_rate=3e-3, token_budget=300),
        seed=0,
        log_path=log,
        device="cpu",
        dtype=dtype,
    )
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert result.steps == len(losses) == 4 and result.dtype == dtype
    assert losses[-1] < 0.5 * losses[0] and sum(losses[-2:]) < sum(losses[:2])


@pytest.mark.model
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

    optimizer = dspy.BootstrapFinetune(
        metric=lambda example, prediction, trace=None: True,
        train_kwargs={"epochs": 3, "batch_size": 6, "learning_rate": 2e-3},
        num_threads=2,
    )
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
        return model_lm(
            lm15.Request(
                model=model_lm.model,
                system=system["content"],
                messages=(lm15.Message.user(user["content"]),),
                config=lm15.Config(max_tokens=24),
            )
        ).message.text  # not the 512 default

    tuned_text, base_text = complete(tuned_lm), complete(lm)
    assert "[[ ## sentiment ## ]]" in tuned_text and tuned_text != base_text

    # the same fine-tune asked again reuses the adapter folder: no second training
    again = dspy.Predict("sentence -> sentiment")
    again.set_lm(lm)
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        retuned = optimizer.compile(again, trainset=trainset, teacher=teacher)
    assert retuned.predictors()[0].lm.model == tuned_lm.model
    assert [p for p in (tmp_path / "adapters").iterdir() if p.is_dir()] == folders


@pytest.mark.model
def test_killed_training_resumes_from_its_checkpoint(tmp_path: Path, checkpoint: Path):
    """A training process with a checkpoint every 2 steps, SIGKILLed by the failpoint at its 3rd (and last)
    optimizer step, its adapter not yet written; the rerun resumes from step 2 and ends with the adapter
    of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    rows = sentiment_rows()[:3]
    args = dict(lora=Lora(r=2, alpha=4), train=Train(epochs=1, batch_size=1, save_steps=2), seed=0, device="cpu")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = (
        f"import json; from jointcli.training.lora import train_lora; from jointcli.recipe import Lora, Train; "
        f"train_lora({str(checkpoint)!r}, json.load(open({str(tmp_path / 'rows.json')!r})), "
        f"{str(tmp_path / 'resumed')!r}, Lora(r=2, alpha=4), Train(epochs=1, batch_size=1, save_steps=2), seed=0, "
        f"device='cpu', log_path={str(tmp_path / 'log.jsonl')!r})"
    )
    env = {**os.environ, "JOINTOPT_FAILPOINT": "train-step:3"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.glob(".resumed.work/checkpoint-*.pt")] == ["checkpoint-2.pt"]
    assert not (tmp_path / "resumed").exists()

    resumed = train_lora(checkpoint, rows, tmp_path / "resumed", log_path=tmp_path / "log.jsonl", **args)
    straight = train_lora(checkpoint, rows, tmp_path / "straight", **args)
    assert resumed.resumed_from_step == 2 and resumed.steps == straight.steps == 3
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-4)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    a, b = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("resumed", "straight"))
    assert a.keys() == b.keys() and all(torch_allclose(a[k], b[k]) for k in a)
    assert not (tmp_path / ".resumed.work").exists()


@pytest.mark.model
def test_the_trainer_shares_the_engines_fp32_weights_and_never_changes_them(tmp_path: Path, checkpoint: Path):
    """An fp32 engine in the process: the trainer's frozen base weights are the engine's tensors (one
    copy, weights/memory.py), training leaves them as they were, and the engine answers as before."""
    from jointcli.inference.engine import get_engine

    engine = get_engine(EMBEDDED_MODEL, "float32", "cpu")
    lm = dspy.LM("local/shared", engine=engine, max_tokens=8, temperature=0.0, cache=False)
    prompt = f"Is this review positive or negative? {SENTENCES[0][0]}"
    answer = lm(prompt)
    ours = {p.data_ptr() for p in engine.model.parameters()}
    model = load_for_training(checkpoint, Lora(r=2, alpha=4), "cpu", "float32", seed=0)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in ours for p in frozen)
    del model, frozen
    sums = [float(p.double().sum()) for p in engine.model.parameters()]
    train = Train(epochs=1, batch_size=2, learning_rate=1e-2)  # two optimizer steps of two rows
    train_lora(checkpoint, sentiment_rows()[:4], tmp_path / "a", Lora(r=2, alpha=4), train, seed=0, device="cpu")
    assert [float(p.double().sum()) for p in engine.model.parameters()] == sums
    assert lm(prompt) == answer
    # a bf16 training model (another dtype) keeps weights of its own
    bf16 = load_for_training(checkpoint, Lora(r=2, alpha=4), "cpu", "bfloat16", seed=0)
    assert not any(p.data_ptr() in ours for p in bf16.parameters())


@pytest.mark.model
def test_grouped_query_attention_gives_transformers_loss_and_gradients(checkpoint: Path, trainable):
    """The trainer's SDPA attention on the key/value heads as they are (training/model.py) against
    transformers' own (every key and value repeated per query head), on padded suffixes after a
    shared prefix and on whole rows."""
    import torch
    from transformers import AutoTokenizer

    from jointcli.training.model import GQA_SDPA

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rows = [tokenize_pair(tokenizer, p) for p in to_prompt_completion(demo_rows()[2:4])]
    assert len({len(ids) for ids, _ in rows}) == 2  # suffixes of two lengths: padded
    prefix, pad = shared_prefix(rows), tokenizer.pad_token_id
    model, params = trainable
    base = model.get_base_model()
    assert base.config._attn_implementation == GQA_SDPA and prefix >= MIN_SHARED_PREFIX

    def loss_and_gradient(attention: str):
        base.set_attn_implementation(attention)
        model.zero_grad(set_to_none=True)
        shared, _ = shared_completion_nll(model, *collate_shared(rows, prefix, pad))
        whole, _ = completion_nll(model, *collate(rows, pad))
        (shared + whole).backward()
        return torch.stack([shared.detach(), whole.detach()]), torch.cat([p.grad.flatten() for p in params])

    try:
        (ours, ours_grad), (theirs, theirs_grad) = loss_and_gradient(GQA_SDPA), loss_and_gradient("sdpa")
    finally:
        base.set_attn_implementation(GQA_SDPA)  # the module's model, as the other tests expect it
    assert ours_grad.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-5)  # summed, not per label token


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_floor_on_steps_changes_the_fingerprint_only_where_it_lengthens_training():
    """train.min_steps lengthens the default training of a small data set, and only then is the training
    (and so its resume fingerprint and the provider's job hash) another one."""
    from types import SimpleNamespace

    from jointcli.models.provider import _job_hash
    from jointcli.training.job import TrainJob
    from jointcli.training.work import resume_fingerprint

    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    engine = SimpleNamespace(weights_id="w123", device="cpu", checkpoint="/models/m")

    def keys(train: Train, n: int) -> tuple[str, str]:
        job = TrainJob(Path("/models/m"), [row] * n, Path("/runs/a/adapter"), Lora(), train, 0, None, "cpu", "float32")
        return resume_fingerprint(job, [row] * n), _job_hash(engine, None, [row] * n, Lora(), train, 0)

    # 192 rows of 8 a step: 2 epochs are 48 steps, the floor adds none
    assert keys(Train(), 192) == keys(Train(min_steps=1), 192) == keys(Train(min_steps=48), 192)
    # 60 rows: 2 epochs are 16 steps, the floor makes them 48: another training
    assert keys(Train(), 60) != keys(Train(min_steps=1), 60)
    assert keys(Train(), 60) == keys(Train(min_steps=48), 60)
    # epochs or steps set: taken as they are, whatever min_steps says
    assert keys(Train(epochs=1, min_steps=1), 60) == keys(Train(epochs=1), 60)
    assert keys(Train(steps=48), 60) != keys(Train(), 60)  # steps 48 and "2 epochs, at least 48" are written apart
