"""A run directory as MLflow runs: the jointopt run is one MLflow run (named after its folder), each
finished step a nested run. The manifest keeps the ids (`mlflow`: uri, experiment_id, run_id and, per
step folder, its run id, start and the splits logged), so that a resumed run logs into the same runs
and never logs a finished step twice; a step redone (--force) is a new step and a new nested run
(the former one deleted).

    sync(run, recipe, t, "RUNNING", parent=None)   # after each step; "FINISHED" when the run ends
"""

from __future__ import annotations

from pathlib import Path

from ..recipe import Recipe
from ..rundir import RunDir, Step
from ..weights.device import cpu_kind
from .client import client, experiment_id, run_exists, set_status
from .step_log import log_metrics, log_step, ms
from .target import Target, commit


def run_tags(recipe: Recipe, folder: Path) -> dict[str, str]:
    """What a jointopt run (in `folder`) is tagged with: its recipe, strategy, seed, the commit and the CPU."""
    return {
        "recipe": recipe.name,
        "strategy": recipe.schedule.strategy,
        "seed": str(recipe.seed),
        "commit": commit(),
        "cpu": cpu_kind(),
        "run_dir": str(folder.resolve()),
    }


def _record(run: RunDir, recipe: Recipe, t: Target, parent: str | None) -> dict:
    """The manifest's MLflow record of the run: kept when its run is in `t`'s store, else a new run."""
    record = run.manifest().get("mlflow")
    if isinstance(record, dict) and record.get("uri") == t.shown and run_exists(t, record.get("run_id")):
        return record
    manifest = run.manifest()
    tags = run_tags(recipe, run.path) | ({"mlflow.parentRunId": parent} if parent else {})
    exp = experiment_id(t)
    created = client(t).create_run(exp, start_time=ms(manifest.get("created")), tags=tags, run_name=manifest["name"])
    record = {"uri": t.shown, "experiment_id": exp, "run_id": created.info.run_id, "steps": {}}
    run.set_manifest_field("mlflow", record)
    return record


def _sync_step(t: Target, recipe: Recipe, run: RunDir, step: Step, record: dict) -> bool:
    """Log what of `step` MLflow does not hold yet; whether anything was."""
    logged = record["steps"].get(step.folder)
    if logged is not None and logged.get("started") == step.started:
        new = [split for split in step.scores if split not in logged["scores"]]
        if new:  # a test score added after the step finished
            log_step(t, logged["run_id"], recipe, run, step, new, first=False)
            logged["scores"] += new
        return bool(new)
    if logged is not None:  # the folder's earlier step, redone (--force): its run goes with it
        client(t).delete_run(logged["run_id"])
    tags = {"mlflow.parentRunId": record["run_id"], "kind": step.kind}
    tags |= {"adopted_from": step.info["adopted_from"]} if "adopted_from" in step.info else {}
    nested = client(t).create_run(record["experiment_id"], start_time=ms(step.started), tags=tags, run_name=step.folder)
    run_id = nested.info.run_id
    log_step(t, run_id, recipe, run, step, list(step.scores), first=True)
    set_status(t, run_id, "FINISHED", ms(step.ended))
    record["steps"][step.folder] = {"run_id": run_id, "started": step.started, "scores": list(step.scores)}
    return True


def sync(run: RunDir, recipe: Recipe, t: Target, status: str, parent: str | None) -> None:
    """Bring the run's MLflow runs up to its manifest, then set the run's status (RUNNING while a
    step runs; FINISHED, FAILED or KILLED at an end). When the manifest names the step that ships
    (`best`), the run is tagged with it and holds its scores as metrics."""
    record = _record(run, recipe, t, parent)
    for step in run.done_steps():
        if _sync_step(t, recipe, run, step, record):
            run.set_manifest_field("mlflow", record)  # after each step: a kill now never logs it twice
    manifest = run.manifest()
    best = next((s for s in run.done_steps() if s.folder == manifest.get("best")), None)
    if best is not None:
        client(t).set_tag(record["run_id"], "best", best.folder)
        log_metrics(t, record["run_id"], dict(best.scores), len(best.scores))
    client(t).log_dict(record["run_id"], manifest, "manifest.json")
    set_status(t, record["run_id"], status)
