"""The MLflow client of a target, and the rule that a tracker which fails fails nothing: the first
failure of a command prints one warning line, and the command goes on without tracking.

MLflow is imported here, and only when a command tracks: the package needs it only then.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from ..console import console
from .target import Target

T = TypeVar("T")
PROBE_S = 5.0  # seconds a tracking server has to answer /health before a command gives up on it
EXPERIMENT_KIND = "mlflow.experimentKind"
_clients: dict[str, Any] = {}
_down: list[str] = []  # why tracking stopped in this command (one entry at most)


def reset() -> None:
    """A new command: try the tracker again."""
    _down.clear()


def guarded(t: Target, work: Callable[..., T], *args: Any) -> T | None:
    """`work(*args)`, or None once tracking has failed in this command. The first failure prints one
    warning line; the run goes on, untracked."""
    if _down:
        return None
    try:
        return work(*args)
    except Exception as err:  # any failure of the tracker (network, server, store): never the run's
        why = f"{type(err).__name__}: {str(err).replace(t.uri, t.shown)}".splitlines()[0][:300]
        _down.append(why)
        console.print(
            f"[yellow]warning[/]: MLflow tracking at {t.shown} failed ({why}); the run goes on untracked",
            highlight=False,
        )
        return None


def client(t: Target):
    """The MlflowClient of `t`'s URI (one a process); a server that does not answer /health is down."""
    if t.uri not in _clients:
        # a server that went away must not hold a run for minutes of retries (MLflow's default)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is for results (--json)
        for name in ("mlflow", "alembic"):  # a new SQLite store logs its schema migrations at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        if t.uri.startswith(("http://", "https://")):
            with urllib.request.urlopen(f"{t.uri.rstrip('/')}/health", timeout=PROBE_S):
                pass
        from mlflow.tracking import MlflowClient

        _clients[t.uri] = MlflowClient(tracking_uri=t.uri)
    return _clients[t.uri]


def experiment_id(t: Target) -> str:
    """The id of `t`'s experiment, made if it does not exist (with its artifact location)."""
    c = client(t)
    found = c.get_experiment_by_name(t.experiment)
    if found is not None:
        return found.experiment_id
    # the kind MLflow's UI opens an experiment by: a table of runs and their metrics, not GenAI traces
    return c.create_experiment(
        t.experiment, artifact_location=t.artifacts, tags={EXPERIMENT_KIND: "custom_model_development"}
    )


def run_exists(t: Target, run_id: str | None) -> bool:
    """Whether the store holds `run_id` (a store deleted or replaced since does not)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        return client(t).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def set_status(t: Target, run_id: str, status: str, end_ms: int | None = None) -> None:
    """RUNNING, or an end: FINISHED, FAILED, KILLED."""
    if status == "RUNNING":
        client(t).update_run(run_id, status="RUNNING")
    else:
        client(t).set_terminated(run_id, status, end_time=end_ms)
