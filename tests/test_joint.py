"""`jointopt joint`: the strategy grammar, best/early stopping, and runs that survive interruption."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jointcli.errors import InputError
from jointcli.failpoints import VARIABLE
from jointcli.rundir import Step
from jointcli.schedule import _stalled
from jointcli.selection import best_step
from jointcli.strategy import parse_strategy

from .conftest import RECIPES, ROOT, cli, manifest, run_cli, tiny

OPTIMIZERS = {"p": object(), "w": object(), "p2": object()}

# float32: the same answers in this process and in a child, however requests are batched; 2 dev and
# 2 test examples, and 4 rows in steps of 2: a weight step of two optimizer steps
TINY_JOINT = tiny(
    4,
    2,
    2,
    "models.small.dtype=float32",
    "optimizers.p.optimizer=LabeledFewShot",
    "optimizers.p.args={k: 1}",
    "optimizers.w.traces.source=labels",
    "optimizers.w.train.epochs=1",
    "optimizers.w.train.batch_size=2",
    "schedule.strategy=p -> w",
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("p -> w -> p", ["p", "w", "p"]),
        ("p->w", ["p", "w"]),
        ("  w  ->p2 ", ["w", "p2"]),
        ("p", ["p"]),
        ("none", []),
    ],
)
def test_strategy_grammar(text, expected):
    assert parse_strategy(text, OPTIMIZERS) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("p -> x", "unknown step 'x'"),
        ("p -> -> w", "empty step"),
        ("p w", "unknown step 'p w'"),
    ],
)
def test_strategy_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_strategy(text, OPTIMIZERS)


def _steps(*devs):
    return [Step(index=i, kind="p", scores={"dev": d}) for i, d in enumerate(devs)]


def test_best_step_prefers_the_earlier_on_ties():
    assert best_step(_steps(0.2, 0.5, 0.5, 0.1)).index == 1


def test_early_stopping_counts_steps_without_improvement():
    assert not _stalled(_steps(0.2, 0.5), patience=1)
    assert _stalled(_steps(0.2, 0.5, 0.5), patience=1)  # a tie is no improvement
    assert not _stalled(_steps(0.2, 0.5, 0.4), patience=2)
    assert _stalled(_steps(0.2, 0.5, 0.4, 0.5), patience=2)
    assert not _stalled(_steps(0.2, 0.5, 0.5), patience=None)


def _scores(run: Path) -> list:
    return [(s["kind"], s["scores"]) for s in manifest(run)["steps"]]


def _start(runs: Path, *extra: str) -> subprocess.Popen:
    runs.mkdir(parents=True, exist_ok=True)
    log = open(runs / "stderr.log", "w")  # a file, not a pipe: a full pipe would block the child
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jointcli.cli",
            "joint",
            str(RECIPES / "sst2.yaml"),
            *TINY_JOINT,
            *extra,
            "--runs-dir",
            str(runs),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """A suite started in the background by a script inherits SIGINT ignored, and Python keeps it
    so in the child: give the child the ordinary disposition, as a terminal's Ctrl-C would find it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_running(run: Path, kind: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, (run.parent / "stderr.log").read_text()
        try:
            steps = manifest(run)["steps"]
        except (OSError, json.JSONDecodeError, KeyError):
            steps = []
        if steps and steps[-1]["kind"] == kind and steps[-1]["status"] == "running":
            return
        time.sleep(0.2)
    raise AssertionError(f"no running {kind} step within {timeout}s")


# The moments the chain kills `joint` at (jointcli/failpoints.py), in the order a run reaches them, with
# the kinds of the steps finished by then. Only two fall inside the weight step: a kill there costs
# its training again.
KILLS = [
    ("example:1", []),  # the baseline evaluation, midway
    ("finish/p", ["baseline"]),  # the prompt step's files written, the manifest not yet `done`
    ("write/traces.jsonl", ["baseline", "p"]),  # the weight step's bootstrap
    ("train-step:1", ["baseline", "p"]),  # its training, midway (after the first of its two steps)
    ("write/eval-test.json", ["baseline", "p", "w"]),  # the best step's test evaluation, into a done folder
]


@pytest.mark.model
def test_sigkill_at_each_moment_then_resume_equals_uninterrupted(tmp_path, capsys):
    """A chain of processes, each resuming the last and killed (SIGKILL) at the next moment; the
    straight run and the final resume run here. The result is the straight run's, no finished step is
    redone, and no temporary file is left."""
    joint = ["joint", RECIPES / "sst2.yaml", *TINY_JOINT, "--runs-dir"]
    assert cli(*joint, tmp_path / "a") == 0
    expected = _scores(tmp_path / "a" / "sst2")
    assert [k for k, _ in expected] == ["baseline", "p", "w"]
    assert manifest(tmp_path / "a" / "sst2")["finished"] is True

    run, finished = tmp_path / "b" / "sst2", {}
    for point, kinds in KILLS:
        result = run_cli(*map(str, joint), str(tmp_path / "b"), env={VARIABLE: point})
        assert result.returncode == -signal.SIGKILL, f"{point}: {result.stderr[-3000:]}"
        done = {s["index"]: s for s in manifest(run)["steps"] if s["status"] == "done"}
        assert [s["kind"] for s in done.values()] == kinds, point
        _assert_reused(finished, done)
        finished.update(done)
        if manifest(run)["steps"][-1]["status"] == "running":
            assert cli("status", run) == 0
            assert "interrupted (no process holds run.lock)" in capsys.readouterr().err

    assert cli(*joint, tmp_path / "b") == 0
    after = manifest(run)["steps"]
    _assert_reused(finished, {s["index"]: s for s in after})
    assert _scores(run) == expected
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".tmp-*")) and not list(run.rglob(".*.tmp-*"))

    # resuming a finished run does nothing and succeeds
    assert cli(*joint, tmp_path / "b") == 0
    assert manifest(run)["steps"] == after


def _assert_reused(finished: dict, now: dict) -> None:
    """Every step finished before is still there, as it was: reused, not run again."""
    for index, step in finished.items():
        assert (now[index]["started"], now[index]["ended"]) == (step["started"], step["ended"]), step["kind"]


@pytest.mark.model
def test_sigint_stops_cleanly_with_130(tmp_path):
    run = tmp_path / "sst2"
    # no cached answers and four optimizer steps: the weight step takes real time
    proc = _start(tmp_path, "runtime.cache=false", "optimizers.w.train.epochs=2", "schedule.strategy=w")
    _wait_for_running(run, "w", proc)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    steps = manifest(run)["steps"]
    assert steps[0]["status"] == "done"
    assert steps[-1]["status"] == "failed" and steps[-1]["error"] == "interrupted"


@pytest.mark.model
def test_failing_step_exits_1_and_keeps_earlier_steps(tmp_path, capsys):
    assert (
        cli(
            "joint",
            RECIPES / "sst2.yaml",
            *TINY_JOINT,
            "schedule.strategy=w",
            "optimizers.w.traces.source=program",
            "optimizers.w.traces.threshold=2.0",
            "--runs-dir",
            tmp_path,
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "no traces to fine-tune on" in err and "Traceback" not in err
    steps = manifest(tmp_path / "sst2")["steps"]
    assert [(s["kind"], s["status"]) for s in steps] == [("baseline", "done"), ("w", "failed")]
    assert "no traces to fine-tune on" in steps[-1]["error"]


@pytest.mark.model
def test_init_from_starts_from_another_runs_program_and_resumes(tmp_path):
    """--init-from copies the source run's program in as step 00-init; the schedule then runs from
    it (its first evaluation is the baseline), and the same command again changes nothing."""
    assert cli("optimize-prompts", RECIPES / "sst2.yaml", *TINY_JOINT, "--name", "source", "--runs-dir", tmp_path) == 0
    warm = [
        "joint",
        RECIPES / "sst2.yaml",
        *TINY_JOINT,
        "schedule.strategy=p",
        "--name",
        "warm",
        "--init-from",
        "source",
        "--runs-dir",
        tmp_path,
    ]
    assert cli(*warm) == 0
    run = tmp_path / "warm"
    steps = manifest(run)["steps"]
    assert [s["kind"] for s in steps] == ["init", "baseline", "p"]
    assert steps[0]["info"]["from"] == str(tmp_path / "source")
    source_program = (tmp_path / "source" / "00-p" / "program.json").read_text()
    assert (run / "00-init" / "program.json").read_text() == source_program
    assert cli(*warm) == 0
    assert manifest(run)["steps"] == steps
