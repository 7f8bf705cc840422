"""The schedule: run a strategy such as `p -> w -> p` over a run directory, resumably.

    with open_run(Path("recipes/sst2.yaml"), [], name="sst2", runs_dir=Path("runs")) as ctx:
        best = run_joint(ctx)                                   # the step that ships, scored on test
    runs = run_joint_seeds(Path("recipes/sst2.yaml"), seeds="0,1,2")   # what `jointopt joint` does

Plan: baseline, then one step per letter (strategy.py reads them; steps/registry.py says which step
class runs each), each followed by a dev evaluation (inside the step); then the step to ship (by dev
score, ties to the earlier step; or by the recipe's `schedule.select` rule: selection.shipping) and
the last one are evaluated on the test split. After a step that stopped early or whose dev score is no
better than one answer to everything, the schedule says what to try (advice.py). Finished steps found
in the manifest are not repeated, so running the same command again after a crash or Ctrl-C resumes
where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .advice import advise
from .checks import about, check_recipe, check_steps
from .context import Context, open_run
from .errors import InputError
from .recipe import Recipe, load_recipe
from .rundir import RunDir, Step
from .selection import shipping
from .step_kinds import SCHEDULE_KINDS, StepKind, kind_of_optimizer
from .steps.eval_step import score_on_test
from .steps.init_step import init_step, warm_start
from .steps.registry import PLANNED
from .strategy import parse_seeds, parse_strategy
from .tracking import track

PlanEntry = tuple[str, str | None]  # (step kind, optimizer key); the baseline has no key


def pick_optimizer(recipe: Recipe, key: str | None, optimizer_type: str) -> str:
    """The optimizer key a step uses: `key` (--optimizer) if given, else the recipe's first optimizer
    of that type ("prompt" or "weight")."""
    if key is not None:
        return key
    for k, spec in recipe.optimizers.items():
        if spec.type == optimizer_type:
            return k
    raise InputError(f"optimizers: the recipe has no {optimizer_type} optimizer")


# ---------------------------------------------------------------- plan and progress
def schedule_plan(recipe: Recipe) -> list[PlanEntry]:
    """[(step kind, optimizer key)] of the recipe's strategy, including the baseline."""
    keys = parse_strategy(recipe.schedule.strategy, recipe.optimizers)
    return [(StepKind.BASELINE, None)] + [(kind_of_optimizer(recipe.optimizers[k].type), k) for k in keys]


def finished_steps(run: RunDir) -> list[Step]:
    """The run's finished steps that count in a schedule, init included."""
    return [s for s in run.done_steps() if s.kind in SCHEDULE_KINDS]


def plan_progress(run: RunDir, plan: list[PlanEntry]) -> tuple[list[Step], int]:
    """(the run's finished plan steps: baseline, p and w in order; how many of them match the
    first entries of `plan`, in kind and optimizer key). All of them match in a run of this plan."""
    done = [s for s in finished_steps(run) if s.kind != StepKind.INIT]
    n = 0
    for step, (kind, key) in zip(done, plan):
        if step.kind != kind or (key and step.info.get("optimizer") != key):
            break
        n += 1
    return done, n


def _resume_position(run: RunDir, plan: list[PlanEntry]) -> int:
    """How many plan entries the run has already done; refuse a run made by another schedule."""
    done, n = plan_progress(run, plan)
    if n < len(done):
        made = " -> ".join(s.info.get("optimizer") or s.kind for s in done)
        raise InputError(
            f"{run.path}: its finished steps ({made}) do not match schedule.strategy "
            f"{run.recipe().schedule.strategy!r}; use another --name"
        )
    return len(done)


def _stalled(steps: list[Step], patience: int | None) -> bool:
    """True when the last `patience` steps did not improve on the best dev score before them."""
    if not patience or len(steps) <= patience:
        return False
    before = max(s.scores.get("dev", float("-inf")) for s in steps[:-patience])
    return all(s.scores.get("dev", float("-inf")) <= before for s in steps[-patience:])


# ---------------------------------------------------------------- running
def run_joint(ctx: Context) -> Step:
    """Run (or resume) the recipe's schedule in `ctx`'s run; returns the step that ships (by dev score,
    or by schedule.select), with its test score. The manifest records it as `best`, and `finished`."""
    plan = schedule_plan(ctx.recipe)
    check_steps(ctx.recipe, [key for _, key in plan if key])  # before any step (a sweep comes here directly)
    position = _resume_position(ctx.run, plan)
    for kind, key in plan[position:]:
        scored = [s for s in finished_steps(ctx.run) if "dev" in s.scores]
        if _stalled(scored, ctx.recipe.schedule.patience):
            ctx.run.set_manifest_field("stopped_early", True)
            break
        step = PLANNED[kind](key).run(ctx)
        if step is not None:
            advise(ctx, step)  # what to try, when it stopped early or scored like a constant
    best = record_best(ctx.run)
    last = [s for s in finished_steps(ctx.run) if "dev" in s.scores][-1]
    for step in [best] + ([last] if last.folder != best.folder else []):
        if "test" not in step.scores:
            score_on_test(ctx, step)
    ctx.run.set_manifest_field("finished", True)
    track(ctx.run, ctx.recipe, "FINISHED")  # MLflow, when on: the test scores and the step that ships
    return best


def record_best(run: RunDir) -> Step:
    """Choose the step to ship from the run's steps as they are now (not the manifest's earlier
    choice) and record it as the manifest's `best`; with a schedule.select rule also the rule, its
    choice and why it chose none (`selection`)."""
    shipped = shipping(run, recorded=False)
    if shipped.selection is not None:
        chosen = shipped.selection
        run.set_manifest_field("selection", {"rule": chosen.rule, "step": chosen.folder, "fallback": chosen.fallback})
    run.set_manifest_field("best", shipped.step.folder)
    return shipped.step


def run_joint_seeds(
    recipe_path: Path,
    overrides: list[str] | None = None,
    name: str | None = None,
    runs_dir: Path = Path("runs"),
    force: bool = False,
    seeds: str | None = None,
    init_from: Path | None = None,
    after: Callable[[RunDir], None] | None = None,
) -> list[RunDir]:
    """What `jointopt joint` does: run (or resume) the recipe's schedule as run NAME (default the
    recipe's name), or once per seed of `seeds` ("0,1,2") as NAME/seed-N; each run starts from
    `init_from`'s best program if given. `after(run)` is called when each run has finished. Returns
    the run directories. A bad strategy or seed list fails before any run starts."""
    base = load_recipe(recipe_path, overrides or [])
    check_recipe(base)  # the strategy's steps included: exit 2 before any run directory is made
    runs = [(None, name or base.name)]
    if seeds:
        runs = [(v, f"{name or base.name}/seed-{v}") for v in parse_seeds(seeds)]
    if init_from is not None:
        with about("--init-from"):  # not a run: exit 2 before any run directory is made
            RunDir.existing(init_from)
        warm_start(base, init_from)  # modules that do not fit: exit 2 before any run directory is made too
    done = []
    for seed, run_name in runs:
        extra = [f"seed={seed}"] if seed is not None else []
        with open_run(recipe_path, (overrides or []) + extra, run_name, runs_dir, force) as ctx:
            if init_from is not None:
                init_step(ctx, init_from)
            run_joint(ctx)
            if after is not None:
                after(ctx.run)
            done.append(ctx.run)
    return done
