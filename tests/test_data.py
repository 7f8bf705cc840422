"""Data loading and splitting, on the real built-in data sets (offline wheels) and small files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from jointcli import data as D
from jointcli.errors import InputError
from jointcli.recipe import Data, Split

ROOT = Path(__file__).resolve().parents[1]


def make(source, inputs, labels, train=10, dev=5, test=7, seed=0):
    return Data(
        source=str(source), inputs=inputs, labels=labels, split=Split(train=train, dev=dev, test=test, seed=seed)
    )


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- built-ins
def test_sst2_rows():
    rows = D.load_rows("builtin:sst2")
    assert len(rows) == 872
    assert set(rows[0]) == {"sentence", "sentiment"}
    assert {r["sentiment"] for r in rows} == {"positive", "negative"}
    assert sum(r["sentiment"] == "positive" for r in rows) == 444
    assert rows[0] == {"sentence": "it 's a charming and often affecting journey .", "sentiment": "positive"}


def test_iris_rows():
    rows = D.load_rows("builtin:iris")
    assert len(rows) == 150
    assert set(rows[0]) == {"sepal_length", "sepal_width", "petal_length", "petal_width", "species"}
    assert all(isinstance(rows[0][k], float) for k in ("sepal_length", "petal_width"))
    assert {r["species"] for r in rows} == {"setosa", "versicolor", "virginica"}


def test_gsm8k_rows():
    rows = D.load_rows("builtin:gsm8k")
    assert len(rows) == 1319
    assert set(rows[0]) == {"question", "answer", "reasoning"}
    assert len({r["question"] for r in rows}) == 1319
    assert all(re.fullmatch(r"-?\d+", r["answer"]) for r in rows)  # "1,450,000" -> "1450000"
    first = rows[0]
    assert first["question"].startswith("Janet")
    assert first["answer"] == "18"
    assert "####" not in first["reasoning"] and "<<" not in first["reasoning"]
    assert "9 * 2 = $18" in first["reasoning"]


@pytest.mark.parametrize(
    "name, n, fields, counts",
    [
        ("boolq", 3270, ["passage", "question", "answer"], {"yes": 2033, "no": 1237}),
        ("rte", 277, ["sentence1", "sentence2", "label"], {"entailment": 146, "not_entailment": 131}),
        ("mrpc", 408, ["sentence1", "sentence2", "label"], {"equivalent": 279, "not_equivalent": 129}),
    ],
)
def test_the_tasks_beyond_sst2_have_words_for_labels(name, n, fields, counts):
    source = f"builtin:{name}"
    rows = D.load_rows(source)
    assert len(rows) == n and list(rows[0]) == fields
    inputs, labels = D.BUILTIN_FIELDS[source]
    assert inputs + labels == [f for f in fields if f in inputs + labels] and set(inputs + labels) == set(fields)
    values = [r[labels[0]] for r in rows]
    assert {v: values.count(v) for v in counts} == counts and set(values) == set(counts)
    assert all(r[f] == r[f].strip() and r[f] for r in rows for f in inputs)
    splits = D.load_splits(make(source, inputs, labels, train=8, dev=4, test=4))
    assert len(splits.train) == 8 and set(splits.train[0].inputs().keys()) == set(inputs)


def test_every_builtin_names_its_fields():
    assert set(D.BUILTIN_FIELDS) == set(D._BUILTINS)
    for source, (inputs, labels) in D.BUILTIN_FIELDS.items():
        assert set(inputs + labels) <= set(D.load_rows(source)[0]), source


def test_builtin_rows_are_copies():
    rows = D.load_rows("builtin:iris")
    rows[0]["species"] = "changed"
    rows.pop()
    again = D.load_rows("builtin:iris")
    assert len(again) == 150 and again[0]["species"] == "setosa"


def test_unknown_builtin():
    with pytest.raises(InputError, match="unknown built-in"):
        D.load_rows("builtin:nope")


# ---------------------------------------------------------------- splits
def test_splits_sizes_disjoint_deterministic():
    cfg = make("builtin:sst2", ["sentence"], ["sentiment"], train=20, dev=30, test=40)
    a, b = D.load_splits(cfg), D.load_splits(cfg)
    assert (len(a.train), len(a.dev), len(a.test)) == (20, 30, 40)
    ids = a.indices["train"] + a.indices["dev"] + a.indices["test"]
    assert len(set(ids)) == 90
    assert [x.toDict() for x in a.test] == [x.toDict() for x in b.test]
    assert a.fingerprint == b.fingerprint and re.fullmatch(r"[0-9a-f]{64}", a.fingerprint)
    ex = a.train[0]
    assert isinstance(ex, dspy.Example)
    assert set(ex.keys()) == {"sentence", "sentiment"}
    assert set(ex.inputs().keys()) == {"sentence"} and set(ex.labels().keys()) == {"sentiment"}


def test_held_out_is_the_rest_of_the_source():
    """data.held_out: the examples the split never uses (bench/held_out.py scores programs on them),
    disjoint from train, dev and test, and together with them the whole source."""
    cfg = make("builtin:sst2", ["sentence"], ["sentiment"], train=120, dev=100, test=100)  # recipes/sst2.yaml's
    splits, rest = D.load_splits(cfg), D.held_out(cfg)
    assert len(rest) == 872 - 320
    used = [x.sentence for x in splits.train + splits.dev + splits.test]
    assert not set(used) & {x.sentence for x in rest}
    assert sorted(used + [x.sentence for x in rest]) == sorted(r["sentence"] for r in D.load_rows("builtin:sst2"))
    assert set(rest[0].inputs().keys()) == {"sentence"} and set(rest[0].labels().keys()) == {"sentiment"}
    assert [x.toDict() for x in D.held_out(cfg, limit=5)] == [x.toDict() for x in rest[:5]]
    whole = make("builtin:iris", ["petal_length"], ["species"], train=50, dev=50, test=50)
    assert D.held_out(whole) == []


def test_splits_only_selected_fields():
    s = D.load_splits(make("builtin:gsm8k", ["question"], ["answer"], train=3, dev=2, test=2))
    assert set(s.dev[0].keys()) == {"question", "answer"}


def test_fingerprint_changes_with_seed_and_counts():
    base = D.load_splits(make("builtin:iris", ["petal_length"], ["species"])).fingerprint
    assert D.load_splits(make("builtin:iris", ["petal_length"], ["species"], seed=1)).fingerprint != base
    assert D.load_splits(make("builtin:iris", ["petal_length"], ["species"], test=8)).fingerprint != base
    assert D.load_splits(make("builtin:iris", ["petal_width"], ["species"])).fingerprint != base


def test_splits_stable_across_processes():
    code = (
        "from jointcli.data import load_splits; from jointcli.recipe import Data, Split;"
        "s = load_splits(Data(source='builtin:iris', inputs=['sepal_length'], labels=['species'],"
        " split=Split(train=10, dev=5, test=7, seed=3)));"
        "print(s.fingerprint, s.indices['test'])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    s = D.load_splits(make("builtin:iris", ["sepal_length"], ["species"], seed=3))
    assert out.stdout.strip() == f"{s.fingerprint} {s.indices['test']}"


def test_zero_train_allowed():
    s = D.load_splits(make("builtin:iris", ["sepal_length"], ["species"], train=0))
    assert s.train == [] and len(s.dev) == 5


def test_split_too_large():
    with pytest.raises(InputError) as err:
        D.load_splits(make("builtin:iris", ["sepal_length"], ["species"], train=100, dev=40, test=20))
    msg = one_line(err)
    assert "train=100" in msg and "160" in msg and "150" in msg


def test_missing_field():
    with pytest.raises(InputError) as err:
        D.load_splits(make("builtin:sst2", ["text"], ["sentiment"]))
    msg = one_line(err)
    assert msg == "builtin:sst2: field 'text' missing (fields are: sentence, sentiment)"


# ---------------------------------------------------------------- files
def test_jsonl_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": i, "extra": True}) + "\n" for i in range(30)) + "\n")
    rows = D.load_rows(str(path))
    assert len(rows) == 30 and rows[3] == {"q": "question 3", "a": 3, "extra": True}
    s = D.load_splits(make(path, ["q"], ["a"]))
    assert (len(s.train), len(s.dev), len(s.test)) == (10, 5, 7)
    assert set(s.test[0].keys()) == {"q", "a"} and isinstance(s.test[0].a, int)


def test_csv_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f'"row, {i}",{i % 2}\n' for i in range(25)))
    rows = D.load_rows(str(path))
    assert len(rows) == 25 and rows[1] == {"text": "row, 1", "label": "1"}  # csv values stay strings
    s = D.load_splits(make(path, ["text"], ["label"]))
    assert len(s.test) == 7 and s.fingerprint == D.load_splits(make(path, ["text"], ["label"])).fingerprint


def test_fingerprint_sees_file_edits(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"x": str(i), "y": "a"}) + "\n" for i in range(30)))
    before = D.load_splits(make(path, ["x"], ["y"])).fingerprint
    path.write_text("".join(json.dumps({"x": str(i), "y": "b"}) + "\n" for i in range(30)))
    assert D.load_splits(make(path, ["x"], ["y"])).fingerprint != before


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"x": 1}\n{"x": 2}\n{"x": 3,\n')
    with pytest.raises(InputError) as err:
        D.load_rows(str(path))
    msg = one_line(err)
    assert str(path) in msg and "line 3" in msg and "malformed JSON" in msg


def test_jsonl_line_not_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"x": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match="line 2: expected a JSON object"):
        D.load_rows(str(path))


def test_csv_wrong_number_of_values(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(InputError, match=r"line 3: 3 values, the header has 2"):
        D.load_rows(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such data file"):
        D.load_rows(str(tmp_path / "nope.jsonl"))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert D.load_rows(str(path)) == []
    with pytest.raises(InputError, match="no rows"):
        D.load_splits(make(path, ["x"], ["y"]))


def test_field_missing_in_a_later_row(tmp_path):
    path = tmp_path / "ragged.jsonl"
    path.write_text('{"x": 1, "y": 2}\n{"x": 3}\n')
    with pytest.raises(InputError, match=r"row 2 has no field 'y'"):
        D.load_splits(make(path, ["x"], ["y"], train=0, dev=1, test=1))
