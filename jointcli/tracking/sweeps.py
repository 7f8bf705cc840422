"""A sweep as an MLflow run over its runs: each run of the sweep is nested under it (and each step
under its run). The sweep's folder keeps the run's id in tracking.json, so a resumed sweep logs into
the same parent run."""

from __future__ import annotations

from pathlib import Path

from ..files import disk_errors, read_json, write_json
from ..recipe import Recipe
from .client import client, experiment_id, run_exists, set_status
from .runs import run_tags
from .step_log import log_metrics
from .target import Target

RECORD = "tracking.json"  # in the sweep's folder: {"mlflow": {uri, experiment_id, run_id, strategies, seeds}}


def open_sweep(t: Target, recipe: Recipe, root: Path, strategies: list[str], seeds: list[int]) -> tuple[str, bool]:
    """(the id of the sweep's MLflow run, whether this command owns it). The run tracking.json names,
    if `t`'s store holds it: a part of that sweep (one strategy and seed of it, as a task of the sweep
    on Ray runs) logs under it and leaves its status to the whole; the whole sweep again owns it.
    Else a new run."""
    path = root / RECORD
    record = (read_json(path) if path.is_file() else {}).get("mlflow") or {}
    if record.get("uri") == t.shown and run_exists(t, record.get("run_id")):
        mine = (set(strategies), set(seeds))
        whole = (set(record.get("strategies", [])), set(record.get("seeds", [])))
        if mine[0] <= whole[0] and mine[1] <= whole[1] and mine != whole:
            return record["run_id"], False
        set_status(t, record["run_id"], "RUNNING")
        run_id, exp = record["run_id"], record["experiment_id"]
    else:
        tags = {k: v for k, v in run_tags(recipe, root).items() if k not in ("strategy", "seed")}
        exp = experiment_id(t)
        run_id = client(t).create_run(exp, tags=tags | {"sweep": "true"}, run_name=root.name).info.run_id
    client(t).set_tag(run_id, "strategies", ", ".join(strategies))
    client(t).set_tag(run_id, "seeds", ", ".join(map(str, seeds)))
    with disk_errors(root):
        root.mkdir(parents=True, exist_ok=True)
    record = {"uri": t.shown, "experiment_id": exp, "run_id": run_id, "strategies": strategies, "seeds": seeds}
    write_json(path, {"mlflow": record})
    return run_id, True


def close_sweep(t: Target, run_id: str, failed: list[str], status: str) -> None:
    """The sweep's end: how many runs failed (and which, as a tag), and its status."""
    log_metrics(t, run_id, {"failed_runs": len(failed)})
    if failed:
        client(t).set_tag(run_id, "failed", ", ".join(failed)[:5000])
    set_status(t, run_id, "FAILED" if failed and status == "FINISHED" else status)
