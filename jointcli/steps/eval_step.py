"""The evaluation step: score the run's current program on a split (the baseline, or a later `eval`).

    EvalStep("dev").run(ctx)        # what `jointopt eval` and a schedule's baseline do: 00-baseline
    score_on_test(ctx, step)        # a finished step's program on the test split, into its folder

The first evaluation of a run is its baseline (also after a warm start, init); later ones are `eval`
steps. A test score is recorded into the step whose program it scores, not as a step of its own.
"""

from __future__ import annotations

from ..console import step_log
from ..rundir import Step
from ..step_kinds import StepKind
from .base import StepContext, run_step


class EvalStep:
    """Evaluate the run's current program on `split` (dev or test) as a step of its own."""

    def __init__(self, split: str = "dev"):
        self.split = split

    def run(self, ctx: StepContext) -> Step:
        program, _ = ctx.current_program()
        first = all(s.kind == StepKind.INIT for s in ctx.run.done_steps())
        kind = StepKind.BASELINE if first else StepKind.EVAL
        return run_step(ctx, kind, lambda step: ctx.record_eval(step, ctx.evaluate(program, self.split), self.split))


def eval_step(ctx: StepContext, split: str = "dev") -> Step:
    """`EvalStep(split).run(ctx)`: what `jointopt eval` runs."""
    return EvalStep(split).run(ctx)


def score_on_test(ctx: StepContext, step: Step) -> None:
    """Score a finished step's program on the test split, into that step's folder; a StepError when
    more examples raised than runtime.max_error_rate allows."""
    program, _ = ctx.current_program(upto=step.index)
    with step_log(ctx.run.step_dir(step) / "dspy-test.log"):
        result = ctx.evaluate(program, "test")
    try:
        ctx.record_eval(step, result, "test")
    finally:  # too many errors: the counts are recorded, the test score is not (a resume scores it again)
        ctx.run.update(step)
