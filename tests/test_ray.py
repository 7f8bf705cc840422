"""Sweeps as task graphs: `sweep --dry-run` (each run's command and the run it waits for) and
`sweep --ray` on a real local Ray, on loopback, which must give the serial sweep's runs."""

from __future__ import annotations

import json

import pytest

from .conftest import RECIPES, cli, manifest, tiny

# p -> p waits for p and adopts its two steps: a task that depends on another (a zero-shot run would be
# one more task, each a Ray worker and a jointopt process that loads the model, and prove nothing more)
STRATEGIES = "p, p -> p"


def test_dry_run_prints_each_runs_command_after_the_run_it_adopts_from(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", RECIPES / "sst2.yaml", "--strategies", "p -> w, w, none, p", "--seeds", "0,1", "--dry-run"]
    assert cli(*args, "--json", "--runs-dir", "r") == 0
    rows = json.loads(capsys.readouterr().out)
    by_id = {row["id"]: row for row in rows}
    graph = {(r["strategy"], r["seed"]): r["after"] and (by_id[r["after"]]["strategy"], r["seed"]) for r in rows}
    assert graph == {
        ("none", 0): None,
        ("none", 1): None,
        ("p", 0): ("none", 0),
        ("p", 1): ("none", 1),
        ("w", 0): ("none", 0),
        ("w", 1): ("none", 1),
        ("p -> w", 0): ("p", 0),  # it adopts p's baseline and prompt step
        ("p -> w", 1): ("p", 1),
    }
    assert by_id[7]["command"] == (
        f"jointopt sweep {RECIPES / 'sst2.yaml'} --strategies 'p -> w' --seeds 0 --name sst2-sweep --runs-dir r"
    )
    assert by_id[7]["folder"] == "r/sst2-sweep/p-w/seed-0"
    assert not list(tmp_path.iterdir()), "a dry run creates nothing"

    assert cli("sweep", RECIPES / "sst2.yaml", "data.split.dev=3", "--strategies", "none, p", "--dry-run") == 0
    assert capsys.readouterr().out.splitlines() == [
        "# 1: zero-shot, seed 0 -> runs/sst2-sweep/zero-shot/seed-0",
        f"jointopt sweep {RECIPES / 'sst2.yaml'} data.split.dev=3 --strategies none --seeds 0 --name sst2-sweep "
        "--runs-dir runs",
        "# 2: p, seed 0 -> runs/sst2-sweep/p/seed-0 (after 1)",
        f"jointopt sweep {RECIPES / 'sst2.yaml'} data.split.dev=3 --strategies p --seeds 0 --name sst2-sweep "
        "--runs-dir runs",
    ]


def _steps(run) -> list[tuple]:
    return [(s["kind"], s["info"].get("optimizer"), s["status"], s["scores"]) for s in manifest(run)["steps"]]


@pytest.mark.model
def test_a_sweep_on_a_local_ray_gives_the_serial_sweeps_runs(tmp_path, capsys):
    pytest.importorskip("ray", reason="jointopt[ray] is not installed (make setup installs it)")
    sweep = ["sweep", RECIPES / "sst2.yaml", *tiny(4, 2, 2), "--strategies", STRATEGIES]
    assert cli(*sweep, "--runs-dir", tmp_path / "serial") == 0
    capsys.readouterr()
    assert cli(*sweep, "--ray", "--runs-dir", tmp_path / "ray") == 0
    err = capsys.readouterr().err
    assert "ray: 2 runs, each asking for 1 CPU" in err and "ray: p-p/seed-0 done; 0 left" in err, err

    for strategy in ("p", "p-p"):
        serial, ray = (tmp_path / where / "sst2-sweep" / strategy / "seed-0" for where in ("serial", "ray"))
        assert _steps(ray) == _steps(serial), strategy
    # p -> p waited for p and adopted its two steps, as in the serial sweep
    log = (tmp_path / "ray" / "sst2-sweep" / "p-p" / "seed-0.log").read_text()
    assert "2 step(s) adopted from a sibling run" in log, log
    assert "step(s) adopted" not in (tmp_path / "ray" / "sst2-sweep" / "p" / "seed-0.log").read_text()
