"""Metrics: the built-ins on known cases and a user metric imported from a module."""

import json
import sys

import dspy
import pytest

from jointcli.errors import InputError
from jointcli.metrics import build_metric, is_binary, last_number
from jointcli.recipe import Metric


def score(name, gold, pred, field="answer", **kw):
    metric = build_metric(Metric(name=name), field)
    pred = dspy.Prediction(**{field: pred}) if pred is not None else dspy.Prediction()
    value = metric(dspy.Example(**{field: gold}).with_inputs(), pred, **kw)
    assert isinstance(value, float) and value >= 0.0
    return value


@pytest.mark.parametrize(
    "gold, pred, expected",
    [
        ("positive", "positive", 1.0),
        ("positive", "  Positive. ", 1.0),
        ("positive", '"positive"', 1.0),
        ("Paris France", "paris   france!", 1.0),
        ("positive", "negative", 0.0),
        ("positive", "positive sentiment", 0.0),
        ("-5", "5", 0.0),
        ("-5", "(-5)", 1.0),
        ("0.5", ".5", 0.0),
    ],
)
def test_exact_match(gold, pred, expected):
    assert score("exact_match", gold, pred) == expected


def test_missing_prediction_field_scores_zero():
    for name in ("exact_match", "numeric", "f1"):
        assert score(name, "42", None) == 0.0
        metric = build_metric(Metric(name=name), "answer")
        assert metric(dspy.Example(answer="42"), None) == 0.0
        assert metric(dspy.Example(answer="42"), dspy.Prediction(answer=None), trace=object()) == 0.0


@pytest.mark.parametrize(
    "gold, pred, expected",
    [
        ("1234", "The answer is 1,234.", 1.0),
        ("5", "$5", 1.0),
        ("5", "5.0", 1.0),
        ("18", "9 * 2 = 18 dollars", 1.0),
        ("18", "18 eggs, then 9", 0.0),  # last number counts
        ("-7", "it drops to -7", 1.0),
        ("-7", "it drops to 7", 0.0),
        ("1450000", "$1,450,000", 1.0),
        ("0.5", "0.50", 1.0),
        ("3", "no number here", 0.0),
        ("3", "", 0.0),
        ("#### 42", "42", 1.0),
    ],
)
def test_numeric(gold, pred, expected):
    assert score("numeric", gold, pred) == expected


def test_numeric_non_string_values():
    metric = build_metric(Metric(name="numeric"), "answer")
    assert metric(dspy.Example(answer=12), dspy.Prediction(answer="12")) == 1.0
    assert last_number("1,2,3") == 3.0 and last_number("3-5") == 5.0 and last_number(True) is None


def test_f1():
    assert score("f1", "the cat sat", "The cat sat.") == 1.0
    # gold [cat, sat, on, mat], pred [cat, sat]: precision 1, recall 1/2 -> F1 2/3
    assert score("f1", "The cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert score("f1", "dog", "cat") == 0.0
    assert score("f1", "the", "a") == 1.0  # both empty after normalization


def test_metric_field_overrides_label_field():
    metric = build_metric(Metric(name="exact_match", field="b"), "a")
    assert metric(dspy.Example(a="x", b="y"), dspy.Prediction(a="nope", b="Y")) == 1.0


def test_accepts_gepa_arguments():
    metric = build_metric(Metric(name="exact_match"), "answer")
    assert metric(dspy.Example(answer="x"), dspy.Prediction(answer="x"), None, "predict", None) == 1.0


def test_is_binary():
    assert is_binary("exact_match") and is_binary("numeric")
    assert not is_binary("f1") and not is_binary("mymod:score")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_metrics_jt.py").write_text(
        "import dspy\n"
        "def length_ok(example, pred, trace=None):\n"
        "    return len(pred.answer) <= len(example.answer)\n"
        "def two_args(example, pred):\n"
        "    return 0.25\n"
        "def gepa(gold, pred, trace=None, pred_name=None, pred_trace=None):\n"
        "    return dspy.Prediction(score=0.5 if pred_name else 0.75, feedback='fine')\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_metrics_jt"
    sys.modules.pop("my_metrics_jt", None)


def test_user_metric(user_module):
    metric = build_metric(Metric(name=f"{user_module}:length_ok"), "answer")
    assert metric(dspy.Example(answer="abc"), dspy.Prediction(answer="ab")) == 1.0
    assert metric(dspy.Example(answer="abc"), dspy.Prediction(answer="abcd")) == 0.0
    assert callable(metric.user_function)
    assert build_metric(Metric(name=f"{user_module}:two_args"), "answer")(None, None) == 0.25
    gepa = build_metric(Metric(name=f"{user_module}:gepa"), "answer")
    assert gepa(None, None) == 0.75 and gepa(None, None, None, "p", []) == 0.5


def test_user_metric_from_cwd(tmp_path, monkeypatch):
    (tmp_path / "cwd_metric_jt.py").write_text("def m(example, pred, trace=None):\n    return 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert build_metric(Metric(name="cwd_metric_jt:m"), "answer")(None, None) == 1.0
    finally:
        sys.modules.pop("cwd_metric_jt", None)


@pytest.mark.parametrize(
    "ref, reason",
    [
        ("no_such_module_jt:f", "ModuleNotFoundError"),
        ("my_metrics_jt:missing", "AttributeError"),
        ("my_metrics_jt:NOT_CALLABLE", "not callable"),
    ],
)
def test_bad_reference(user_module, ref, reason):
    with pytest.raises(InputError) as err:
        build_metric(Metric(name=ref), "answer")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"metric.name: cannot import '{ref}': ") and reason in msg


# raises on every second call: half of an evaluation's examples, whichever thread scores them
HALF_RAISING_METRIC = """
import itertools, threading
_calls, _lock = itertools.count(), threading.Lock()
def score(example, pred, trace=None):
    with _lock:
        n = next(_calls)
    if n % 2:
        raise ValueError(f"metric bug on call {n}")
    return 1.0
"""


@pytest.fixture
def half_metric(tmp_path, monkeypatch):
    """Overrides of recipes/sst2.yaml for a tiny run scored by HALF_RAISING_METRIC (imported from tmp_path)."""
    (tmp_path / "half_metric_jt.py").write_text(HALF_RAISING_METRIC)
    monkeypatch.syspath_prepend(str(tmp_path))
    from .conftest import tiny

    # adapter: text reads the whole answer as the output: every example reaches the metric
    yield [*tiny(4, 4, 2), "program.modules.classify.adapter=text", "metric.name=half_metric_jt:score"]
    sys.modules.pop("half_metric_jt", None)


@pytest.mark.model
def test_a_metric_that_raises_on_half_the_examples_fails_the_step(tmp_path, half_metric, capsys):
    from .conftest import RECIPES, cli, manifest

    runs = tmp_path / "runs"
    assert cli("eval", RECIPES / "sst2.yaml", *half_metric, "--runs-dir", runs) == 1
    err = capsys.readouterr().err
    assert (
        "error: dev eval: 2 of 4 examples raised an error (50%, more than runtime.max_error_rate 0.1); "
        "the first, in the metric: ValueError: metric bug on call" in err
    ), err
    assert err.rstrip().endswith("all in 00-baseline/failures-dev.jsonl"), err
    (step,) = manifest(runs / "sst2")["steps"]
    assert step["status"] == "failed" and step["info"]["dev_errors"] == 2 and "dev" not in step["scores"]
    failures = (runs / "sst2" / "00-baseline" / "failures-dev.jsonl").read_text().splitlines()
    assert len(failures) == 2 and all('"in": "metric"' in line for line in failures)

    assert cli("status", runs / "sst2") == 0
    (row,) = [line for line in capsys.readouterr().err.splitlines() if "00-baseline" in line]
    assert "failed" in row and "2 errors; dev eval: 2 of 4 examples raised" in row

    # a rate the recipe allows: the step is done, and status still shows the count
    allowed = [*half_metric, "runtime.max_error_rate=0.5", "--runs-dir", runs, "--name", "tolerant"]
    assert cli("eval", RECIPES / "sst2.yaml", *allowed) == 0
    capsys.readouterr()
    assert cli("status", runs / "tolerant") == 0
    (row,) = [line for line in capsys.readouterr().err.splitlines() if "00-baseline" in line and "done" in line]
    assert "2 errors" in row


@pytest.mark.model
def test_a_metric_that_raises_on_half_the_training_examples_fails_the_bootstrap(tmp_path, half_metric, capsys):
    """The traces a weight step trains on are held to runtime.max_error_rate as an evaluation is."""
    from .conftest import RECIPES, cli, manifest

    runs = tmp_path / "runs"
    assert cli("bootstrap", RECIPES / "sst2.yaml", *half_metric, "--runs-dir", runs) == 1
    err = capsys.readouterr().err
    assert (
        "bootstrapping traces: 2 of 4 training examples raised an error (50%, more than "
        "runtime.max_error_rate 0.1); the first, in the metric: ValueError: metric bug on call" in err
    ), err
    assert err.rstrip().endswith("all in 00-bootstrap/failures.jsonl"), err
    (step,) = manifest(runs / "sst2")["steps"]
    assert step["status"] == "failed"
    failures = (runs / "sst2" / "00-bootstrap" / "failures.jsonl").read_text().splitlines()
    assert len(failures) == 2 and all('"in": "metric"' in line for line in failures)

    allowed = [*half_metric, "runtime.max_error_rate=0.5", "--runs-dir", runs, "--name", "tolerant"]
    assert cli("bootstrap", RECIPES / "sst2.yaml", *allowed) == 0
    counts = json.loads((runs / "tolerant" / "00-bootstrap" / "traces.json").read_text())
    assert counts["errors"] == 2 and counts["parse_failures"] == 0 and counts["run"] == 4
