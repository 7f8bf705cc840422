"""`jointopt compare` and `jointopt sweep`: the statistics with known answers, and the command on real runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jointcli.files import write_json, write_jsonl
from jointcli.recipe import load_recipe
from jointcli.rundir import RunDir
from jointcli.stats import bootstrap_ci, mcnemar, paired_difference, pareto_front

from .conftest import RECIPES, cli, manifest, tiny

TINY = tiny(6, 4, 6, "optimizers.p.optimizer=LabeledFewShot", "optimizers.p.args={k: 2}")


# ---------------------------------------------------------------- statistics
def test_bootstrap_interval_of_a_constant_is_the_constant():
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0, 1.0)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_examples():
    rng = np.random.default_rng(1)
    small, large = rng.integers(0, 2, 40), rng.integers(0, 2, 400)
    mean, lo, hi = bootstrap_ci(small)
    assert lo < mean < hi and mean == pytest.approx(small.mean())
    _, lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < hi - lo
    # a 95% interval for a mean of 0/1 scores is about +-1.96 * sqrt(p(1-p)/n)
    p = large.mean()
    assert hi2 - lo2 == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / large.size), rel=0.15)


def test_identical_runs_differ_by_nothing_significant():
    scores = np.random.default_rng(2).integers(0, 2, 100)
    d = paired_difference(scores, scores, binary=True)
    assert d.delta == 0 and d.low <= 0 <= d.high
    assert (d.only_a, d.only_b, d.p_mcnemar) == (0, 0, 1.0) and not d.significant


def test_a_large_gap_is_significant_both_ways():
    a = np.ones(100)
    b = np.r_[np.ones(50), np.zeros(50)]
    d = paired_difference(a, b, binary=True)
    assert d.delta == pytest.approx(0.5) and d.low > 0.35 and d.significant
    assert (d.only_a, d.only_b) == (50, 0) and d.p_mcnemar < 1e-10
    reverse = paired_difference(b, a, binary=True)
    assert reverse.high < 0 and reverse.significant


def test_a_small_gap_on_few_examples_is_not_significant():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 0])
    b = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0])  # one example apart
    d = paired_difference(a, b, binary=True)
    assert d.delta == pytest.approx(0.1) and not d.significant and d.p_mcnemar == 1.0


def test_mcnemar_exact_p_value():
    # 9 discordant pairs, 8 to 1: two-sided exact binomial p = 2 * (1 + 9) / 2**9
    a = [1] * 8 + [0] + [1] * 5
    b = [0] * 8 + [1] + [1] * 5
    assert mcnemar(a, b) == (8, 1, pytest.approx(20 / 512))


def test_continuous_scores_get_no_mcnemar():
    d = paired_difference([0.5, 0.7, 0.9], [0.4, 0.7, 0.8])
    assert d.p_mcnemar is None and d.delta == pytest.approx(0.2 / 3)


def test_pareto_front_on_a_hand_made_set():
    points = [(0.80, 900), (0.70, 400), (0.60, 950), (0.70, 500), (0.90, 2000), (0.50, 100), (0.80, 900)]
    # (0.6, 950) is beaten by (0.7, 400); (0.7, 500) by (0.7, 400); the two (0.8, 900) tie, both stay
    assert pareto_front(points) == [5, 1, 0, 6, 4]
    assert pareto_front([]) == []


# ---------------------------------------------------------------- the command on real runs
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    """Two zero-shot runs of the same tiny recipe (baseline + test eval): identical programs."""
    runs = tmp_path_factory.mktemp("compare") / "runs"
    for name in ("a", "b"):
        assert (
            cli("joint", RECIPES / "sst2.yaml", *TINY, "schedule.strategy=none", "--name", name, "--runs-dir", runs)
            == 0
        )
    return runs


@pytest.mark.model
def test_compare_identical_runs_and_its_gates(two_runs, tmp_path, capsys):
    args = ["compare", "a", "b", "--runs-dir", two_runs]
    assert cli(*args, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    (pair,) = report["pairs"]
    assert pair["delta"] == 0 and not pair["significant"] and pair["n"] == 6
    assert [r["label"] for r in report["runs"]] == ["a", "b"] and report["runs"][0]["n_test"] == 6
    assert all(c["tokens"] > 0 for c in report["pareto"])  # cache hits still count their tokens

    # gates: identical runs are not significantly better, nor significantly worse
    assert cli(*args, "--require", "a > b") == 3
    assert "gate failed: a > b" in capsys.readouterr().err
    assert cli(*args, "--require", "a >= b", "--min-score", "0") == 0
    assert cli(*args, "--min-score", "b=1") == 3  # b scores below 1 on test
    assert cli(*args, "--require", "a > nobody") == 2  # a gate naming no run is bad input
    assert cli(*args, "--require", "a >> b") == 2

    plot = tmp_path / "plots" / "compare.png"
    assert cli(*args, "--plot", plot) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(plot).shape[:2][1] > 500


@pytest.mark.model
def test_compare_refuses_incomparable_runs(two_runs, capsys):
    assert (
        cli(
            "joint",
            RECIPES / "sst2.yaml",
            *TINY,
            "data.split.seed=1",
            "schedule.strategy=none",
            "--name",
            "other-split",
            "--runs-dir",
            two_runs,
        )
        == 0
    )
    capsys.readouterr()
    assert cli("compare", "a", "other-split", "--runs-dir", two_runs) == 2
    assert "different data splits" in capsys.readouterr().err
    assert cli("compare", "a", "missing", "--runs-dir", two_runs) == 2
    assert "no run directory" in capsys.readouterr().err


@pytest.mark.model
def test_sweep_runs_each_strategy_and_seed_sharing_prefixes(tmp_path, capsys):
    runs = tmp_path / "runs"
    args = [
        "sweep",
        RECIPES / "sst2.yaml",
        *TINY,
        "--strategies",
        "p, none",
        "--seeds",
        "0,1",
        "--runs-dir",
        runs,
        "--json",
    ]
    assert cli(*args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in report["runs"]] == ["zero-shot", "p"]  # shortest strategy first
    assert all(r["seeds"] == [0, 1] and r["test"] is not None for r in report["runs"])
    root = runs / "sst2-sweep"
    for seed in (0, 1):
        steps = manifest(root / "p" / f"seed-{seed}")["steps"]
        assert [s["kind"] for s in steps] == ["baseline", "p"]
        assert steps[0]["info"]["adopted_from"] == str(root / "zero-shot" / f"seed-{seed}")
        assert (root / "p" / f"seed-{seed}" / "00-baseline" / "predictions.jsonl").is_file()

    # run again: everything is done, nothing is recomputed
    before = {p: manifest(p)["steps"] for p in root.glob("*/seed-*")}
    assert cli(*args) == 0
    assert {p: manifest(p)["steps"] for p in root.glob("*/seed-*")} == before

    assert cli("sweep", RECIPES / "sst2.yaml", "--strategies", "p, p", "--runs-dir", runs) == 2
    assert cli("sweep", RECIPES / "sst2.yaml", "--strategies", "p -> x", "--runs-dir", runs) == 2


@pytest.mark.model
def test_a_run_that_failed_has_no_test_result(two_runs, capsys):
    # zero-shot, the tiny model passes no training example: from passing traces only, the w step fails (exit 1)
    assert (
        cli(
            "joint",
            RECIPES / "sst2.yaml",
            *TINY,
            "schedule.strategy=w",
            "optimizers.w.traces.source=program",
            "--name",
            "failed",
            "--runs-dir",
            two_runs,
        )
        == 1
    )
    capsys.readouterr()
    assert cli("compare", "a", "failed", "--runs-dir", two_runs, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    failed = report["runs"][1]
    assert failed["test"] is None and "no traces to fine-tune on" in failed["errors"][0]
    assert report["pairs"] == []  # nothing to pair with a run that has no result
    assert cli("compare", "a", "failed", "--runs-dir", two_runs, "--min-score", "failed=0") == 3


# ---------------------------------------------------------------- the same on hand-made run directories (no model)
def made_run(
    root: Path,
    name: str,
    test_scores: list[float],
    strategy: str = "none",
    seed: int = 0,
    kinds: tuple[str, ...] = ("baseline",),
    answers: list[tuple[str, str]] | None = None,
) -> RunDir:
    """A finished run directory written with RunDir, as `joint` writes one: every step scored on
    dev, the last one best and scored on test; `answers`: (gold, predicted) sentiment per example."""
    recipe = load_recipe(RECIPES / "sst2.yaml", [f"schedule.strategy={strategy}", f"seed={seed}"])
    run = RunDir.open(root, name, recipe)
    run.set_manifest_field("data_fingerprint", "one-split")
    rows = [
        {"index": i, "score": s, "tokens_in": 100, "tokens_out": 20, "seconds": 0.5, "cached_calls": 0}
        for i, s in enumerate(test_scores)
    ]
    for row, (gold, predicted) in zip(rows, answers or []):
        row.update(gold={"sentiment": gold}, prediction={"sentiment": predicted})
    mean = sum(test_scores) / len(test_scores)
    for kind in kinds:
        step = run.begin(kind)
        step.info["optimizer"] = None if kind == "baseline" else kind
        write_jsonl(run.step_dir(step) / "predictions.jsonl", rows)
        step.scores["dev"] = mean
        run.finish(step, 1.0)
    write_jsonl(run.step_dir(step) / "predictions-test.jsonl", rows)
    step.scores["test"] = mean
    run.update(step)
    run.set_manifest_field("best", step.folder)
    run.set_manifest_field("finished", True)
    run.unlock()
    return run


def test_compare_shows_the_majority_class_and_warns_of_a_collapsed_program(tmp_path, capsys):
    gold = ["positive"] * 24 + ["negative"] * 16
    made_run(tmp_path, "constant", [1.0] * 24 + [0.0] * 16, answers=[(g, "Positive.") for g in gold])
    made_run(
        tmp_path,
        "reader",
        [1.0] * 36 + [0.0] * 4,
        answers=[(g, g if i < 36 else "neutral") for i, g in enumerate(gold)],
    )
    assert cli("compare", "constant", "reader", "--runs-dir", tmp_path, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["majority"] == {"label": "positive", "test": 0.6, "n": 40}
    constant, reader = report["runs"]
    assert constant["answers"] == {"positive": 40}
    assert constant["warnings"][0] == "answers 'positive' to every example it answers"
    assert "within the 95% interval" in constant["warnings"][1] and "'positive' (0.600)" in constant["warnings"][1]
    assert reader["warnings"] == [] and reader["answers"] == {"positive": 24, "negative": 12, "neutral": 4}
    assert cli("compare", "constant", "reader", "--runs-dir", tmp_path) == 0
    err = capsys.readouterr().err
    assert "majority class" in err and "always 'positive'" in err and "warning: constant: answers 'positive'" in err


def test_gates_on_hand_made_runs(tmp_path, capsys):
    made_run(tmp_path, "good", [1.0] * 40)
    made_run(tmp_path, "bad", [1.0] * 10 + [0.0] * 30)
    args = ["compare", "good", "bad", "--runs-dir", tmp_path]
    assert cli(*args, "--json") == 0
    (pair,) = json.loads(capsys.readouterr().out)["pairs"]
    assert pair["significant"] and pair["n"] == 40
    assert cli(*args, "--require", "good > bad", "--require", "good >= bad") == 0
    assert cli(*args, "--require", "bad > good") == 3
    assert "gate failed: bad > good" in capsys.readouterr().err
    assert cli(*args, "--require", "bad >= good") == 3  # significantly worse
    assert cli(*args, "--min-score", "0.5") == 3
    assert "bad scored 0.250 on test" in capsys.readouterr().err
    assert cli(*args, "--min-score", "good=0.99") == 0
    assert cli(*args, "--min-score", "x=") == 2 and cli(*args, "--require", "good >> bad") == 2


def test_sweep_adopts_the_finished_prefix_of_a_sibling(tmp_path):
    from types import SimpleNamespace

    from jointcli.sweep import adopt_prefix

    donor = made_run(tmp_path / "p", "seed-0", [1.0, 0.0], strategy="p", kinds=("baseline", "p"))
    other_seed = made_run(tmp_path / "p", "seed-1", [1.0, 0.0], strategy="p", seed=1, kinds=("baseline", "p"))
    recipe = load_recipe(RECIPES / "sst2.yaml", ["schedule.strategy=p -> w"])
    run = RunDir.open(tmp_path / "p-w", "seed-0", recipe)
    try:
        assert adopt_prefix(SimpleNamespace(run=run, recipe=recipe), [other_seed, donor]) == 2
        steps = run.steps()
        assert [s.kind for s in steps] == ["baseline", "p"]
        assert all(s.info["adopted_from"] == str(donor.path) for s in steps)
        assert (run.step_dir(steps[1]) / "predictions.jsonl").is_file()
        # a run that has steps adopts nothing
        assert adopt_prefix(SimpleNamespace(run=run, recipe=recipe), [donor]) == 0
    finally:
        run.unlock()


def test_compare_and_status_show_each_steps_errors_beside_its_parse_failures(tmp_path, capsys):
    run = made_run(tmp_path, "noisy", [1.0] * 8, kinds=("baseline", "eval"))
    baseline, prompt = run.steps()
    # as record_eval writes them: examples that raised (errors) and answers that did not parse
    baseline.info.update(dev_n=8, dev_errors=1, dev_parse_failures=2)
    baseline.seconds, baseline.tokens = 19.508, {"in": 12345, "out": 678}
    # a manifest that does not record errors: its eval.json does
    prompt.info.update(dev_n=8, dev_parse_failures=3, test_n=8, test_errors=0, test_parse_failures=1)
    write_json(run.step_dir(prompt) / "eval.json", {"split": "dev", "errors": 1})
    write_json(run.step_dir(prompt) / "eval-test.json", {"split": "test"})
    write_json(run.step_dir(baseline) / "eval.json", {"split": "dev"})
    for step in (baseline, prompt):
        run.update(step)
    made_run(tmp_path, "clean", [1.0] * 8)

    assert cli("compare", "noisy", "clean", "--runs-dir", tmp_path, "--json") == 0
    noisy, clean = (r["per_run"][0] for r in json.loads(capsys.readouterr().out)["runs"])
    assert noisy["failures"] == {
        "00-baseline": {"dev": {"errors": 1, "parse_failures": 2}},
        "01-eval": {"dev": {"errors": 1, "parse_failures": 3}, "test": {"errors": 0, "parse_failures": 1}},
    }
    assert clean["failures"] == {}
    assert cli("compare", "noisy", "clean", "--runs-dir", tmp_path) == 0
    assert (
        "warning: noisy failed examples by step: 00-baseline (1 error, 2 parse failures), "
        "01-eval (1 error, 3 parse failures; test: 1 parse failure)\n" in capsys.readouterr().err
    )

    assert cli("status", run.path) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().err.splitlines() if "│ 0" in line}
    assert "19.5 │ 12,345/678" in rows["00-baseline"] and "1 error, 2 parse failures" in rows["00-baseline"]
    assert "1 error, 3 parse failures; test: 1 parse failure" in rows["01-eval"]
