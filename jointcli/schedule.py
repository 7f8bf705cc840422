"""The schedule: run a strategy such as `p -> w -> p` over a run directory, resumably.

    keys = parse_strategy("p -> w -> p", recipe.optimizers)      # ["p", "w", "p"]
    best = run_joint(ctx)                                         # the best step, scored on test
    runs = run_joint_seeds(Path("recipes/sst2.yaml"), seeds="0,1,2")   # what `jointopt joint` does

Plan: baseline, then one step per letter, each followed by a dev evaluation (inside the step);
then the best program (by dev score, ties to the earlier step; or by the recipe's `schedule.select`
rule, selection.py) and the last one are evaluated on the test split. Finished steps found in the
manifest are not repeated, so running the same command again after a crash or Ctrl-C resumes where
it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError
from .recipe import PromptOptimizer, did_you_mean
from .rundir import RunDir, Step, StepKind

if TYPE_CHECKING:
    from .context import Context

STEP_KIND = {
    "prompt": StepKind.PROMPT,
    "weight": StepKind.WEIGHT,  # optimizer type -> its step's kind
    "simultaneous": StepKind.SIMULTANEOUS,
}
ZERO_SHOT = ("none", "zero-shot")  # an empty strategy is an error: a value lost on its way, not a choice
# the finished steps that count in a schedule (bootstrap and eval steps feed or report on them)
SCHEDULE_KINDS = (StepKind.INIT, StepKind.BASELINE, StepKind.PROMPT, StepKind.WEIGHT, StepKind.SIMULTANEOUS)

PlanEntry = tuple[str, str | None]  # (step kind, optimizer key); the baseline has no key


def parse_strategy(text: str, optimizers: dict, where: str = "schedule.strategy") -> list[str]:
    """'p -> w -> p' -> ['p', 'w', 'p']; each letter must be a key of `optimizers`. `where` names the
    strategy's origin in errors (a sweep's --strategies)."""
    if text.strip().lower() in ZERO_SHOT:
        return []
    if not text.strip():
        raise InputError(f"{where}: empty; write steps like 'p -> w -> p', or 'none' for zero-shot")
    keys = [part.strip() for part in text.split("->")]
    for key in keys:
        if not key:
            raise InputError(f"{where}: {text!r} has an empty step; write steps like 'p -> w -> p'")
        if key not in optimizers:
            raise InputError(
                f"{where}: unknown step {key!r} in {text!r}; steps are the keys of "
                f"optimizers: {', '.join(optimizers) or 'none'}{did_you_mean(key, optimizers)}"
            )
    return keys


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: at least one seed, each once, none negative (as the recipe's `seed`)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--seeds: {text!r} is not a comma-separated list of integers") from None
    if not values or len(set(values)) != len(values):
        raise InputError(f"--seeds: {text!r} must name at least one seed, each once")
    if min(values) < 0:
        raise InputError(f"--seeds: {text!r}: seeds are integers from 0")
    return values


def pick_optimizer(recipe, key: str | None, optimizer_type: str) -> str:
    """The optimizer key a step uses: `key` (--optimizer) if given, else the recipe's first optimizer
    of that type ("prompt" or "weight")."""
    if key is not None:
        return key
    for k, spec in recipe.optimizers.items():
        if spec.type == optimizer_type:
            return k
    raise InputError(f"optimizers: the recipe has no {optimizer_type} optimizer")


# ---------------------------------------------------------------- plan and progress
def schedule_plan(recipe) -> list[PlanEntry]:
    """[(step kind, optimizer key)] of the recipe's strategy, including the baseline."""
    keys = parse_strategy(recipe.schedule.strategy, recipe.optimizers)
    return [(StepKind.BASELINE, None)] + [(STEP_KIND[recipe.optimizers[k].type], k) for k in keys]


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


def best_step(steps: list):
    """The step with the highest dev score; ties go to the earlier step."""
    best = None
    for s in steps:
        if "dev" in s.scores and (best is None or s.scores["dev"] > best.scores["dev"]):
            best = s
    return best


def _stalled(steps: list, patience: int | None) -> bool:
    """True when the last `patience` steps did not improve on the best dev score before them."""
    if not patience or len(steps) <= patience:
        return False
    before = max(s.scores.get("dev", float("-inf")) for s in steps[:-patience])
    return all(s.scores.get("dev", float("-inf")) <= before for s in steps[-patience:])


# ---------------------------------------------------------------- running
def run_joint(ctx: Context) -> Step:
    """Run (or resume) the recipe's schedule in `ctx`'s run; returns the best step (by dev score, or
    by schedule.select), with its test score. The manifest records it as `best`, and `finished`."""
    from .checks import check_steps
    from .steps.kinds import eval_step, prompt_step, test_eval, weight_step

    plan = schedule_plan(ctx.recipe)
    check_steps(ctx.recipe, [key for _, key in plan if key])  # before any step (a sweep comes here directly)
    position = _resume_position(ctx.run, plan)
    for kind, key in plan[position:]:
        scored = [s for s in finished_steps(ctx.run) if "dev" in s.scores]
        if _stalled(scored, ctx.recipe.schedule.patience):
            ctx.run.set_manifest_field("stopped_early", True)
            break
        if kind == StepKind.BASELINE:
            eval_step(ctx, "dev")
        elif isinstance(ctx.recipe.optimizers[key], PromptOptimizer):
            prompt_step(ctx, key)
        else:
            weight_step(ctx, key)
    scored = [s for s in finished_steps(ctx.run) if "dev" in s.scores]
    best, last = _select(ctx, scored), scored[-1]
    ctx.run.set_manifest_field("best", best.folder)
    for step in [best] + ([last] if last.folder != best.folder else []):
        if "test" not in step.scores:
            test_eval(ctx, step)
    ctx.run.set_manifest_field("finished", True)
    return best


def _select(ctx: Context, scored: list[Step]) -> Step:
    """The step to ship: the best dev score, or the one the recipe's schedule.select chooses; then the
    manifest also records the rule, the choice and why the rule chose none (`selection`)."""
    from .selection import choose_step

    select = ctx.recipe.schedule.select
    if select is None:
        return best_step(scored)
    chosen = choose_step(ctx.run.path, finished_steps(ctx.run), select)
    ctx.run.set_manifest_field("selection", {"rule": chosen.rule, "step": chosen.folder, "fallback": chosen.fallback})
    return next(s for s in scored if s.folder == chosen.folder)


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
    from .checks import about, check_recipe
    from .context import open_run
    from .recipe import load_recipe
    from .steps.kinds import init_step, warm_start

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
