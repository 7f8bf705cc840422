"""The kinds of step a run records, and what each kind is: the one list of them.

    >>> StepKind("w"), kind_of_optimizer("simultaneous")
    (<StepKind.WEIGHT: 'w'>, <StepKind.SIMULTANEOUS: 's'>)
    >>> [k.value for k in SCHEDULE_KINDS]
    ['init', 'baseline', 'p', 'w', 's', 'g']

A kind's value is written into manifest.json and into the step's folder name (`02-w`), so the values
never change. To add a step kind: add it here with the groups it belongs to, give it a module under
jointcli/steps/ (steps/base.py says what a step is), and, if a strategy letter runs it, an
optimizer type in OPTIMIZER_KINDS.
"""

from __future__ import annotations

from enum import StrEnum


class StepKind(StrEnum):
    """What a step did. The values are written into manifest.json and into folder names (02-w)."""

    INIT = "init"  # another run's best program copied in (joint --init-from)
    BASELINE = "baseline"  # the first evaluation, of the recipe's program
    EVAL = "eval"  # a later evaluation
    PROMPT = "p"  # a prompt optimizer
    WEIGHT = "w"  # LoRA fine-tuning
    SIMULTANEOUS = "s"  # a soft prompt and LoRA trained together
    REINFORCE = "g"  # LoRA trained by GRPO on the metric's rewards
    BOOTSTRAP = "bootstrap"  # traces recorded for a weight step


# the steps that save a program state (state.json; the program of every later step builds on it)
STATE_KINDS = (StepKind.INIT, StepKind.PROMPT, StepKind.WEIGHT, StepKind.SIMULTANEOUS, StepKind.REINFORCE)
# the finished steps that count in a schedule (bootstrap and eval steps feed or report on them)
SCHEDULE_KINDS = (
    StepKind.INIT,
    StepKind.BASELINE,
    StepKind.PROMPT,
    StepKind.WEIGHT,
    StepKind.SIMULTANEOUS,
    StepKind.REINFORCE,
)
# the steps whose program is scored: what compare counts and what may ship (a bootstrap only records traces)
PROGRAM_KINDS = (*SCHEDULE_KINDS, StepKind.EVAL)
# an optimizer's type (recipe `optimizers.<key>.type`) -> the kind of step it runs as
OPTIMIZER_KINDS = {
    "prompt": StepKind.PROMPT,
    "weight": StepKind.WEIGHT,
    "simultaneous": StepKind.SIMULTANEOUS,
    "reinforce": StepKind.REINFORCE,
}


def kind_of_optimizer(optimizer_type: str) -> StepKind:
    """The step kind an optimizer of `optimizer_type` runs as (the recipe's schema admits only these types)."""
    return OPTIMIZER_KINDS[optimizer_type]
