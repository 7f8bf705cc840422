"""The prompt step (p): one of DSPy's prompt optimizers on the run's current program.

    PromptStep("p").run(ctx)        # what `jointopt optimize-prompts` and a strategy's `p` do: NN-p

The optimizer is the recipe's `optimizers.<key>` (prompts.py builds it); the modules it does not
name keep their prompts; the new program is saved as the run's state and scored on dev.
"""

from __future__ import annotations

import dspy

from ..checks import step_optimizer
from ..console import phase
from ..program import module_names
from ..recipe import PromptOptimizer
from ..rundir import Step
from ..state import save_state
from ..step_kinds import StepKind
from .base import StepContext, run_step
from .prompts import make_optimizer, optimize_prompts


class PromptStep:
    """Optimize the prompts of the modules that optimizer `key` names."""

    def __init__(self, key: str):
        self.key = key

    def run(self, ctx: StepContext) -> Step:
        spec: PromptOptimizer = step_optimizer(ctx.recipe, self.key, PromptOptimizer)
        info = {"optimizer": self.key, "name": spec.optimizer}
        return run_step(ctx, StepKind.PROMPT, lambda step: self._optimize(ctx, spec, step), info)

    def _optimize(self, ctx: StepContext, spec: PromptOptimizer, step: Step) -> None:
        program, state = ctx.current_program()
        names = module_names(ctx.recipe, program)
        chosen = names if spec.modules == "all" else list(spec.modules)
        reflection = ctx.pool.get(spec.reflection_model, None) if spec.reflection_model else None
        seed = ctx.recipe.seed + step.index
        optimizer = make_optimizer(self.key, spec, ctx.metric, ctx.recipe.runtime.num_threads, seed, reflection)
        lm = next(p.lm for _, p in program.named_predictors())
        # optimizers that propose instructions use the settings' LM
        with dspy.context(lm=lm), phase(f"prompt step {self.key} ({spec.optimizer})", total=None):
            optimized = optimize_prompts(program, spec, optimizer, ctx.trainset(step.index), chosen, names, seed)
        ctx.attach(optimized, state)
        save_state(ctx.run, ctx.run.step_dir(step), optimized, state)
        ctx.record_eval(step, ctx.evaluate(optimized, "dev"), "dev")


def prompt_step(ctx: StepContext, key: str) -> Step:
    """`PromptStep(key).run(ctx)`: what `jointopt optimize-prompts` runs."""
    return PromptStep(key).run(ctx)
