"""The schedule: run a strategy such as `p -> w -> p` over a run directory, resumably.

    keys = parse_strategy("p -> w -> p", recipe.optimizers)      # ["p", "w", "p"]
    summary = run_joint(ctx)

Plan: baseline, then one step per letter, each followed by a dev evaluation (inside the step);
then the best program by dev score (ties go to the earlier step) and the last one are evaluated
on the test split. Finished steps found in the manifest are not repeated, so running the same
command again after a crash or Ctrl-C resumes where it stopped.
"""

from __future__ import annotations

from .errors import InputError
from .recipe import PromptOptimizer

STEP_KIND = {"prompt": "p", "weight": "w"}
ZERO_SHOT = ("", "none", "zero-shot")


def parse_strategy(text: str, optimizers: dict) -> list[str]:
    """'p -> w -> p' -> ['p', 'w', 'p']; each letter must be a key of `optimizers`."""
    if text.strip().lower() in ZERO_SHOT:
        return []
    keys = [part.strip() for part in text.split("->")]
    for key in keys:
        if not key:
            raise InputError(f"schedule.strategy: {text!r} has an empty step; write steps like 'p -> w -> p'")
        if key not in optimizers:
            raise InputError(f"schedule.strategy: unknown step {key!r} in {text!r}; "
                             f"steps are the keys of optimizers: {', '.join(optimizers) or 'none'}")
    return keys


def _plan(recipe) -> list[tuple[str, str | None]]:
    """[(step kind, optimizer key)] including the baseline."""
    keys = parse_strategy(recipe.schedule.strategy, recipe.optimizers)
    return [("baseline", None)] + [(STEP_KIND[recipe.optimizers[k].type], k) for k in keys]


def _finished(run) -> list:
    """Finished steps that count in a schedule (bootstrap and eval steps feed or report on them)."""
    return [s for s in run.done_steps() if s.kind in ("init", "baseline", "p", "w")]


def _match(run, plan) -> int:
    """How many plan entries the run has already done; refuse a run made by another schedule."""
    done = [s for s in _finished(run) if s.kind != "init"]
    for i, step in enumerate(done):
        if i >= len(plan) or step.kind != plan[i][0] or (plan[i][1] and step.info.get("optimizer") != plan[i][1]):
            made = " -> ".join(s.info.get("optimizer") or s.kind for s in done)
            raise InputError(f"{run.path}: its finished steps ({made}) do not match schedule.strategy "
                             f"{run.recipe().schedule.strategy!r}; use another --name")
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


def run_joint(ctx) -> dict:
    """Run (or resume) the recipe's schedule; returns the manifest's summary."""
    from .steps.run import eval_step, prompt_step, test_eval, weight_step

    plan = _plan(ctx.recipe)
    position = _match(ctx.run, plan)
    for kind, key in plan[position:]:
        scored = [s for s in _finished(ctx.run) if "dev" in s.scores]
        if _stalled(scored, ctx.recipe.schedule.patience):
            ctx.run.set_manifest_field("stopped_early", True)
            break
        if kind == "baseline":
            eval_step(ctx, "dev")
        elif isinstance(ctx.recipe.optimizers[key], PromptOptimizer):
            prompt_step(ctx, key)
        else:
            weight_step(ctx, key)
    scored = [s for s in _finished(ctx.run) if "dev" in s.scores]
    best, last = best_step(scored), scored[-1]
    ctx.run.set_manifest_field("best", best.folder)
    for step in [best] + ([last] if last.folder != best.folder else []):
        if "test" not in step.scores:
            test_eval(ctx, step)
    summary = {"best": best.folder, "last": last.folder, "strategy": ctx.recipe.schedule.strategy}
    ctx.run.set_manifest_field("finished", True)
    return summary
