"""A prompt step that cannot bootstrap a demo says so in seconds: the optimizers that bootstrap stop when
the program they bootstrap with parses none of the first training examples; the step keeps the program,
records why, and the schedule says what would work and goes on."""

from __future__ import annotations

import json

import dspy
import pytest
from dspy.utils.dummies import DummyLM

from jointcli.recipe import PromptOptimizer
from jointcli.steps.prompts import NO_FORMAT, PROBE_EXAMPLES, cannot_bootstrap, demo_counts, make_optimizer

from .conftest import RECIPES, cli, manifest, tiny

SUPPLIED = {"metric": lambda example, pred, trace=None: 1.0, "num_threads": 4, "seed": 0}


def spec(optimizer: str, args: dict | None = None, compile_args: dict | None = None) -> PromptOptimizer:
    return PromptOptimizer(type="prompt", optimizer=optimizer, args=args or {}, compile_args=compile_args or {})


def test_which_optimizers_bootstrap_and_how_many_demos():
    boot = spec("BootstrapFewShot", {"max_labeled_demos": 4, "max_bootstrapped_demos": 2})
    assert demo_counts(make_optimizer("p", boot, SUPPLIED), boot.compile_args) == (2, 4)
    search = spec("BootstrapFewShotWithRandomSearch", {"max_bootstrapped_demos": 3, "num_candidate_programs": 2})
    assert demo_counts(make_optimizer("p", search, SUPPLIED), search.compile_args) == (3, 16)  # DSPy's default
    labeled = spec("LabeledFewShot", {"k": 4})
    assert demo_counts(make_optimizer("p", labeled, SUPPLIED), labeled.compile_args) is None


def _program() -> dspy.Module:
    return dspy.Predict("sentence -> sentiment")


def _trainset(n: int = 12) -> list[dspy.Example]:
    return [dspy.Example(sentence=f"sentence {i}", sentiment="positive").with_inputs("sentence") for i in range(n)]


@pytest.mark.parametrize(
    "answers, args, stopped",
    [
        ([{"other": "x"}] * 40, {"max_labeled_demos": 2}, True),  # no answer has the sentiment field: none parses
        ([{"sentiment": "positive"}] * 40, {"max_labeled_demos": 2}, False),
        ([{"other": "x"}] * 40, {"max_bootstrapped_demos": 0}, False),  # bootstraps nothing: nothing to probe
    ],
)
def test_the_probe_stops_only_when_nothing_parses(answers, args, stopped):
    p = spec("BootstrapFewShot", args)
    optimizer = make_optimizer("p", p, SUPPLIED)
    lm = DummyLM(answers)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        why = cannot_bootstrap(optimizer, p, _program(), _trainset(), num_threads=4)
    if stopped:
        assert why == f"{NO_FORMAT} (0 of the first {PROBE_EXAMPLES} training examples parsed, with 2 labeled demos)"
    else:
        assert why is None
    calls = len(lm.history)
    assert calls == (0 if args.get("max_bootstrapped_demos") == 0 else PROBE_EXAMPLES)


@pytest.mark.model
def test_a_prompt_step_on_a_program_that_parses_nothing_stops_and_the_run_goes_on(runs):
    """Two new tokens cannot hold DSPy's `[[ ## sentiment ## ]]` marker: no answer parses, whatever the model."""
    code = cli(
        "joint",
        RECIPES / "sst2.yaml",
        *tiny(8, 4, 4),
        "models.small.max_tokens=2",
        "optimizers.p.args.max_labeled_demos=0",
        "schedule.strategy=p -> w",
        "--name",
        "early",
        "--runs-dir",
        runs,
    )
    assert code == 0
    m = manifest(runs / "early")
    assert m["finished"] and [s["kind"] for s in m["steps"]] == ["baseline", "p", "w"]
    p = m["steps"][1]
    assert p["status"] == "done" and p["info"]["stopped_early"].startswith(NO_FORMAT)
    assert any("try a weight step first ('schedule.strategy=w -> p')" in w for w in p["info"]["dev_warnings"])
    program = json.loads((runs / "early" / "01-p" / "program.json").read_text())
    assert all(not part.get("demos") for part in program.values() if isinstance(part, dict))  # kept as it was
