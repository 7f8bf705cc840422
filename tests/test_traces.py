"""Trace sources of the weight step, on the real model: `program+labels` (the default) keeps the
program's passing traces and teaches the label modules the gold answer for the examples that failed,
inside the module's current prompt; modules whose outputs are not labels learn from passes only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import RECIPES, cli, manifest, tiny

PROMPTED = tiny(4, 2, 2, "optimizers.p.optimizer=LabeledFewShot", "optimizers.p.args={k: 2}")


def _rows(step: Path) -> list[dict]:
    return [json.loads(line) for line in (step / "traces.jsonl").read_text().splitlines()]


def _answers(rows: list[dict]) -> dict[str, str]:
    """The example's user message -> the answer a row teaches (steps shuffle the split each time,
    so rows of two steps are matched by content, not by position)."""
    return {r["messages"][-2]["content"]: r["messages"][-1]["content"] for r in rows}


@pytest.mark.model
def test_failed_examples_get_the_gold_answer_inside_the_current_prompt(runs):
    # a prompt step first: the module's current prompt carries two demos
    assert cli("optimize-prompts", RECIPES / "sst2.yaml", *PROMPTED, "--runs-dir", runs) == 0
    # nothing reaches a score of 2: every example failed, so every row is a gold one
    assert (
        cli(
            "bootstrap",
            RECIPES / "sst2.yaml",
            *PROMPTED,
            "optimizers.w.traces.threshold=2.0",
            "--runs-dir",
            runs,
            "--force",
        )
        == 0
    )
    # the same split, gold labels only (the single-module source): the reference rows
    assert (
        cli(
            "bootstrap",
            RECIPES / "sst2.yaml",
            *PROMPTED,
            "optimizers.w.traces.source=labels",
            "--runs-dir",
            runs,
            "--force",
        )
        == 0
    )
    run = runs / "sst2"
    mixed, gold = _rows(run / "01-bootstrap"), _rows(run / "02-bootstrap")
    assert len(mixed) == 4 and {r["source"] for r in mixed} == {"labels"}
    assert sorted(json.dumps(r["messages"]) for r in mixed) == sorted(json.dumps(r["messages"]) for r in gold)
    roles = [m["role"] for m in mixed[0]["messages"]]
    assert roles.count("user") == 3  # two demos, then the example: the module's current prompt
    assert mixed[0]["messages"][-1]["content"].startswith("[[ ## sentiment ## ]]\n")
    counts = json.loads((run / "01-bootstrap" / "traces.json").read_text())
    assert counts["per_source"] == {"labels": 4} and counts["passed"] == 0

    # with the usual threshold: what passed comes from the program, the rest from the labels
    assert cli("bootstrap", RECIPES / "sst2.yaml", *PROMPTED, "--runs-dir", runs, "--force") == 0
    rows = _rows(run / "03-bootstrap")
    counts = manifest(run)["steps"][-1]["info"]["traces"]
    assert len(rows) == 4 and counts["per_source"].get("program", 0) == counts["passed"]
    gold_answers = _answers(gold)
    for row in rows:
        if row["source"] == "labels":  # a failed example: taught the gold answer, in the same prompt
            assert row["score"] < 1.0 and _answers([row]).items() <= gold_answers.items()
        else:  # a passing one: the program's own answer, which the metric accepted
            assert row["source"] == "program" and row["score"] >= 1.0


@pytest.mark.model
def test_modules_that_output_no_label_learn_from_passing_traces_only(runs, tmp_path):
    """A two-module program whose first module outputs the label and whose second explains it:
    the first is taught every example (its own passing answer or the gold one), the second only
    the examples that passed."""
    tree = yaml.safe_load((RECIPES / "sst2-pipeline.yaml").read_text())
    tree["program"]["modules"] = [
        {
            "name": "classify",
            "signature": "sentence -> sentiment",
            "model": "small",
            "instructions": "Classify the sentiment of the review as positive or negative.",
        },
        {
            "name": "explain",
            "signature": "sentence, sentiment -> opinion",
            "model": "large",
            "instructions": "In a few words, say why the review has this sentiment.",
        },
    ]
    recipe = tmp_path / "explained.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    args = [*tiny(6, 2, 2), "models.large.max_tokens=24", "optimizers.w.modules=all", "--runs-dir", runs]
    assert cli("bootstrap", recipe, *args) == 0
    run = runs / "sst2-pipeline"
    rows = _rows(run / "00-bootstrap")
    counts = json.loads((run / "00-bootstrap" / "traces.json").read_text())
    classify = [r for r in rows if r["module"] == "classify"]
    explain = [r for r in rows if r["module"] == "explain"]
    assert len(classify) == 6  # every example: the program's passing answer or the gold one
    assert {r["source"] for r in explain} <= {"program"} and len(explain) == counts["passed"]
    assert counts["per_source"].get("labels", 0) == 6 - counts["passed"]


TALLY = {"summarize": {"ran": 6, "parsed": 0, "passed": 0}, "classify": {"ran": 0, "parsed": 0, "passed": 0}}


@pytest.mark.parametrize(
    "modules, source, prompted, says, not_says",
    [
        # a pipeline whose first module never parses: name it, whatever the hints would be
        (
            TALLY,
            "program+labels",
            True,
            ["module 'summarize' answered none of its 6", "failures.jsonl"],
            ["prompt step first"],
        ),
        # one module: the hints that apply to the run as it is
        (
            {"classify": {"ran": 6, "parsed": 0, "passed": 0}},
            "program",
            False,
            ["traces.source=program+labels", "a prompt step first"],
            ["summarize"],
        ),
        (
            {"classify": {"ran": 6, "parsed": 6, "passed": 0}},
            "program+labels",
            True,
            ["a teacher", "a lower traces.threshold"],
            ["program+labels", "prompt step first"],
        ),
    ],
)
def test_no_traces_error_names_the_blocking_module_and_only_hints_that_apply(modules, source, prompted, says, not_says):
    from jointcli.recipe import load_recipe
    from jointcli.steps.weights import no_traces_error

    spec = load_recipe(RECIPES / "sst2.yaml", [f"optimizers.w.traces.source={source}"]).optimizers["w"]
    message = str(no_traces_error({"run": 6, "passed": 0, "modules": modules}, spec, prompted))
    assert all(s in message for s in says) and not any(s in message for s in not_says), message
