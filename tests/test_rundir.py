"""Damaged run directories, the lock, a full disk or an unwritable runs root, the failpoint hook:
each is a one-line message that says what to do (exit code 2), and nothing half-written is trusted.
No model: run directories are written with RunDir, as the steps write them."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jointcli.errors import InputError
from jointcli.failpoints import VARIABLE, _target
from jointcli.files import write_json, write_jsonl
from jointcli.recipe import load_recipe
from jointcli.recipe.schema import run_folder
from jointcli.rundir import RunDir

from .conftest import RECIPES, ROOT, cli, manifest, run_cli, tiny

RECIPE = load_recipe(RECIPES / "sst2.yaml", [])


def finished_run(root: Path) -> RunDir:
    """runs/sst2 with a finished baseline, p and w step, each with the files its kind writes."""
    run = RunDir.open(root, "sst2", RECIPE)
    for kind in ("baseline", "p", "w"):
        step = run.begin(kind)
        folder = run.step_dir(step)
        write_json(folder / "eval.json", {"score": 0.5})
        write_jsonl(folder / "predictions.jsonl", [{"index": 0, "score": 0.5}])
        step.scores["dev"] = 0.5
        if kind != "baseline":
            adapter = None
            if kind == "w":
                adapter = f"{step.folder}/adapters/classify"
                write_json(run.path / adapter / "adapter_config.json", {})
                (run.path / adapter / "adapter_model.safetensors").write_bytes(b"weights")
            write_json(folder / "program.json", {})
            write_json(
                folder / "state.json",
                {
                    "program": f"{step.folder}/program.json",
                    "modules": {"classify": {"model": "small", "adapter": adapter}},
                },
            )
        run.finish(step, 1.0)
    run.unlock()
    return run


def _open(root: Path, force: bool = False) -> RunDir:
    run = RunDir.open(root, "sst2", RECIPE, force=force)
    run.unlock()
    return run


# ---------------------------------------------------------------- a damaged manifest
@pytest.mark.parametrize(
    "text, why",
    [
        ('{"version": 1, "steps": [{"ind', "JSONDecodeError"),  # truncated
        ("", "JSONDecodeError"),
        ("[1, 2]", "no list of steps"),
        ('{"steps": [{"index": 0}]}', "a step entry"),
        ('{"steps": [{"index": "zero", "kind": "p"}]}', "a step entry"),
        ('{"steps": [{"index": 0, "kind": "q"}]}', "a step entry"),
    ],
)
def test_a_damaged_manifest_is_refused_and_the_lock_let_go(tmp_path, text, why):
    run = finished_run(tmp_path)
    (run.path / "manifest.json").write_text(text)
    with pytest.raises(InputError, match=f"manifest.json: damaged or unreadable \\({why}.*restore it") as info:
        RunDir.open(tmp_path, "sst2", RECIPE)
    assert "\n" not in str(info.value)
    assert run.holder() is None  # the refused open let go of the lock


def test_status_of_a_damaged_manifest_names_the_step_folders(tmp_path, capsys):
    run = finished_run(tmp_path)
    (run.path / "manifest.json").write_text('{"steps": [')
    assert cli("status", run.path) == 2
    err = capsys.readouterr().err
    assert "step folders in" in err and "00-baseline, 01-p, 02-w" in err
    assert "manifest.json: damaged or unreadable" in err and "Traceback" not in err


def test_in_a_pipe_a_message_is_one_line_however_long_its_path(tmp_path):
    # rich breaks lines at 80 columns where it sees no terminal; jointopt's console never does
    deep = tmp_path / "/".join(["a-folder-with-a-long-name"] * 8)
    run = finished_run(deep)
    (run.path / "manifest.json").write_text('{"steps": [')
    result = run_cli("status", str(run.path))  # a fresh process, its stderr a pipe
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert f"step folders in {run.path}: 00-baseline, 01-p, 02-w" in lines, result.stderr
    assert [line for line in lines if line.startswith("error: ")] == [
        line for line in lines if str(run.path / "manifest.json") in line
    ], result.stderr
    assert len(lines) == 2, result.stderr


# ---------------------------------------------------------------- names stay under the runs root
def test_a_run_name_never_leaves_the_runs_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JOINTOPT_RUNS", str(tmp_path / "root" / "runs"))
    assert cli("eval", RECIPES / "sst2.yaml", "data.split.dev=2", "--name", "../../escaped") == 2
    assert capsys.readouterr().err.startswith("error: --name: '../../escaped' has '/'")
    assert list(tmp_path.iterdir()) == []  # no run folder, not even the runs root
    # below the command line too: a run's folder, a seed's or a sweep's, is inside the root or refused
    for name in ("../escaped", "/tmp/escaped", "sst2/../../escaped", ".", "sst2/.."):
        with pytest.raises(InputError, match="is not inside the runs root"):
            RunDir.open(tmp_path / "runs", name, RECIPE)
    assert list(tmp_path.iterdir()) == []
    assert run_folder(tmp_path / "runs", "sst2-sweep/p-w/seed-0") == tmp_path / "runs" / "sst2-sweep/p-w/seed-0"


# ---------------------------------------------------------------- finished steps with files gone
DAMAGE = [
    ("01-p/program.json", "01-p"),
    ("01-p/eval.json", "01-p"),
    ("02-w/state.json", "02-w"),
    ("02-w/adapters/classify/adapter_model.safetensors", "02-w"),
    ("00-baseline", "00-baseline"),  # the whole folder
]


@pytest.mark.parametrize("gone, folder", DAMAGE)
def test_a_done_step_without_its_files_is_refused(tmp_path, gone, folder):
    run = finished_run(tmp_path)
    target = run.path / gone
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(InputError) as info:
        _open(tmp_path)
    message = str(info.value)
    assert f"step {folder} is done but" in message and "is missing" in message
    assert f"--force to redo {folder} and the steps after it" in message and "\n" not in message
    assert run.holder() is None


def test_a_damaged_state_json_is_damage(tmp_path):
    run = finished_run(tmp_path)
    (run.path / "01-p" / "state.json").write_text('{"program": ')
    assert run.damage() == {"01-p": "01-p/state.json is damaged (JSONDecodeError)"}


def test_a_program_state_is_never_skipped_for_an_older_one(tmp_path):
    from jointcli.program import build_program
    from jointcli.state import current_state

    run = finished_run(tmp_path)
    assert current_state(run, RECIPE, build_program(RECIPE)).program_file == "02-w/program.json"
    (run.path / "02-w" / "state.json").unlink()
    with pytest.raises(InputError, match="02-w/state.json: damaged or unreadable"):
        current_state(run, RECIPE, build_program(RECIPE))  # not 01-p's state: it is not this run's program


def test_force_redoes_the_damaged_step_and_the_steps_after_it(tmp_path):
    run = finished_run(tmp_path)
    (run.path / "01-p" / "program.json").unlink()
    _open(tmp_path, force=True)
    steps = manifest(run.path)["steps"]
    assert [s["status"] for s in steps] == ["done", "failed", "failed"]
    assert steps[1]["error"].startswith("damaged: 01-p/program.json is missing")
    assert "built on 01-p" in steps[2]["error"]
    reopened = RunDir.open(tmp_path, "sst2", RECIPE)  # no damage left to refuse
    step = reopened.begin("p")  # the redo takes the damaged step's place; what was built on it goes
    reopened.unlock()
    assert step.folder == "01-p" and not (run.path / "02-w").exists()


def test_status_shows_the_damage_and_exits_2(tmp_path, capsys):
    run = finished_run(tmp_path)
    (run.path / "02-w" / "adapters" / "classify" / "adapter_model.safetensors").unlink()
    assert cli("status", run.path) == 2
    err = capsys.readouterr().err
    assert "│ damaged" in err  # the table's note on 02-w
    assert (
        "error: " + str(tmp_path / "sst2") + ": step 02-w is done but 02-w/adapters/classify/"
        "adapter_model.safetensors is missing; run the command again with --force"
    ) in err
    assert cli("status", run.path, "--json") == 2
    out = json.loads(capsys.readouterr().out)
    assert list(out["damaged"]) == ["02-w"] and len(out["steps"]) == 3


# ---------------------------------------------------------------- the lock
def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_stale_lock_is_taken_over_and_status_says_interrupted(tmp_path, capsys):
    run = finished_run(tmp_path)
    left = RunDir.open(tmp_path, "sst2", RECIPE)
    left.begin("eval")  # a step left running and a lock file naming a dead pid, as a killed process leaves them
    left.unlock()
    (run.path / "run.lock").write_text(f"pid {_dead_pid()} since yesterday")
    assert cli("status", run.path) == 0
    assert "03-eval interrupted (no process holds run.lock)" in capsys.readouterr().err
    taken = RunDir.open(tmp_path, "sst2", RECIPE)
    try:
        assert (run.path / "run.lock").read_text().startswith(f"pid {os.getpid()} since")
        assert run.holder().startswith(f"pid {os.getpid()}")
        assert cli("status", run.path) == 0
        assert f"03-eval in progress (run.lock is held by pid {os.getpid()} since" in capsys.readouterr().err
    finally:
        taken.unlock()


def test_a_live_holder_in_another_process_is_never_taken_over(tmp_path):
    run = finished_run(tmp_path)
    code = "import sys, time\nfrom jointcli.rundir import RunDir\nRunDir(sys.argv[1]).lock(); print('locked', flush=True)\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", code + "time.sleep(60)", str(run.path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=f"in use by pid {holder.pid} since .*; wait for it or stop it"):
            _open(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    _open(tmp_path)  # its holder died: the kernel let go of the lock


def test_a_lock_whose_named_pid_is_gone_says_who_may_hold_it(tmp_path):
    """A process that forked and died leaves its child holding the flock, under the dead pid's name."""
    run = finished_run(tmp_path)
    fd = os.open(run.path / "run.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {_dead_pid()} since noon".encode())
        with pytest.raises(InputError, match="since noon \\(not running here: a process it started"):
            _open(tmp_path)
    finally:
        os.close(fd)


def test_of_writers_racing_for_a_stale_lock_exactly_one_gets_it(tmp_path):
    """Threads, each with its own open file: to flock, as separate as processes."""
    run = finished_run(tmp_path)
    (run.path / "run.lock").write_text(f"pid {_dead_pid()} since yesterday")
    contenders = [RunDir(run.path) for _ in range(8)]
    start, won, refused = threading.Barrier(len(contenders)), [], []

    def race(contender: RunDir) -> None:
        start.wait()
        try:
            contender.lock()
            won.append(contender)
        except InputError as err:
            refused.append(str(err))

    threads = [threading.Thread(target=race, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(refused) == 7
        assert all(f"in use by pid {os.getpid()} since" in message for message in refused)  # the winner's name
    finally:
        won[0].unlock()


# ---------------------------------------------------------------- leftovers of killed writers
def test_opening_removes_what_killed_writers_left(tmp_path):
    run = finished_run(tmp_path)
    adapters = run.path / "02-w" / "adapters"
    left = [
        run.path / ".manifest.json.x1.tmp",
        run.path / "00-baseline" / ".eval-test.json.x2.tmp",
        run.path / "01-p" / ".tmp-123-program.json",
        adapters / ".classify.tmp-x3" / "adapter_config.json",
        adapters / ".classify.old-x4" / "classify" / "adapter_config.json",
    ]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    checkpoint = adapters / ".classify.work" / "checkpoint-20.pt"  # a fine-tune's resume point: kept
    checkpoint.parent.mkdir()
    checkpoint.write_text("state")
    _open(tmp_path)
    assert not [p for p in left if p.exists()] and not (adapters / ".classify.tmp-x3").exists()
    assert checkpoint.is_file() and not run.damage()


# ---------------------------------------------------------------- a full disk, an unwritable runs root
@pytest.mark.parametrize(
    "code, advice",
    [
        (errno.ENOSPC, "no space left on the device; free some space and run the same command again"),
        (errno.EROFS, "read-only file system; use another --runs-dir"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_a_refused_write_is_bad_input_and_changes_nothing(tmp_path, monkeypatch, code, advice):
    run = finished_run(tmp_path)
    before = (run.path / "manifest.json").read_text()
    opened = RunDir.open(tmp_path, "sst2", RECIPE)

    def refuse(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refuse)
    try:
        with pytest.raises(InputError, match=f"manifest.json: cannot write: {advice}"):
            opened.begin("eval")
    finally:
        opened.unlock()
    assert (run.path / "manifest.json").read_text() == before
    assert not list(run.path.rglob("*.tmp"))


def test_a_full_disk_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert cli("eval", RECIPES / "sst2.yaml", *tiny(), "--runs-dir", tmp_path) == 2
    err = capsys.readouterr().err
    assert "cannot write: no space left on the device" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "sst2" / "recipe.yaml").exists()


@pytest.mark.parametrize("how", ["parent is a file", "read-only folder"])
def test_an_unwritable_runs_root_exits_2_in_one_line(tmp_path, capsys, how):
    if how == "parent is a file":  # works as root too, where permissions do not stop writes
        (tmp_path / "file").write_text("")
        root, advice = tmp_path / "file" / "runs", "part of the path is a file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder; 'parent is a file' covers root")
        root, advice = tmp_path / "ro", "permission denied"
        root.mkdir(mode=0o500)
    assert cli("eval", RECIPES / "sst2.yaml", *tiny(), "--runs-dir", root) == 2
    err = capsys.readouterr().err
    assert f"cannot write: {advice}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- the failpoint hook
def test_failpoint_names_and_counts():
    assert _target("write/eval.json:2") == ("write/eval.json", 2)
    assert _target("finish/w") == ("finish/w", 1)
    assert _target("train-step:x") == ("train-step:x", 1)


@pytest.mark.parametrize("spec, killed", [("b:2", True), ("b:3", False), ("c", False)])
def test_a_failpoint_kills_its_process_at_the_nth_time(spec, killed):
    code = "from jointcli.failpoints import failpoint\nfailpoint('a'); failpoint('b'); failpoint('b'); print('ran')"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, VARIABLE: spec}, capture_output=True, text=True
    )
    if killed:
        assert result.returncode == -signal.SIGKILL and result.stdout == ""
    else:
        assert result.returncode == 0 and result.stdout.strip() == "ran"
