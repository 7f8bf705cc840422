"""Sweep: one recipe under several strategies and seeds, into sibling run folders, then compare.

    jointopt sweep recipes/sst2.yaml --seeds 0,1,2 \
        --strategies "none, p, w, p -> p, w -> w, p -> w, w -> p, p -> w -> p"
    result = run_sweep(Path("recipes/sst2.yaml"), strategies="p, p -> w", seeds="0,1")

makes runs/<name>/<strategy>/seed-<n> (strategy "p -> w" -> folder "p-w", zero-shot -> "zero-shot").
Every run resumes like `jointopt joint`. Strategies run shortest first, and a run whose schedule
begins like a finished sibling's (same seed, same recipe but the strategy) adopts that sibling's
steps instead of computing them again: `p -> w -> p` starts from `p -> w`'s three folders. The
result is the same as running it alone (steps are seeded and the LM greedy), minus the wait.

The same sweep runs its (strategy, seed) runs in parallel on Ray (`ray=`, ray_sweep.py), each after
the sibling it adopts from (sweep_graph.py), into the same folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checks import check_recipe
from .compare import Group, load_group
from .console import console
from .context import Context, open_run
from .errors import StepError
from .recipe import Recipe, load_recipe
from .rundir import RunDir, Step
from .schedule import plan_progress, run_joint, schedule_plan
from .strategy import DEFAULT_STRATEGIES, parse_seeds, parse_strategies, parse_strategy, slug
from .sweep_graph import SweepTask, sweep_tasks
from .tracking import sweep_run


def _same_but_schedule(a: Recipe, b: Recipe) -> bool:
    """Whether two recipes differ in their schedule at most."""
    a_rest, b_rest = ({k: v for k, v in r.model_dump(mode="json").items() if k != "schedule"} for r in (a, b))
    return a_rest == b_rest


def adopt_prefix(ctx: Context, donors: list[RunDir]) -> int:
    """Into a run without steps, copy the longest finished prefix of its plan that a donor has."""
    if ctx.run.steps():
        return 0
    plan = schedule_plan(ctx.recipe)
    best: tuple[int, RunDir | None, list[Step]] = (0, None, [])
    for donor in donors:
        if donor.path == ctx.run.path or not _same_but_schedule(donor.recipe(), ctx.recipe):
            continue
        done, n = plan_progress(donor, plan)
        if n > best[0] and [s.index for s in done[:n]] == list(range(n)):
            best = (n, donor, done[:n])
    n, donor, steps = best
    if n:
        ctx.run.adopt(donor, steps)
    return n


def sibling_runs(root: Path, seed: int) -> list[RunDir]:
    """Finished-or-not runs of one seed under a sweep's folder: <root>/<strategy>/seed-<seed>."""
    return [RunDir(p.parent) for p in sorted(root.glob(f"*/seed-{seed}/manifest.json"))]


@dataclass
class SweepResult:
    root: Path  # runs/<name>
    groups: list[Group]  # one per strategy (its seed runs), in the order they ran, for compare
    failed: list[str]  # "<strategy folder>/seed-<n>" of the runs whose schedule failed

    def failure(self) -> StepError | None:
        """The error a sweep with failed runs ends with (exit code 1), after its report."""
        if not self.failed:
            return None
        return StepError(
            f"{len(self.failed)} run(s) failed ({', '.join(self.failed)}); the table shows what they finished"
        )


def plan_sweep(
    recipe_path: Path,
    overrides: list[str],
    name: str | None = None,
    strategies: str = DEFAULT_STRATEGIES,
    seeds: str | None = None,
) -> tuple[Recipe, list[str], list[SweepTask]]:
    """(the recipe; the strategies, shortest first; the runs as tasks, in the order a serial sweep runs
    them), each strategy's steps checked against the recipe: bad input stops the sweep before any run."""
    base = load_recipe(recipe_path, overrides)
    plan = parse_strategies(strategies, base.optimizers)
    check_recipe(base, steps={key for strategy in plan for key in parse_strategy(strategy, base.optimizers)})
    values = parse_seeds(seeds) if seeds is not None else [base.seed]
    return base, plan, sweep_tasks(plan, values, name or f"{base.name}-sweep", base.optimizers)


def run_sweep(
    recipe_path: Path,
    overrides: list[str] | None = None,
    name: str | None = None,
    runs_dir: Path = Path("runs"),
    force: bool = False,
    strategies: str = DEFAULT_STRATEGIES,
    seeds: str | None = None,
    ray: str | None = None,
) -> SweepResult:
    """Run (or resume) the recipe under each strategy ("p, p -> w") and seed ("0,1"; default the
    recipe's) into runs_dir/NAME (default <recipe name>-sweep), one run after another, or on Ray
    (`ray`: an address, or ray_sweep.LOCAL). A run whose step fails is reported and the sweep goes on:
    one strategy failing (e.g. no traces to train on) is a result too."""
    overrides = overrides or []
    base, plan, tasks = plan_sweep(recipe_path, overrides, name, strategies, seeds)
    root_name = tasks[0].root
    seed_values = list(dict.fromkeys(task.seed for task in tasks))
    with sweep_run(base, runs_dir / root_name, runs_dir, plan, seed_values) as failed:  # MLflow, when on
        if ray is not None:
            from .ray_sweep import run_on_ray  # Ray's extra: only a sweep with --ray needs it

            failed += run_on_ray(tasks, recipe_path, overrides, runs_dir, force, ray)
        else:
            failed += [t.run for t in tasks if not _run_task(t, recipe_path, overrides, runs_dir, force)]
    groups = [load_group(str(runs_dir / root_name / slug(s)), runs_dir, label=slug(s)) for s in plan]
    return SweepResult(runs_dir / root_name, groups, failed)


def _run_task(task: SweepTask, recipe_path: Path, overrides: list[str], runs_dir: Path, force: bool) -> bool:
    """Run (or resume) one (strategy, seed) of a sweep in this process; False when a step failed."""
    extra = [f"schedule.strategy={task.strategy}", f"seed={task.seed}"]
    with open_run(recipe_path, overrides + extra, task.folder, runs_dir, force) as ctx:
        console.rule(f"{task.strategy if task.strategy != 'none' else 'zero-shot'} (seed {task.seed})")
        root = runs_dir / task.root
        if adopted := adopt_prefix(ctx, sibling_runs(root, task.seed)):
            console.print(f"{ctx.run.path}: {adopted} step(s) adopted from a sibling run")
        try:
            run_joint(ctx)
        except StepError as err:
            console.print(f"[red]failed[/]: {ctx.run.path}: {err}", highlight=False)
            return False
    return True
