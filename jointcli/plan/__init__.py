"""`jointopt plan`: what each step of a recipe's schedule will cost, before it runs.

    from jointcli.recipe import load_recipe
    from jointcli.plan import build_plan
    plan = build_plan(load_recipe("recipes/sst2.yaml"), probe=False)   # counts only: no weights read
    [(s.step, s.phases["dev"].calls.expected) for s in plan.steps[:2]]  # [('00-baseline', 100), ('01-p', 100)]

Steps: the baseline, each step of `schedule.strategy`, the final test evaluation. For each phase of a
step (a prompt optimizer's calls, a weight step's bootstrap and training, the dev or test evaluation):
- LM calls: evaluations and bootstraps run every example through every predictor (exact); a prompt
  optimizer's count comes from DSPy 3.4's own formulas at its settings (`Calls`: a range where the
  count depends on what the model answers, `approximate` where DSPy's own estimate is one): calls.py;
- tokens: each predictor's prompt as its adapter formats it, with the demos the program holds at
  that step (taken from the training split), counted by its model's tokenizer (characters / 4
  without one: approximate); completions at most `max_tokens`: prompts.py;
- weight steps: the LoRA parameters PEFT trains (the model built from config.json on the `meta`
  device: no weights are read) and the memory of LoRA against full fine-tuning, with a warning when
  it exceeds what this machine has: sizes.py;
- with a probe (local models), seconds: a few dozen real generations, batched as an evaluation runs
  them, one alone as BootstrapFewShot's teacher runs them, and a real LoRA optimizer step on rows
  like the first weight step's, extrapolated by calls, prompt tokens and training steps: probe.py.

estimate.py puts them together (build_plan); result.py holds what a plan is; tables.print_plan
prints it.
"""

from .calls import optimizer_calls
from .estimate import build_plan
from .probe import Probe
from .result import Calls, Phase, Plan, StepPlan
from .sizes import lora_parameters, model_facts

__all__ = [
    "Calls",
    "Phase",
    "Plan",
    "Probe",
    "StepPlan",
    "build_plan",
    "lora_parameters",
    "model_facts",
    "optimizer_calls",
]
