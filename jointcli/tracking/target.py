"""Where a run is tracked, and what about the machine goes with it: the MLflow URI and experiment
that the recipe's `tracking.mlflow` and MLflow's own environment variables give, the URI as it may
be shown (no password), the commit and CPU kind a run is tagged with, and optimizer settings with
anything secret-looking masked.

    target(recipe, Path("runs"))   # None when tracking is off
    Target(uri='sqlite:////home/me/runs/mlflow.db', experiment='sst2', ...)
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..recipe import Recipe
from ..rundir import RunDir

DB_NAME = "mlflow.db"  # the default store: one SQLite file under the runs root, no server needed
ARTIFACTS_NAME = "mlartifacts"  # next to a SQLite store: the artifacts of its experiments
_SECRET = re.compile(r"(?i)(^|[_.\-])(api_?key|key|secret|password|passwd|token|auth\w*|credentials?)$")


@dataclass(frozen=True)
class Target:
    uri: str  # as MLflow is given it
    experiment: str
    artifacts: str | None  # where a new experiment keeps its artifacts; None: the tracking server decides
    adapters: bool  # tracking.adapters: log weight steps' adapters too

    @property
    def shown(self) -> str:
        return shown_uri(self.uri)


def target(recipe: Recipe, runs_root: Path) -> Target | None:
    """The recipe's tracking target, None when tracking is off (no `tracking.mlflow`, no --track).
    URI: tracking.mlflow.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<runs root>/mlflow.db;
    experiment: tracking.mlflow.experiment, else $MLFLOW_EXPERIMENT_NAME, else the recipe's name."""
    settings = recipe.tracking.mlflow
    if settings is None:
        return None
    uri = settings.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(runs_root / DB_NAME).resolve()}"
    experiment = settings.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or recipe.name
    return Target(uri, experiment, artifact_location(uri), recipe.tracking.adapters)


def artifact_location(uri: str) -> str | None:
    """A SQLite store keeps artifacts in mlartifacts/ beside its file (MLflow's own default is the
    working directory's mlruns/); a server keeps them where it was told.

    >>> artifact_location("sqlite:////data/runs/mlflow.db")
    'file:///data/runs/mlartifacts'
    >>> artifact_location("http://127.0.0.1:5000") is None
    True
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACTS_NAME).as_uri()


def shown_uri(uri: str) -> str:
    """The URI without a user, password or query, as warnings and manifests show it.

    >>> shown_uri("https://me:s3cret@mlflow.example.com/x?token=abc")
    'https://mlflow.example.com/x'
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return uri
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


def runs_root(run: RunDir) -> Path:
    """The runs root a run directory is under: its manifest's name is its folder there (NAME, NAME/seed-0)."""
    path = run.path
    for _ in Path(run.manifest().get("name") or run.path.name).parts:
        path = path.parent
    return path


def masked(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flat `a.b: value` params of nested settings, values of secret-looking names masked.

    >>> masked({"optimizer": "MIPROv2", "args": {"max_tokens": 8, "api_key": "sk-1"}})
    {'optimizer': 'MIPROv2', 'args.max_tokens': '8', 'args.api_key': '***'}
    """
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(masked(value, f"{name}."))
        else:
            flat[name] = "***" if _SECRET.search(str(key)) else str(value)[:6000]
    return flat


@functools.cache
def commit() -> str:
    """The jointopt commit a run was made with (git), else the installed version."""
    from importlib.metadata import PackageNotFoundError, version

    source = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git here: the version says enough
        pass
    try:
        return version("jointopt")
    except PackageNotFoundError:
        return "unknown"
