"""Experiment tracking with MLflow (`pip install 'jointopt[mlflow]'`), on with `--track` or the
recipe's `tracking: {mlflow: {uri, experiment}}`; without either, nothing here imports MLflow.

    overrides = switch_on(recipe, overrides, track=True)   # what --track does: tracking.mlflow={}
    track(ctx.run, ctx.recipe, "RUNNING")                  # steps/base.py, when a step begins and ends
    with sweep_run(recipe, root, runs_dir, strategies, seeds) as failed:   # sweep.py: a parent run
        ...

A jointopt run is an MLflow run named after its folder and each finished step a nested run
(runs.py says what each holds, step_log.py what a step logs); a sweep is a run over its runs
(sweeps.py). The ids live in the manifest, so a resumed run logs into the same runs and never logs a
finished step twice. A tracker that is down or fails prints one warning line and fails nothing
(client.py). The default store is sqlite:///<runs root>/mlflow.db: `mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db` shows it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import InputError
from ..recipe import Recipe
from ..rundir import RunDir
from .client import guarded, reset
from .runs import sync
from .sweeps import close_sweep, open_sweep
from .target import Target, runs_root, target

TRACK_OVERRIDE = "tracking.mlflow={}"  # --track: MLflow with its defaults, where the recipe names no tracking
_sweep_parent: ContextVar[str | None] = ContextVar("sweep_parent", default=None)

__all__ = ["TRACK_OVERRIDE", "Target", "switch_on", "sweep_run", "target", "track"]


def switch_on(recipe: Recipe, overrides: list[str], track: bool) -> list[str]:
    """A command's overrides with --track applied (the recipe's own tracking.mlflow, if any, is kept);
    exit 2 when tracking is on and MLflow is not installed. Each command tries the tracker afresh."""
    reset()
    if (track or recipe.tracking.mlflow is not None) and importlib.util.find_spec("mlflow") is None:
        where = "--track" if track else "tracking.mlflow"
        raise InputError(f"{where}: MLflow is not installed; pip install 'jointopt[mlflow]'")
    if track and recipe.tracking.mlflow is None:
        return [*overrides, TRACK_OVERRIDE]
    return overrides


def track(run: RunDir, recipe: Recipe, status: str) -> None:
    """Bring MLflow up to the run's manifest and set the run's status (RUNNING, FINISHED, FAILED,
    KILLED); nothing when tracking is off."""
    if recipe.tracking.mlflow is None:
        return
    t = target(recipe, runs_root(run))
    guarded(t, sync, run, recipe, t, status, _sweep_parent.get())


@contextmanager
def sweep_run(
    recipe: Recipe, root: Path, runs_dir: Path, strategies: list[str], seeds: list[int]
) -> Iterator[list[str]]:
    """A sweep's MLflow run, the parent of the runs made inside the block; yields the list of failed
    runs ("p-w/seed-0") that the sweep fills and the parent run reports."""
    failed: list[str] = []
    t = target(recipe, runs_dir)
    opened = guarded(t, open_sweep, t, recipe, root, strategies, seeds) if t is not None else None
    run_id, owner = opened or (None, False)  # a task of a sweep on Ray logs under it, and leaves it open
    token = _sweep_parent.set(run_id)
    status = "KILLED"
    try:
        yield failed
        status = "FINISHED"
    except KeyboardInterrupt:
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _sweep_parent.reset(token)
        if owner:
            guarded(t, close_sweep, t, run_id, failed, status)
