"""`schedule.select`: the step to ship, by rule. The pure function on hand-made figures (each rule's
documented step, ties, a bound no step meets, weights), the recipe's checks, and joint's choice,
`status` and `compare` on hand-made run directories (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from jointcli.checks import check_select
from jointcli.errors import InputError
from jointcli.files import write_json, write_jsonl
from jointcli.recipe import Select, load_recipe
from jointcli.rundir import RunDir
from jointcli.schedule import finished_steps, record_best
from jointcli.selection import Figures, adapter_parameters, choose_step, describe, figures_of, select_step

from .conftest import RECIPES, cli, manifest

# A schedule `p -> w -> p`: the prompt step adds demos (more tokens), the weight step an adapter of
# 1,024 parameters (8 x 64 + 64 x 8) that the last prompt step keeps, with shorter prompts.
SHOP = [
    Figures("00-baseline", 0.50, 120.0, 0.5, 0),
    Figures("01-p", 0.75, 400.0, 0.5, 0),
    Figures("02-w", 0.80, 380.0, 0.5, 1024),
    Figures("03-p", 0.70, 250.0, 0.5, 1024),
]


def chosen(select: Select | None, figures: list[Figures] = SHOP) -> str:
    return select_step(figures, select).folder


# ---------------------------------------------------------------- the rule, on hand-made figures
def test_without_a_rule_the_best_dev_score_ties_to_the_earlier_step():
    assert chosen(None) == "02-w"
    assert chosen(Select()) == "02-w"  # an empty select is the default rule, said in words
    assert describe(None) == "the best dev score" and describe(Select()) == "maximize score"
    tie = [Figures("00-baseline", 0.5), Figures("01-p", 0.8), Figures("02-w", 0.8)]
    assert chosen(None, tie) == chosen(Select(), tie) == "01-p"
    assert select_step([], Select()) is None


@pytest.mark.parametrize(
    "select, step",
    [
        (Select(maximize="-tokens"), "00-baseline"),  # 120 tokens per example
        (Select(maximize="-parameters"), "00-baseline"),  # 0, like 01-p: the earlier
        (Select(maximize="score", constraints={"tokens": 300}), "03-p"),  # 0.70 beats the baseline's 0.50
        (Select(constraints={"tokens": 250}), "03-p"),  # a bound is inclusive
        (Select(constraints={"parameters": 0}), "01-p"),  # prompts only
        (Select(maximize="-tokens", constraints={"parameters": 1024}), "00-baseline"),
        (Select(weights={"score": 1.0, "tokens": -0.001}), "03-p"),  # 0.38, 0.35, 0.42, 0.45
        (Select(weights={"score": 1.0, "tokens": -0.0001}), "02-w"),  # 0.488, 0.71, 0.762, 0.675
        (Select(weights={"score": 1.0, "parameters": -0.001}), "01-p"),  # 0.5, 0.75, -0.224, -0.324
    ],
)
def test_each_rule_chooses_its_documented_step(select, step):
    selection = select_step(SHOP, select)
    assert (selection.folder, selection.fallback) == (step, None)


def test_ties_go_to_the_earlier_step():
    even = [Figures("00-baseline", 0.5, 100.0), Figures("01-p", 0.7, 100.0), Figures("02-w", 0.7, 100.0)]
    assert chosen(Select(maximize="-tokens"), even) == "00-baseline"
    assert chosen(Select(constraints={"tokens": 100}), even) == "01-p"
    # 0.5 - 0.5 * 0 == 1.0 - 0.5 * 1.0: equal sums (exact in binary), the earlier step
    sums = [Figures("00-baseline", 0.25, 1.0), Figures("01-p", 0.5, 0.0), Figures("02-w", 1.0, 1.0)]
    assert chosen(Select(weights={"score": 1.0, "tokens": -0.5}), sums) == "01-p"


def test_a_bound_no_step_meets_falls_back_to_the_best_dev_score_and_says_why():
    selection = select_step(SHOP, Select(maximize="-tokens", constraints={"tokens": 100}))
    assert selection.folder == "02-w"
    assert selection.fallback == (
        "no step has tokens <= 100 (the lowest: 120, 00-baseline); using the best dev score: 02-w"
    )
    assert selection.rule == "maximize -tokens with tokens <= 100"
    both = select_step(SHOP, Select(constraints={"tokens": 100, "seconds": 0.25}))
    assert both.fallback == (
        "no step has tokens <= 100 (the lowest: 120, 00-baseline); no step has "
        "seconds <= 0.25 (the lowest: 0.5, 00-baseline); using the best dev score: 02-w"
    )
    # each bound is met by some step, but never both by one
    apart = [
        Figures("00-baseline", 0.5, tokens=300.0, parameters=0),
        Figures("01-w", 0.6, tokens=100.0, parameters=1024),
    ]
    assert select_step(apart, Select(constraints={"tokens": 200, "parameters": 512})).fallback == (
        "no step meets tokens <= 200, parameters <= 512 at once; using the best dev score: 01-w"
    )


def test_a_step_without_a_figure_the_rule_uses_is_no_candidate():
    cached = [Figures("00-baseline", 0.5, 120.0, 0.4), Figures("01-p", 0.9, 400.0, None)]
    assert chosen(Select(maximize="score", constraints={"seconds": 1.0}), cached) == "00-baseline"
    assert chosen(Select(maximize="-seconds"), cached) == "00-baseline"
    every_call_cached = [Figures("00-baseline", 0.5, 120.0), Figures("01-p", 0.9, 400.0)]
    selection = select_step(every_call_cached, Select(maximize="-seconds"))
    assert selection.folder == "01-p"
    assert selection.fallback == (
        "no step records seconds (only uncached calls are timed); using the best dev score: 01-p"
    )


def test_the_rule_in_words():
    assert (
        describe(Select(weights={"score": 1.0, "tokens": -0.001}, constraints={"tokens": 300}))
        == "maximize 1*score - 0.001*tokens with tokens <= 300"
    )
    assert describe(Select(weights={"tokens": -0.5, "score": 2})) == "maximize -0.5*tokens + 2*score"
    assert (
        describe(Select(maximize="-seconds", constraints={"seconds": 0.25, "parameters": 0}))
        == "maximize -seconds with seconds <= 0.25, parameters <= 0"
    )


# ---------------------------------------------------------------- the recipe's checks
@pytest.mark.parametrize(
    "select, message",
    [
        (
            Select(maximize="scor"),
            "schedule.select.maximize: unknown objective 'scor'; write one of score, -tokens, "
            "-seconds, -parameters; did you mean 'score'?",
        ),
        (
            Select(maximize="tokens"),
            "schedule.select.maximize: 'tokens' would choose the step with the most tokens; write '-tokens'",
        ),
        (
            Select(maximize="-score"),
            "schedule.select.maximize: '-score' would choose the step with the lowest dev score; write 'score'",
        ),
        (Select(weights={}), "schedule.select.weights: empty; give the score or a cost a weight"),
        (
            Select(weights={"tokns": -1.0}),
            "schedule.select.weights: unknown objective 'tokns'; objectives are score, "
            "tokens, seconds, parameters; did you mean 'tokens'?",
        ),
        (
            Select(weights={"score": 1.0, "tokens": 0.001}),
            "schedule.select.weights.tokens: 0.001 would prefer more tokens; a cost's weight is negative (e.g. -0.001)",
        ),
        (Select(weights={"score": -1.0}), "schedule.select.weights.score: -1 would prefer a lower dev score"),
        (Select(weights={"score": 1.0, "seconds": 0}), "schedule.select.weights.seconds: 0 counts nothing"),
        (
            Select(constraints={"score": 0.8}),
            "schedule.select.constraints: unknown cost 'score'; constraints are upper "
            "bounds on tokens, seconds, parameters",
        ),
        (Select(constraints={"parameter": 0}), "did you mean 'parameters'?"),
    ],
)
def test_bad_rules_are_named_in_one_line(select, message):
    with pytest.raises(InputError) as err:
        check_select(select)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_good_rules_pass_and_the_schema_refuses_the_rest():
    for select in (
        None,
        Select(),
        Select(maximize="-parameters", constraints={"tokens": 300, "seconds": 0.5}),
        Select(weights={"score": 1.0, "tokens": -0.001}),
    ):
        check_select(select)
    with pytest.raises(ValidationError, match="give maximize or weights, not both"):
        Select(maximize="score", weights={"score": 1.0})
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Select(constraints={"tokens": -1})


# ---------------------------------------------------------------- on run directories (no model)
def adapter(folder: Path) -> None:
    """A PEFT adapter folder as lora.py saves one: 8 x 64 + 64 x 8 = 1,024 parameters."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"lora_A.weight": np.zeros((8, 64), dtype=np.float32), "lora_B.weight": np.zeros((64, 8), dtype=np.float32)},
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    write_json(folder / "adapter_config.json", {"r": 8})


def shop_run(root: Path, name: str, select: str | None, finish: bool = True) -> RunDir:
    """The run of SHOP's figures, written as `joint` writes one (p -> w -> p, every step scored on
    dev; four dev examples). `finish`: the best step chosen as joint chooses it, then it and the last
    step scored on test (each scores its dev score)."""
    overrides = ["schedule.strategy=p -> w -> p"] + ([f"schedule.select={select}"] if select else [])
    run = RunDir.open(root, name, load_recipe(RECIPES / "sst2.yaml", overrides))
    run.set_manifest_field("data_fingerprint", "one-split")
    adapter_of = None
    for figures in SHOP:
        step = run.begin(figures.folder[3:])
        rows = [
            {
                "index": i,
                "score": figures.score,
                "tokens_in": figures.tokens - 20,
                "tokens_out": 20,
                "seconds": figures.seconds,
                "cached_calls": 0,
            }
            for i in range(4)
        ]
        _record(run, step, "dev", rows)
        if step.kind == "w":
            adapter_of = f"{step.folder}/adapters/classify"
            adapter(run.path / adapter_of)
        if step.kind in ("p", "w"):
            write_json(
                run.step_dir(step) / "state.json",
                {"program": None, "modules": {"classify": {"model": "small", "adapter": adapter_of}}},
            )
        run.finish(step, 1.0)
    if finish:
        scored = finished_steps(run)
        best = record_best(run)
        run.set_manifest_field("best", best.folder)
        for step in {best.folder: best, scored[-1].folder: scored[-1]}.values():
            _record(run, step, "test", [{"index": i, "score": step.scores["dev"]} for i in range(4)])
            run.update(step)
        run.set_manifest_field("finished", True)
    run.unlock()
    return run


def _record(run: RunDir, step, split: str, rows: list[dict]) -> None:
    suffix = "" if split == "dev" else f"-{split}"
    write_jsonl(run.step_dir(step) / f"predictions{suffix}.jsonl", rows)
    write_json(run.step_dir(step) / f"eval{suffix}.json", {"split": split, "score": rows[0]["score"]})
    step.scores[split] = rows[0]["score"]


def test_the_figures_are_read_from_what_the_run_recorded(tmp_path):
    run = shop_run(tmp_path, "shop", None, finish=False)
    steps = run.done_steps()
    assert [figures_of(run.path, steps, s) for s in steps] == SHOP
    assert adapter_parameters(run.path / "02-w" / "adapters" / "classify") == 1024
    assert choose_step(run.path, steps, Select(maximize="score", constraints={"tokens": 300})).folder == "03-p"
    (run.path / "02-w" / "adapters" / "classify" / "adapter_model.safetensors").unlink()
    assert figures_of(run.path, steps, steps[3]).parameters is None  # unreadable: unknown, never a guess


def test_joint_ships_the_step_the_rule_chooses_and_status_and_compare_agree(tmp_path, capsys):
    shop_run(tmp_path, "short", "{maximize: score, constraints: {tokens: 300}}")
    m = manifest(tmp_path / "short")
    assert m["best"] == "03-p" and "test" in m["steps"][3]["scores"]
    assert m["selection"] == {"rule": "maximize score with tokens <= 300", "step": "03-p", "fallback": None}

    assert cli("status", tmp_path / "short") == 0
    err = capsys.readouterr().err
    assert "best step by schedule.select (maximize score with tokens <= 300): 03-p" in err
    assert [line for line in err.splitlines() if "03-p" in line and "│" in line][0].rstrip(" │").endswith("best")

    assert cli("compare", "short", "--runs-dir", tmp_path, "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["best_step"] == ["03-p"] and row["test"] == 0.7 and row["best_dev"] == 0.7
    assert row["per_run"][0]["selected_by"] == "maximize score with tokens <= 300"
    assert row["per_run"][0]["selection_warning"] is None
    assert cli("compare", "short", "--runs-dir", tmp_path) == 0
    err = capsys.readouterr().err
    assert "best step by dev or schedule.select" in err
    assert "short: best step by schedule.select: maximize score with tokens <= 300" in err


def test_an_unmet_rule_ships_the_best_dev_score_with_a_warning(tmp_path, capsys):
    shop_run(tmp_path, "tight", "{maximize: -tokens, constraints: {tokens: 100}}")
    m = manifest(tmp_path / "tight")
    why = "no step has tokens <= 100 (the lowest: 120, 00-baseline); using the best dev score: 02-w"
    assert m["best"] == "02-w" and m["selection"]["fallback"] == why

    assert cli("status", tmp_path / "tight") == 0
    assert f"warning: schedule.select (maximize -tokens with tokens <= 100): {why}" in capsys.readouterr().err
    assert cli("compare", "tight", "--runs-dir", tmp_path, "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["best_step"] == ["02-w"] and row["per_run"][0]["selection_warning"] == why
    assert cli("compare", "tight", "--runs-dir", tmp_path) == 0
    assert f"warning: tight: schedule.select: {why}" in capsys.readouterr().err


def test_an_unfinished_run_is_compared_by_its_rule(tmp_path, capsys):
    shop_run(tmp_path, "cheap", "{maximize: -tokens}", finish=False)
    assert cli("compare", "cheap", "--runs-dir", tmp_path, "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["best_step"] == ["00-baseline"] and row["test"] is None


def test_without_a_rule_nothing_changes(tmp_path, capsys):
    shop_run(tmp_path, "plain", None)
    m = manifest(tmp_path / "plain")
    assert m["best"] == "02-w" and "selection" not in m
    assert "select" not in (tmp_path / "plain" / "recipe.yaml").read_text()  # the same frozen recipe as before
    assert cli("status", tmp_path / "plain") == 0
    assert "schedule.select" not in capsys.readouterr().err
    assert cli("compare", "plain", "--runs-dir", tmp_path, "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["best_step"] == ["02-w"] and row["per_run"][0]["selected_by"] is None
    assert cli("compare", "plain", "--runs-dir", tmp_path) == 0
    err = capsys.readouterr().err
    assert "best step by dev," in err and "schedule.select" not in err
