"""stdout carries only what a command promises (its --json document, or nothing); whatever libraries
and a user's code print while the command works goes to stderr. Run as a user's script would: in a
fresh process, against a local stand-in for a chat API (no model loads, so this is the fast tier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .chat_server import ChatServer
from .conftest import RECIPES, run_cli, tiny

# a metric that prints, as users' metrics do while they are written
PRINTING_METRIC = """
def score(example, pred, trace=None):
    print("metric saw", getattr(pred, "sentiment", None))
    return float(getattr(pred, "sentiment", None) == example.sentiment)
"""


@pytest.fixture
def remote_recipe(tmp_path: Path):
    """run_cli's keywords for sst2 on a LiteLLM model served locally, scored by a metric that prints:
    (overrides, {cwd, env})."""
    (tmp_path / "printing.py").write_text(PRINTING_METRIC)
    with ChatServer({"sentiment": "positive"}) as server:
        overrides = [
            *tiny(4, 2, 2),
            "runtime.cache=false",
            "metric.name=printing:score",
            "program.modules.classify.model=remote",
            *server.model_overrides("remote", "STUB_KEY"),
        ]
        yield overrides, {"cwd": tmp_path, "env": {"STUB_KEY": "stub"}, "timeout": 120}


def test_a_step_command_prints_nothing_on_stdout(remote_recipe):
    overrides, where = remote_recipe
    result = run_cli("optimize-prompts", str(RECIPES / "sst2.yaml"), *overrides, **where)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    # what DSPy's BootstrapFewShot and the metric printed is in the log, not lost
    assert "Bootstrapped" in result.stderr and "metric saw positive" in result.stderr


def test_json_output_is_exactly_one_document(remote_recipe):
    overrides, where = remote_recipe
    # sweep runs steps (a prompt step, evaluations on dev and test) and then prints its report
    result = run_cli("sweep", str(RECIPES / "sst2.yaml"), *overrides, "--strategies", "p", "--json", **where)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # json.loads refuses anything before or after the document
    assert [run["strategy"] for run in report["runs"]] == ["p"]
    assert "metric saw positive" in result.stderr

    status = run_cli("status", str(where["cwd"] / "runs" / "sst2-sweep" / "p" / "seed-0"), "--json", **where)
    assert status.returncode == 0 and json.loads(status.stdout)["finished"] is True
