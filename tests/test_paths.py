"""Paths of the weight step and of the schedule that other tests do not take, end to end on the real
model: traces from a teacher, `finetune --traces FILE`, `adapters: shared`, `schedule.patience`.
Tiny on purpose: the teacher is a local stand-in for a chat API (tests/chat_server.py), so only the
student trains and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .chat_server import ChatServer, chat_answer
from .conftest import RECIPES, cli, manifest, tiny
from .test_secrets import pickled_files

pytestmark = pytest.mark.model

TEACHER_SAYS = {"sentiment": "positive", "opinion": "a warm and funny film"}


# sst2 with a second module that explains the first one's answer, both on the small model
TWO_MODULES = (
    "program.modules=[{name: classify, signature: 'sentence -> sentiment', model: small}, "
    "{name: explain, signature: 'sentence, sentiment -> opinion', model: small}]"
)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_teacher_traces_from_a_file_train_one_shared_adapter(runs, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "stub")
    recipe = RECIPES / "sst2.yaml"
    with ChatServer(TEACHER_SAYS) as teacher:
        args = [
            *tiny(1, 1, 1),
            TWO_MODULES,
            *teacher.model_overrides("teacher", "TEACHER_KEY"),
            "optimizers.w.traces.source=teacher",
            "optimizers.w.traces.teacher=teacher",
            "optimizers.w.traces.threshold=0.0",
            "optimizers.w.adapters=shared",
            "--runs-dir",
            runs,
        ]
        assert cli("bootstrap", recipe, *args, "--name", "teacher") == 0
        traces = runs / "teacher" / "00-bootstrap" / "traces.jsonl"
        # the program ran on the teacher: each module asked it once, and it answered
        asked = len(teacher.requests)
        assert asked == 2  # one example, two modules
        rows = _rows(traces)
        assert sorted(r["module"] for r in rows) == ["classify", "explain"]
        assert {r["source"] for r in rows} == {"teacher"}
        for row in rows:
            wanted = {"classify": ["sentiment"], "explain": ["opinion"]}[row["module"]]
            assert row["messages"][-1]["content"].strip() == chat_answer({f: TEACHER_SAYS[f] for f in wanted})

        # another run fine-tunes on that file: it asks the teacher nothing
        assert cli("finetune", recipe, *args, "--name", "student", "--traces", traces) == 0
        assert len(teacher.requests) == asked
    (step,) = manifest(runs / "student")["steps"]
    assert step["status"] == "done" and step["info"]["traces"] == {"rows": 2, "from": str(traces)}
    assert (runs / "student" / "00-w" / "traces.jsonl").read_bytes() == traces.read_bytes()
    # shared: one adapter for the base model, trained on both modules' rows, used by both modules
    assert set(step["info"]["training"]) == {"small"} and step["info"]["training"]["small"]["rows"] == 2
    state = json.loads((runs / "student" / "00-w" / "state.json").read_text())
    assert {m: s["adapter"] for m, s in state["modules"].items()} == {
        "classify": "00-w/adapters/small",
        "explain": "00-w/adapters/small",
    }
    assert [p.name for p in (runs / "student" / "00-w" / "adapters").glob("[!.]*")] == ["small"]
    assert "dev" in step["scores"]
    assert pickled_files(runs) == []  # adapters are safetensors; the training checkpoints are gone


def test_patience_stops_a_run_that_stops_improving(runs):
    # LabeledFewShot with k=0 leaves the program as it is: the same prompts, the same dev score (from
    # DSPy's cache), so with patience 1 the schedule stops after its first step
    args = [
        *tiny(),
        "schedule.strategy=p -> p -> p",
        "schedule.patience=1",
        "optimizers.p.optimizer=LabeledFewShot",
        "optimizers.p.args={k: 0}",
        "--runs-dir",
        runs,
    ]
    assert cli("joint", RECIPES / "sst2.yaml", *args) == 0
    run = manifest(runs / "sst2")
    baseline, prompt = run["steps"]
    assert [baseline["kind"], prompt["kind"]] == ["baseline", "p"]
    assert prompt["scores"]["dev"] == baseline["scores"]["dev"]
    assert run["stopped_early"] and run["finished"] and run["best"] == "00-baseline"
    assert "test" in baseline["scores"]
    # run again: it has stopped, nothing more runs
    assert cli("joint", RECIPES / "sst2.yaml", *args) == 0
    assert manifest(runs / "sst2")["steps"] == run["steps"]
