"""What every command that runs steps sets up: recipe, run directory, data, metric, models and DSPy settings.

    with open_run(Path("recipes/sst2.yaml"), ["data.split.dev=20"], name="quick", runs_dir=Path("runs")) as ctx:
        program, state = ctx.current_program()
        ctx.evaluate(program, "dev").score
    ctx = Context.open(recipe, runs_root=Path("runs"), name="sst2")   # the same, closed by ctx.close()

A step records an evaluation with `ctx.record_eval(step, ctx.evaluate(program, "dev"), "dev")`.
Context is the one implementation of what a step may touch (steps/base.py: StepContext).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dspy

from .checks import check_recipe
from .console import prints_to_stderr
from .data import Splits, load_splits
from .errors import InputError, StepError
from .files import write_json, write_jsonl
from .metrics import build_metric
from .models.pool import ModelPool
from .program import build_program
from .recipe import Recipe, load_recipe
from .rundir import RunDir, Step, eval_files
from .state import ProgramState, attach_models, current_state, load_program
from .steps.evaluate import EvalResult, evaluate
from .steps.knn import apply_knn
from .weights.checkpoint import jointopt_home

_cache_setting: bool | None = None


def configure_dspy(recipe: Recipe) -> None:
    """DSPy settings for small local models: ChatAdapter without the JSON fallback (it doubles the
    calls and never helps a 135M model), the optimizers' error budget (runtime.max_errors), and the LM
    cache kept under $JOINTOPT_HOME."""
    global _cache_setting
    if _cache_setting != recipe.runtime.cache:
        dspy.configure_cache(
            enable_disk_cache=recipe.runtime.cache,
            enable_memory_cache=recipe.runtime.cache,
            disk_cache_dir=str(jointopt_home() / "dspy_cache"),
        )
        _cache_setting = recipe.runtime.cache
    dspy.configure(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False), max_errors=recipe.runtime.max_errors)


@dataclass
class Context:
    recipe: Recipe
    run: RunDir
    splits: Splits
    metric: Callable
    pool: ModelPool

    @classmethod
    def open(cls, recipe: Recipe, runs_root: Path, name: str | None = None, force: bool = False) -> Context:
        # bad input fails before a run directory is made; what steps need is checked by what runs them
        # (run_joint: the strategy's; a step command: its --optimizer's), so `eval` takes any strategy
        check_recipe(recipe, steps=())
        splits = load_splits(recipe.data)
        metric = build_metric(recipe.metric, recipe.label_field)
        run = RunDir.open(runs_root, name or recipe.name, recipe, force=force)
        manifest = run.manifest()
        if manifest.get("data_fingerprint") not in (None, splits.fingerprint) and not force:
            run.unlock()
            raise InputError(f"{run.path}: its data splits changed since the run began; use another --name, or --force")
        run.set_manifest_field("data_fingerprint", splits.fingerprint)
        configure_dspy(recipe)
        return cls(recipe, run, splits, metric, ModelPool(recipe))

    def close(self) -> None:
        self.run.unlock()

    def current_program(self, upto: int | None = None) -> tuple[dspy.Module, ProgramState]:
        """The program of the run's latest state (as of step `upto`), with models and adapters attached."""
        state = current_state(self.run, self.recipe, build_program(self.recipe), upto)
        return self.program_for(state), state

    def program_for(self, state: ProgramState) -> dspy.Module:
        program = load_program(self.run, self.recipe, state)
        self.attach(program, state)
        return program

    def attach(self, program: dspy.Module, state: ProgramState) -> None:
        attach_models(program, self.recipe, state, self.run.path, self.pool)
        if state.knn:  # a KNNFewShot step's neighbour lookup, which program.json does not hold
            apply_knn(program, state.knn, self)

    def trainset(self, step_index: int) -> list[dspy.Example]:
        """The training split, reshuffled for each step from the recipe's seed (deterministic)."""
        examples = list(self.splits.train)
        random.Random(self.recipe.seed * 100_003 + step_index).shuffle(examples)
        return examples

    def evaluate(self, program: dspy.Module, split: str) -> EvalResult:
        """Score `program` on a split; too many errors fail the step once record_eval has written them."""
        examples = getattr(self.splits, split)
        threads = self.recipe.runtime.num_threads
        return evaluate(program, examples, self.metric, threads, label=f"{split} eval", check=False)

    def record_eval(self, step: Step, result: EvalResult, split: str) -> None:
        """eval.json + predictions.jsonl (dev) or eval-test.json + predictions-test.jsonl (test), and
        failures-<split>.jsonl when examples failed; then a StepError when more of them raised an error
        than runtime.max_error_rate allows (the step fails, its files kept to look at)."""
        folder = self.run.step_dir(step)
        summary_file, predictions_file, failures_file = eval_files(split)
        write_jsonl(folder / predictions_file, result.rows)
        write_json(folder / summary_file, {"split": split, **result.summary()})
        if failures := result.failures():
            write_jsonl(folder / failures_file, failures)
        else:  # a test evaluation scored again: an earlier try's failures are not this one's
            (folder / failures_file).unlink(missing_ok=True)
        step.info[f"{split}_n"] = result.n
        step.info[f"{split}_parse_failures"] = result.parse_failures
        step.info[f"{split}_errors"] = result.errors
        where = f"{folder.name}/{failures_file}"
        if error := result.too_many_errors(self.recipe.runtime.max_error_rate, where):
            raise StepError(f"{split} eval: {error}")
        step.scores[split] = result.score
        step.tokens["in"] = step.tokens.get("in", 0) + result.tokens_in
        step.tokens["out"] = step.tokens.get("out", 0) + result.tokens_out
        if result.answer_summary is not None:
            summary = result.answer_summary.to_json()
            step.info[f"{split}_answers"] = summary["answers"]
            step.info[f"{split}_majority"] = summary["majority_score"]
        step.info[f"{split}_warnings"] = result.warnings


@contextmanager
def open_run(
    recipe_path: Path, overrides: list[str] | None, name: str | None, runs_dir: Path, force: bool = False
) -> Iterator[Context]:
    """The Context of run `name` (default: the recipe's name) for a recipe file and its overrides;
    closed (the run unlocked) however the block ends."""
    with prints_to_stderr():  # what libraries and user code print while the run works is log, not result
        ctx = Context.open(load_recipe(recipe_path, overrides or []), runs_dir, name, force)
        try:
            yield ctx
        finally:
            ctx.close()
