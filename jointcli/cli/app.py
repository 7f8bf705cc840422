"""The Typer app, the arguments and options several commands share, and the helpers they share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..strategy import parse_seeds

if TYPE_CHECKING:
    from ..recipe import Recipe

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Jointly optimize the prompts and the weights of DSPy programs.",
)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key.path=value overrides, e.g. data.split.train=16", show_default=False)
]


def _run_name(name: str | None) -> str | None:
    """--name follows the rule of the recipe's `name` (recipe/schema.py): a folder under the runs root."""
    from ..recipe.schema import check_run_name  # pydantic and the schema: not for --help

    return None if name is None else check_run_name(name, "--name")


def seed_list(seeds: str | None) -> str | None:
    """--seeds names at least one seed, each once (strategy.parse_seeds): given empty, it is refused
    before any work, not read as no seeds."""
    if seeds is not None:
        parse_seeds(seeds)
    return seeds


NameOpt = Annotated[
    str | None,
    typer.Option(
        "--name",
        callback=_run_name,
        help="run name, its folder under the runs root (default: the recipe's name); letters, digits, '_', '-' and '.'",
    ),
]
RunsOpt = Annotated[Path, typer.Option("--runs-dir", envvar="JOINTOPT_RUNS", help="root of run directories")]
RunArg = Annotated[Path, typer.Argument(help="run directory (or a name under the runs root)")]
OptimizerOpt = Annotated[
    str | None, typer.Option("--optimizer", help="key under `optimizers` (default: the first of the right type)")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="continue a run directory made by a different recipe")]
RequireOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--require",
        help="gate: 'A > B' (A significantly better on test) or 'A >= B' (not significantly worse); "
        "exit code 3 when it fails; repeatable",
    ),
]
MinScoreOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--min-score", help="gate: every run's test score >= X, or NAME=X for one run; exit code 3; repeatable"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the whole report as JSON to stdout")]
TrackOpt = Annotated[
    bool,
    typer.Option(
        "--track",
        help="log the runs and their steps to MLflow (pip install 'jointopt\\[mlflow]'): the recipe's "
        "tracking.mlflow, else $MLFLOW_TRACKING_URI, else sqlite:///<runs dir>/mlflow.db",
    ),
]
PlotOpt = Annotated[
    Path | None, typer.Option("--plot", help="write score-by-step and quality/cost plots to this PNG file")
]


def load(path: Path, overrides: list[str] | None) -> Recipe:
    """The recipe at `path` with its overrides applied (recipe.load_recipe)."""
    from ..recipe import load_recipe  # pydantic and the schema: not for --help

    return load_recipe(path, overrides or [])


def tracked(path: Path, overrides: list[str] | None, track: bool) -> list[str]:
    """The overrides with --track applied (tracking.switch_on: MLflow with its defaults where the recipe
    names no tracking); exit 2 when tracking is on and MLflow is not installed."""
    from ..tracking import switch_on  # the recipe schema: not for --help

    return switch_on(load(path, overrides), overrides or [], track)


def run_path(run: Path, runs_dir: Path) -> Path:
    """A run given as a path, or as a name under the runs root."""
    return run if run.exists() or run.is_absolute() else runs_dir / run
