"""`jointopt init`: a recipe for a data file or a built-in that validates as written, fields that are
asked for when the data does not make them clear, no file overwritten without --force."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from jointcli.checks import check_recipe
from jointcli.data import load_rows
from jointcli.init_recipe import choose_fields, max_tokens, split_sizes, train_steps
from jointcli.recipe import load_recipe
from jointcli.recipe.optimizers import MIN_STEPS

from .conftest import cli


def reviews(path: Path, n: int = 60, extra: dict | None = None) -> Path:
    """`n` sst2 sentences as a .jsonl of review/label with the terse labels pos/neg (and `extra` fields)."""
    rows = load_rows("builtin:sst2")[:n]
    with path.open("w") as f:
        for i, r in enumerate(rows):
            row = {"review": r["sentence"], "label": r["sentiment"][:3], **{k: v(i) for k, v in (extra or {}).items()}}
            f.write(json.dumps(row) + "\n")
    return path


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_file_gives_a_recipe_that_validates_and_names_its_labels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reviews(tmp_path / "reviews.jsonl", n=60)
    assert cli("init", "reviews.jsonl") == 0
    recipe = load_recipe(tmp_path / "reviews.yaml")
    check_recipe(recipe)  # what `jointopt validate` checks: the data, the program, the optimizers
    assert recipe.name == "reviews"
    assert (recipe.data.inputs, recipe.data.labels) == (["review"], ["label"])
    assert (recipe.data.split.train, recipe.data.split.dev, recipe.data.split.test) == (30, 15, 15)
    assert recipe.metric.name == "exact_match"
    module = recipe.program.modules[0]
    assert module.signature == "review -> label" and "neg or pos" in module.instructions  # most rows first
    w = recipe.optimizers["w"]
    assert w.train.steps == MIN_STEPS and w.train.epochs is None  # 30 rows: 4 steps an epoch, the floor
    text = (tmp_path / "reviews.yaml").read_text()
    assert text.startswith("# reviews: review -> label") and "jointopt joint reviews.yaml" in text


def test_it_refuses_to_overwrite_without_force(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    reviews(tmp_path / "reviews.jsonl")
    (tmp_path / "mine.yaml").write_text("my own recipe\n")
    assert cli("init", "reviews.jsonl", "--out", "mine.yaml") == 2
    line = error_line(capsys)
    assert "mine.yaml exists" in line and "--force" in line
    assert (tmp_path / "mine.yaml").read_text() == "my own recipe\n"
    assert cli("init", "reviews.jsonl", "--out", "mine.yaml", "--force", "--name", "mine") == 0
    assert load_recipe(tmp_path / "mine.yaml").name == "mine"


@pytest.mark.parametrize(
    "extra, flags, expected",
    [
        ({"source": lambda i: "ab"[i % 2]}, [], "several fields are label-like (label, source)"),
        ({"id": lambda i: i}, [], "field 'id' looks like an identifier"),
        ({"n": lambda i: 1000 + i}, [], "field 'n' looks like an identifier (every value a different number)"),
        ({"label": lambda i: f"answer {i}"}, [], "no field is label-like; name it: --labels FIELD"),
        ({}, ["--labels", "nope"], "--labels: reviews.jsonl has no field 'nope'"),
        ({}, ["--inputs", "label", "--labels", "label"], "cannot be both"),
    ],
)
def test_fields_the_data_does_not_make_clear_are_asked_for(tmp_path, monkeypatch, capsys, extra, flags, expected):
    monkeypatch.chdir(tmp_path)
    reviews(tmp_path / "reviews.jsonl", extra=extra)
    assert cli("init", "reviews.jsonl", *flags) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "reviews.yaml").exists()


def test_the_flags_settle_what_the_data_leaves_open(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reviews(tmp_path / "reviews.jsonl", extra={"id": lambda i: i, "source": lambda i: "ab"[i % 2]})
    assert cli("init", "reviews.jsonl", "--inputs", "review", "--labels", "label", "--out", "r.yaml") == 0
    recipe = load_recipe(tmp_path / "r.yaml")
    assert (recipe.data.inputs, recipe.data.labels) == (["review"], ["label"])


def test_a_csv_file_and_numeric_and_free_text_answers(tmp_path):
    path = tmp_path / "sums.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer", "note"])
        for i in range(40):
            writer.writerow([f"what is {i} + {i}?", str(2 * i), f"twice {i}, written out as words {i}"])
    rows = load_rows(str(path))
    numeric = choose_fields(str(path), rows, inputs=["question"], labels=["answer"])
    assert (numeric.kind, numeric.values) == ("numeric", None)
    text = choose_fields(str(path), rows, inputs=["question"], labels=["note"])
    assert text.kind == "text"


@pytest.mark.parametrize("name", ["rte", "boolq", "mrpc"])
def test_the_builtin_tasks_give_recipes_that_validate(tmp_path, name):
    out = tmp_path / f"{name}.yaml"
    assert cli("init", f"builtin:{name}", "--out", out) == 0
    recipe = load_recipe(out)
    check_recipe(recipe)
    words = {"rte": "entailment or not_entailment", "boolq": "yes or no", "mrpc": "equivalent or not_equivalent"}
    assert words[name] in recipe.program.modules[0].instructions
    assert recipe.data.split.train == 120
    # rows with 4 demos of BoolQ's passages: ~1,700 tokens, of RTE's sentence pairs ~1,200; MRPC's fit the default
    assert recipe.optimizers["w"].train.max_length == {"rte": 1536, "boolq": 2048, "mrpc": 1024}[name]


def test_the_numbers_it_derives():
    assert split_sizes(872) == (120, 100, 100)  # the quickstart's split
    assert split_sizes(277) == (120, 69, 69) and split_sizes(10) == (6, 2, 2)
    assert train_steps(60) == MIN_STEPS and train_steps(800) == 100
    tokens, _ = max_tokens("sentiment", "positive")
    assert 17 < tokens <= 32  # the answer is 17 tokens with its markers and the end (recipes/sst2.yaml)


def test_the_recipe_shown_in_the_docs_is_what_init_writes():
    from jointcli.init_recipe import make_recipe

    page = (Path(__file__).resolve().parents[1] / "docs" / "your-own-task.md").read_text()
    shown = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert shown == make_recipe("builtin:rte", None, None, None, "rte.yaml").text
