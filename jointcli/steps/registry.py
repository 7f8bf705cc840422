"""Which step class runs each kind of step a schedule plans: the schedule dispatches through here.

    PLANNED[StepKind.PROMPT]("p").run(ctx)      # a strategy's `p`: PromptStep("p")
    PLANNED[StepKind.BASELINE](None).run(ctx)   # the baseline: EvalStep("dev")

Each entry takes the plan entry's optimizer key (None for the baseline) and gives a StepRunner
(base.py). The warm start (init) is no strategy step: `joint --init-from` runs it before the plan.
"""

from __future__ import annotations

from collections.abc import Callable

from ..step_kinds import StepKind
from .base import StepRunner
from .eval_step import EvalStep
from .prompt_step import PromptStep
from .reinforce_step import ReinforceStep
from .weight_step import WeightStep


def _baseline(key: str | None) -> StepRunner:
    """The baseline: the recipe's program scored on dev (it has no optimizer key)."""
    return EvalStep("dev")


PLANNED: dict[StepKind, Callable[[str | None], StepRunner]] = {
    StepKind.BASELINE: _baseline,
    StepKind.PROMPT: PromptStep,
    StepKind.WEIGHT: WeightStep,
    StepKind.SIMULTANEOUS: WeightStep,
    StepKind.REINFORCE: ReinforceStep,
}
