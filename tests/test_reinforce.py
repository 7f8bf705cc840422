"""The reinforce step (g): GRPO updates (training/grpo.py), rollouts and the step in a schedule
(steps/reinforce_step.py), its recipe checks, and stock dspy.GRPO on the local LM (models/reinforce.py)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import dspy
import pytest

from .conftest import RECIPES, cli, manifest, run_cli, tiny

SST2 = RECIPES / "sst2.yaml"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizers.g.group_size=1", "optimizers.g.group_size: Input should be greater than or equal to 2"),
        ("optimizers.g.temperature=0", "optimizers.g.temperature: Input should be greater than 0"),
        ("optimizers.g.epsilon=1.5", "optimizers.g.epsilon: Input should be less than 1"),
        ("optimizers.g.traces.source=program", "traces does not apply: a reinforce optimizer learns from its own"),
    ],
)
def test_validate_refuses_bad_reinforce_settings(override: str, message: str, capsys):
    assert cli("validate", SST2, "schedule.strategy=p -> g -> p", override) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_sst2_defines_g_and_validates(capsys):
    assert cli("validate", SST2, "schedule.strategy=p -> g -> p") == 0
    assert "p -> g -> p" in capsys.readouterr().err


def test_plan_counts_the_g_steps_rollouts(capsys):
    """`jointopt plan`: a g step samples train.steps x batch_size x group_size runs of the program, one
    LM call each for sst2's one module, and trains on a row per run; the table says so."""
    counts = []
    for group in (4, 8):
        assert cli("plan", SST2, "schedule.strategy=g", f"optimizers.g.group_size={group}", "--no-probe", "--json") == 0
        step = json.loads(capsys.readouterr().out)["steps"][1]
        assert step["kind"] == "g" and step["method"] == "GRPO on LoRA"
        train = step["train"]["classify"]
        assert step["phases"]["rollouts"]["calls"]["expected"] == 8 * 4 * group == train["rows"]
        assert step["phases"]["train"]["tokens_in"] == train["row_tokens"] * train["rows"]
        counts.append(step["phases"]["rollouts"]["tokens_in"])
    assert abs(counts[1] - 2 * counts[0]) <= 1  # each rounded from a mean prompt length
    assert cli("plan", SST2, "schedule.strategy=g", "--no-probe") == 0  # the table: where the steps come from
    table = capsys.readouterr().err.replace("\n", " ")
    assert "128 rollouts of" in table and "8 optimizer steps (train.steps: 8 " in table


def _groups() -> tuple[list[dict], list[float]]:
    """Two sentences, each answered both ways with the same prompt (a group of 2); reward 1 when right."""
    adapter = dspy.ChatAdapter()
    signature = dspy.Signature("sentence -> sentiment")
    rows, rewards = [], []
    for sentence, gold in [
        ("A warm, funny and moving film.", "positive"),
        ("Dull, slow and far too long.", "negative"),
    ]:
        for answer in ("positive", "negative"):
            rows.append(adapter.format_finetune_data(signature, [], {"sentence": sentence}, {"sentiment": answer}))
            rewards.append(float(answer == gold))
    return rows, rewards


def _policy(share_prefix: bool = True, iterations: int = 1, beta: float = 0.0, lr: float = 1e-2):
    from jointcli.recipe import EMBEDDED_MODEL, Lora, Train
    from jointcli.training.grpo import GrpoJob, GrpoPolicy, GrpoSettings
    from jointcli.weights.checkpoint import resolve_checkpoint

    train = Train(steps=2, learning_rate=lr, share_prefix=share_prefix)
    settings = GrpoSettings(beta=beta, iterations=iterations)
    job = GrpoJob(resolve_checkpoint(EMBEDDED_MODEL), Lora(r=2, alpha=4), train, settings, "cpu", "float32", 0, 4)
    return GrpoPolicy(job)


def _row_logps(policy, rows: list[dict]) -> list[float]:
    import torch

    from jointcli.training.microbatch import micro_batch_losses, plan_step
    from jointcli.training.rows import to_prompt_completion, tokenize_pair

    tokens = [tokenize_pair(policy.tokenizer, p) for p in to_prompt_completion(rows)]
    groups = plan_step([len(ids) for ids, _ in tokens], list(range(len(tokens))), 4096, None)
    out = [0.0] * len(tokens)
    with torch.no_grad():
        for micro, nll, _ in micro_batch_losses(policy.state.model, tokens, groups, policy.pad_id, "cpu", per_row=True):
            for i, v in zip(micro, nll.tolist()):
                out[i] = -v
    return out


@pytest.mark.model
def test_grpo_scores_answers_at_the_rollouts_temperature():
    """The log-probabilities GRPO trains on are those of the distribution its rollouts were sampled
    from: log_softmax(logits / T) of the model's own forward on each whole row, on micro-batches that
    share the group's prompt as on whole rows (TRL divides its logits by its temperature so)."""
    import torch

    from jointcli.training.microbatch import micro_batch_losses, plan_step
    from jointcli.training.rows import to_prompt_completion, tokenize_pair

    rows, _ = _groups()
    policy = _policy()
    model, tokens = policy.state.model, [tokenize_pair(policy.tokenizer, p) for p in to_prompt_completion(rows)]

    def scored(shared, temperature: float) -> dict:
        groups = plan_step([len(ids) for ids, _ in tokens], list(range(len(tokens))), 4096, shared)
        out = {}
        for micro, nll, counts in micro_batch_losses(
            model, tokens, groups, policy.pad_id, "cpu", per_row="token", temperature=temperature
        ):
            out.update(zip(micro, (-nll).split(counts.tolist())))
        return out

    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0, start - 1 : -1].float() for ids, start in tokens]

        def expected(temperature: float) -> list:
            return [
                torch.log_softmax(row / temperature, -1).gather(1, torch.tensor(ids[start:])[:, None])[:, 0]
                for row, (ids, start) in zip(logits, tokens)
            ]

        at_half, at_one = expected(0.5), expected(1.0)
        for shared in (tokens, None):
            got = scored(shared, 0.5)
            for i, want in enumerate(at_half):
                assert torch.allclose(got[i], want, atol=1e-4), (shared is None, i)
                assert not torch.allclose(got[i], at_one[i], atol=1e-3)  # the temperature is applied


@pytest.mark.model
def test_grpo_updates():
    """On one model: (1) two optimizer steps on one batch (the ratio away from 1 in the second) with a
    KL term give the same updates on micro-batches that share the group's prompt as on whole rows
    (plain SGD, so that the parameters differ as the gradients do; AdamW's first step is about lr x
    their sign); (2) with AdamW, one step a batch and no KL term, updates raise the rewarded answers' log-probabilities above the others'."""
    import dataclasses

    import torch

    from jointcli.training.grpo import GrpoSettings, advantages

    rows, rewards = _groups()
    adv = advantages(rewards[:2]) + advantages(rewards[2:])
    policy = _policy(iterations=2, beta=0.1)
    start = [p.detach().clone() for p in policy.state.params]

    def restart(share: bool, optimizer) -> None:
        train = policy.job.train.model_copy(update={"share_prefix": share})
        policy.job = dataclasses.replace(policy.job, train=train)
        with torch.no_grad():
            for p, s in zip(policy.state.params, start):
                p.copy_(s)
        policy.state.optimizer = optimizer
        policy.state.optimizer.param_groups[0]["peak_lr"] = optimizer.param_groups[0]["lr"]
        policy.state.step = 0

    after = []
    for share in (True, False):
        restart(share, torch.optim.SGD(policy.state.params, lr=1.0))
        policy.update(rows, adv)
        after.append([p.detach().clone() for p in policy.state.params])
    for a, b in zip(*after):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert any((a - s).abs().sum() > 0 for a, s in zip(after[0], start))

    restart(True, torch.optim.AdamW(policy.state.params, lr=1e-2))
    policy.job = dataclasses.replace(policy.job, grpo=GrpoSettings())  # one step a batch, no KL term
    policy.start = None
    before = _row_logps(policy, rows)
    for _ in range(2):
        figures = policy.update(rows, adv)
        assert figures["rows"] == 4 and figures["grad_norm"] is not None
    moved = [a - b for a, b in zip(_row_logps(policy, rows), before)]
    rewarded = [m for m, r in zip(moved, rewards) if r == 1.0]
    others = [m for m, r in zip(moved, rewards) if r == 0.0]
    assert min(rewarded) > max(others)


@pytest.mark.model
def test_g_step_runs_in_a_schedule_and_resumes_after_a_kill(runs: Path):
    """Killed as its second step's rollouts are written (a checkpoint after the first), the g step
    resumes after step 1 and finishes: adapter, reward curve, rollouts, no work folder left."""
    overrides = tiny(2, 2, 2, "optimizers.g.train.steps=2", "optimizers.g.group_size=2")
    overrides += ["optimizers.g.train.batch_size=1", "optimizers.g.train.save_steps=1", "schedule.strategy=g"]
    args = ["joint", SST2, *overrides, "--runs-dir", runs, "--name", "g"]
    killed = run_cli(*map(str, args), env={"JOINTOPT_FAILPOINT": "write/rollouts.jsonl:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = runs / "g"
    assert list((run / "01-g" / "adapters" / ".classify.work").glob("checkpoint-1.pt"))
    assert cli(*args) == 0
    steps = manifest(run)["steps"]
    assert [s["kind"] for s in steps] == ["baseline", "g"] and steps[1]["status"] == "done"
    folder = run / "01-g"
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2]
    training = json.loads((folder / "adapters" / "classify" / "training.json").read_text())
    assert len(training["reward_curve"]) == 2 and training["rollouts"] == 4
    assert len((folder / "rollouts.jsonl").read_text().splitlines()) == 4
    assert not list((folder / "adapters").glob(".*.work"))


SENTENCES = [
    ("A warm, funny and moving film.", "positive"),
    ("Dull, slow and far too long.", "negative"),
    ("One of the best films of the year.", "positive"),
    ("The plot makes no sense at all.", "negative"),
]


@pytest.mark.model
def test_seeded_rollouts_are_drawn_again_the_same():
    """collect_rollouts with a seed (the g step passes the recipe's seed, the step and the optimizer
    step) draws the same rollouts again, so a resumed step redraws what it drew; another seed draws
    others, and the samples of a group differ from one another."""
    from jointcli.models.provider import local_lm
    from jointcli.steps.rollouts import collect_rollouts, sampling

    student = dspy.Predict("sentence -> sentiment")
    student.demos = [dspy.Example(sentence=s, sentiment=y) for s, y in SENTENCES]
    student.set_lm(local_lm(dtype="float32", max_tokens=24, temperature=0.0, cache=False))
    student = sampling(student, temperature=1.0)
    examples = [dspy.Example(sentence=s, sentiment=y).with_inputs("sentence") for s, y in SENTENCES[1:2]]

    def metric(example, prediction, trace=None) -> float:
        return float(prediction.sentiment.strip().lower() == example.sentiment)

    def draw(seed: tuple) -> list[tuple]:
        got = collect_rollouts(student, examples, metric, 4, 0.0, ["self"], num_threads=8, seed=seed)
        return [(r.example, r.sample, r.reward, r.answer, r.error) for r in got]

    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        first, again, other = draw((0, 1, 0)), draw((0, 1, 0)), draw((0, 1, 1))
    assert first == again and first != other
    assert len({r[3] for r in first[:4]}) > 1  # the answer, or the text that did not parse


@pytest.mark.model
def test_stock_dspy_grpo_trains_the_local_lm(tmp_path: Path):
    """Plain DSPy: GRPO(...).compile(student, trainset=...) with the student on local_lm(); the adapter
    it trains changes the student's greedy answers."""
    import torch
    from dspy.teleprompt.grpo import GRPO

    from jointcli.models.provider import local_lm

    torch.manual_seed(0)
    lm = local_lm(adapters_dir=tmp_path, max_tokens=24, temperature=1.0)
    base = lm.model
    student = dspy.Predict("sentence -> sentiment")
    student.demos = [dspy.Example(sentence=s, sentiment=y) for s, y in SENTENCES]
    student.set_lm(lm)
    trainset = [dspy.Example(sentence=s, sentiment=y).with_inputs("sentence") for s, y in SENTENCES[:2]]
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)

    def answers() -> list[str]:
        greedy = lm.copy(temperature=0.0, cache=False)
        prompts = [adapter.format(student.signature, student.demos, {"sentence": s}) for s, _ in SENTENCES]
        return [greedy(messages=m)[0] for m in prompts]

    def metric(example, prediction, trace=None) -> float:
        return float(prediction.sentiment.strip().lower() == example.sentiment)

    before = answers()
    optimizer = GRPO(
        metric=metric,
        num_train_steps=1,
        num_rollouts_per_grpo_step=4,
        num_dspy_examples_per_grpo_step=2,
        exclude_demos=True,
        num_threads=8,
        train_kwargs={"train": {"learning_rate": 2e-2, "batch_size": 2}, "lora": {"r": 2, "alpha": 4}},
    )
    with dspy.context(adapter=adapter):
        tuned = optimizer.compile(student, trainset=trainset)
    assert tuned.predictors()[0].lm.model.startswith(base + "@grpo-")
    assert answers() != before
