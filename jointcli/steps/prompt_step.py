"""The prompt step (p): one of DSPy's prompt optimizers on the run's current program.

    PromptStep("p").run(ctx)        # what `jointopt optimize-prompts` and a strategy's `p` do: NN-p

The optimizer is the recipe's `optimizers.<key>` (prompts.py builds it); the modules it does not
name keep their prompts; the new program is saved as the run's state and scored on dev. An optimizer
that bootstraps demos first runs the program it would bootstrap with on a few training examples, in
parallel; when none of them parses, no demo can come out of it, and the step stops in seconds instead of
minutes: it keeps the program as it was and records why in its manifest entry (`stopped_early`).

KNNFewShot compiles nothing: its program looks up the k training examples nearest each input while it
runs (knn.py). The step records that lookup in its state (`knn`), and every later command that makes
the state a program again (Context.attach) rebuilds it. A later prompt step optimizes the program's
prompts without the lookup, and its state has none.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import dspy

from ..checks import step_optimizer
from ..console import phase
from ..program import module_names
from ..recipe import PromptOptimizer
from ..rundir import Step
from ..state import ProgramState, save_state
from ..step_kinds import StepKind
from .base import StepContext, note, run_step
from .knn import knn_record, row_of_examples, without_knn
from .prompts import cannot_bootstrap, make_optimizer, optimize_prompts
from .proposals import ProposalAdapter


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
        program, state = without_knn(program), replace(state, knn=None)  # the prompts, without a KNN lookup
        names = module_names(ctx.recipe, program)
        chosen = names if spec.modules == "all" else list(spec.modules)
        trainset = ctx.trainset(step.index)
        if spec.optimizer == "KNNFewShot":  # ctx.attach gives the program the lookup the state records
            self._finish(ctx, step, program, self._with_knn(ctx, spec, state, trainset))
            return
        optimizer = make_optimizer(self.key, spec, self._supplied(ctx, spec, program, chosen, trainset, step))
        lm = self._own_lm(program, chosen)
        adapter = ProposalAdapter(program)
        # optimizers that propose instructions use the settings' LM; their proposals parse leniently
        with dspy.context(lm=lm, adapter=adapter), phase(f"prompt step {self.key} ({spec.optimizer})", total=None):
            stop = cannot_bootstrap(optimizer, spec, program, trainset, ctx.recipe.runtime.num_threads)
            if stop is None:
                optimized = optimize_prompts(
                    program, spec, optimizer, trainset, chosen, names, ctx.recipe.seed + step.index
                )
        if stop is not None:  # the program as it was, scored on dev (DSPy's cache answers what was asked before)
            optimized, step.info["stopped_early"] = program, stop
            note(f"prompt step {self.key} ({spec.optimizer}) stopped: {stop}; the program is kept as it was")
        if adapter.summary():
            note(f"prompt step {self.key} ({spec.optimizer}): {adapter.summary()}")
            step.info["proposals"] = {"made": adapter.proposals, "kept_current": adapter.kept}
        self._finish(ctx, step, optimized, state)

    @staticmethod
    def _finish(ctx: StepContext, step: Step, optimized: dspy.Module, state: ProgramState) -> None:
        """Attach the models (and a KNN lookup), save the new state, score it on dev."""
        ctx.attach(optimized, state)
        save_state(ctx.run, ctx.run.step_dir(step), optimized, state)
        ctx.record_eval(step, ctx.evaluate(optimized, "dev"), "dev")

    @staticmethod
    def _with_knn(ctx: StepContext, spec: PromptOptimizer, state: ProgramState, trainset: list) -> ProgramState:
        """The state with KNNFewShot's lookup: its args, the step's training examples, the model that
        embeds them (that of the program's first module, its base weights)."""
        model = state.modules[next(iter(state.modules))].model
        return replace(state, knn=knn_record(spec, model, trainset, row_of_examples(ctx)))

    @staticmethod
    def _own_lm(program: dspy.Module, chosen: list[str]) -> dspy.LM:
        """The LM of the first module the optimizer changes: the default prompt and task model."""
        predictors = dict(program.named_predictors())
        name = next((n for n in predictors if any(n == m or n.startswith(m + ".") for m in chosen)), None)
        return predictors[name or next(iter(predictors))].lm

    def _supplied(self, ctx, spec: PromptOptimizer, program, chosen, trainset, step: Step) -> dict:
        """What jointopt hands the optimizer's constructor, where it takes it and the recipe did not set it."""
        own = self._own_lm(program, chosen)
        models = {
            name: ctx.pool.get(getattr(spec, field)) if getattr(spec, field) else own
            for name, field in (("prompt_model", "prompt_model"), ("task_model", "task_model"))
        }
        models["prompt_model"] = quiet(models["prompt_model"])
        reflection = ctx.pool.get(spec.reflection_model) if spec.reflection_model else None
        supplied = {"metric": ctx.metric, "num_threads": ctx.recipe.runtime.num_threads}
        supplied |= {"seed": ctx.recipe.seed + step.index, "reflection_lm": reflection, **models}
        return supplied


def quiet(lm: dspy.LM) -> dspy.LM:
    """A copy of `lm` whose inspect_history prints nothing: COPRO logs the prompt model's history at
    debug level, but builds the message first, and building it prints the history (DSPy's
    inspect_history prints), whatever the logging level. Answers and their cache are the LM's own."""
    copied = copy.copy(lm)
    copied.inspect_history = lambda n=1, file=None: None
    return copied


def prompt_step(ctx: StepContext, key: str) -> Step:
    """`PromptStep(key).run(ctx)`: what `jointopt optimize-prompts` runs."""
    return PromptStep(key).run(ctx)
