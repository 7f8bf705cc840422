"""The commands that check, plan and run a recipe: validate, plan, schema, eval, optimize-prompts,
bootstrap, finetune, joint. A step command prints the run's steps table when it ends (tables.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from ..console import console
from ..errors import InputError
from .app import (
    ForceOpt,
    NameOpt,
    OptimizerOpt,
    Overrides,
    RecipeArg,
    RunsOpt,
    TrackOpt,
    app,
    load,
    run_path,
    seed_list,
    tracked,
)


def _one_step(
    step: Callable,
    kind: str,
    recipe: Path,
    overrides: list[str] | None,
    name: str | None,
    runs_dir: Path,
    force: bool,
    optimizer: str | None,
) -> None:
    """A step command: its optimizer (--optimizer, or the recipe's first of `kind`) checked before the
    run directory opens (bad input leaves no run behind), `step(ctx, key)`, then the run's table."""
    from ..checks import step_optimizer
    from ..context import open_run
    from ..recipe import PromptOptimizer, WeightOptimizer
    from ..schedule import pick_optimizer
    from ..tables import print_steps

    r = load(recipe, overrides)
    key = pick_optimizer(r, optimizer, kind)
    spec = step_optimizer(r, key, PromptOptimizer if kind == "prompt" else WeightOptimizer)
    if spec.type == "reinforce":  # its step rolls out and scores the program: a schedule's step
        raise InputError(
            f"optimizers.{key}: is a reinforce optimizer, which trains on its own rollouts, not on traces; "
            f"run it in a schedule: jointopt joint RECIPE 'schedule.strategy={key}'"
        )
    with open_run(recipe, overrides, name, runs_dir, force) as ctx:
        step(ctx, key)
        print_steps(ctx.run)


@app.command()
def validate(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Check a recipe (and its overrides) without running anything."""
    from ..checks import check_recipe

    r = load(recipe, overrides)
    check_recipe(r)
    console.print(
        f"[green]ok[/]: {recipe} ({r.name}: {len(r.program.modules) or 'class'} module(s), "
        f"{len(r.models)} model(s), strategy {r.schedule.strategy!r})"
    )


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: Overrides = None,
    probe: Annotated[
        bool | None,
        typer.Option(
            "--probe/--no-probe",
            help="time a few generations and a LoRA step here (default: when every module is local)",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON to stdout")] = False,
) -> None:
    """What each step of the schedule will cost: LM calls, tokens, LoRA parameters, memory, seconds.

    jointopt plan recipes/sst2.yaml
    jointopt plan recipes/sst2.yaml schedule.strategy="w -> p" --no-probe --json
    """
    from ..checks import check_recipe
    from ..console import prints_to_stderr
    from ..plan import build_plan
    from ..tables import print_plan

    r = load(recipe, overrides)
    check_recipe(r)
    with prints_to_stderr():
        result = build_plan(r, probe)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_plan(result, console)


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema (for editors)."""
    from ..recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))


@app.command("eval")
def eval_(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    split: Annotated[str, typer.Option(help="dev or test")] = "dev",
    force: ForceOpt = False,
    track: TrackOpt = False,
) -> None:
    """Evaluate the run's current program (the recipe's, before any step) on a split.

    jointopt eval recipes/sst2.yaml data.split.dev=20 --name quick
    """
    from ..context import open_run
    from ..steps.eval_step import eval_step
    from ..tables import print_steps

    if split not in ("dev", "test"):
        raise InputError(f"--split: {split!r} is not dev or test")
    overrides = tracked(recipe, overrides, track)
    with open_run(recipe, overrides, name, runs_dir, force) as ctx:
        eval_step(ctx, split)
        print_steps(ctx.run)


@app.command("optimize-prompts")
def optimize_prompts(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    optimizer: OptimizerOpt = None,
    force: ForceOpt = False,
    track: TrackOpt = False,
) -> None:
    """A prompt step (NN-p): run the recipe's DSPy prompt optimizer on the current program.

    jointopt optimize-prompts recipes/sst2.yaml optimizers.p.optimizer=LabeledFewShot
    """
    from ..steps.prompt_step import prompt_step

    overrides = tracked(recipe, overrides, track)
    _one_step(prompt_step, "prompt", recipe, overrides, name, runs_dir, force, optimizer)


@app.command()
def bootstrap(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    optimizer: OptimizerOpt = None,
    force: ForceOpt = False,
    track: TrackOpt = False,
) -> None:
    """Record the passing traces of the current program (or teacher, or labels) on the training split.

    jointopt bootstrap recipes/sst2.yaml optimizers.w.traces.source=labels
    """
    from ..steps.bootstrap_step import bootstrap_step

    overrides = tracked(recipe, overrides, track)
    _one_step(bootstrap_step, "weight", recipe, overrides, name, runs_dir, force, optimizer)


@app.command()
def finetune(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    optimizer: OptimizerOpt = None,
    force: ForceOpt = False,
    traces: Annotated[Path | None, typer.Option(help="traces.jsonl to train on (e.g. from another run)")] = None,
    track: TrackOpt = False,
) -> None:
    """A weight step (NN-w): LoRA fine-tuning on the run's latest traces (bootstrapping first if none);
    NN-s with a simultaneous optimizer: a soft prompt trained with the LoRA adapter.

    jointopt finetune recipes/sst2.yaml optimizers.w.train.epochs=1
    jointopt finetune recipes/sst2.yaml --optimizer s
    """
    from ..steps.weight_step import weight_step

    overrides = tracked(recipe, overrides, track)
    _one_step(
        lambda ctx, key: weight_step(ctx, key, traces), "weight", recipe, overrides, name, runs_dir, force, optimizer
    )


@app.command()
def joint(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    force: ForceOpt = False,
    seeds: Annotated[
        str | None, typer.Option(callback=seed_list, help="run once per seed, e.g. 0,1,2 -> NAME/seed-0, ...")
    ] = None,
    init_from: Annotated[
        Path | None, typer.Option("--init-from", help="start from another run's best program (prompts and adapters)")
    ] = None,
    track: TrackOpt = False,
) -> None:
    """Run the recipe's schedule (e.g. p -> w -> p) end to end; run it again to resume.

    jointopt joint recipes/sst2.yaml
    jointopt joint recipes/sst2.yaml schedule.strategy="w -> p" --name sst2-wp --seeds 0,1,2
    jointopt joint recipes/sst2.yaml --track      # MLflow: runs/mlflow.db, or $MLFLOW_TRACKING_URI
    """
    from ..schedule import run_joint_seeds
    from ..tables import print_steps

    start = run_path(init_from, runs_dir) if init_from is not None else None
    overrides = tracked(recipe, overrides, track)
    run_joint_seeds(recipe, overrides, name, runs_dir, force, seeds=seeds, init_from=start, after=print_steps)
