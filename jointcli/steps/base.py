"""What every kind of step shares: the context it may touch, the interface it offers, and how it runs.

Each step kind has a module of this package with one class, configured by its constructor (what the
command gives: an optimizer key, a split, a path) and run against a run directory by `run(ctx)`, as
DSPy's optimizers take their settings in `__init__` and their data in `compile`:

    EvalStep("dev").run(ctx)            # eval_step.py: the baseline, a later evaluation
    PromptStep("p").run(ctx)            # prompt_step.py: a DSPy prompt optimizer (p)
    BootstrapStep("w").run(ctx)         # bootstrap_step.py: the traces a weight step trains on
    WeightStep("w").run(ctx)            # weight_step.py: LoRA fine-tuning (w), with a soft prompt (s)
    InitStep(Path("runs/other")).run(ctx)   # init_step.py: another run's best program copied in

`ctx` is a `StepContext`; `jointcli.context.Context` is the one implementation. Every step starts from
the run's current program state (the latest finished step's) and a step that changes the program
saves the new state, so steps chain whichever command runs them. `run_step` is the one way a step
enters the manifest: begun, then done, failed or interrupted (and MLflow with it, when a command
tracks: tracking/). step_kinds.py lists the kinds; registry.py says which class runs each kind a
schedule plans.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import dspy

from ..console import console, step_log
from ..errors import JointoptError, StepError
from ..recipe import Recipe
from ..rundir import RunDir, Step
from ..state import ProgramState
from ..step_kinds import StepKind
from ..tracking import track
from .arguments import unchecked_given

if TYPE_CHECKING:
    from ..data import Splits
    from ..models.pool import ModelPool
    from .evaluate import EvalResult


class StepContext(Protocol):
    """What a step may touch: the recipe, the run directory, the data, the metric, the models, and
    the few operations that turn a program state into a runnable program and record its scores."""

    recipe: Recipe
    run: RunDir
    splits: Splits
    metric: Callable
    pool: ModelPool

    def current_program(self, upto: int | None = None) -> tuple[dspy.Module, ProgramState]:
        """The program of the run's latest state (as of step `upto`), models attached."""

    def program_for(self, state: ProgramState) -> dspy.Module:
        """The program of `state`, models attached."""

    def attach(self, program: dspy.Module, state: ProgramState) -> None:
        """Set each predictor's LM from `state` (its model, and its adapter if any)."""

    def trainset(self, step_index: int) -> list[dspy.Example]:
        """The training split, shuffled for this step from the recipe's seed."""

    def evaluate(self, program: dspy.Module, split: str) -> EvalResult:
        """Score `program` on the dev or test split."""

    def record_eval(self, step: Step, result: EvalResult, split: str) -> None:
        """Write the evaluation into the step's folder and its manifest entry."""


class StepRunner(Protocol):
    """One kind of step, configured: `run` adds the step to `ctx`'s run and returns its manifest entry
    (None: nothing to do, e.g. a warm start the run already has)."""

    def run(self, ctx: StepContext) -> Step | None: ...


def run_step(ctx: StepContext, kind: StepKind, body: Callable[[Step], None], info: dict | None = None) -> Step:
    """Begin a step, run `body(step)`; the manifest records success, failure or interruption."""
    step = ctx.run.begin(kind)
    step.info.update(info or {})
    track(ctx.run, ctx.recipe, "RUNNING")  # MLflow (tracking/), when it is on: a no-op otherwise
    start = time.perf_counter()
    try:
        with step_log(ctx.run.step_dir(step) / "dspy.log"):
            body(step)
    except KeyboardInterrupt:
        ctx.run.fail(step, "interrupted", time.perf_counter() - start)
        track(ctx.run, ctx.recipe, "KILLED")
        raise
    except JointoptError as err:
        ctx.run.fail(step, str(err), time.perf_counter() - start)
        track(ctx.run, ctx.recipe, "FAILED")
        raise
    except Exception as err:  # a library failed inside the step: the step failed, not the input
        message = f"step {step.folder} failed: {type(err).__name__}: {err}".splitlines()[0]
        message += unchecked_given(ctx.recipe, step.info.get("optimizer"))  # a value DSPy gave no type to check
        ctx.run.fail(step, message, time.perf_counter() - start)
        track(ctx.run, ctx.recipe, "FAILED")
        raise StepError(message) from err
    ctx.run.finish(step, time.perf_counter() - start)
    track(ctx.run, ctx.recipe, "FINISHED")
    return step


def prompted(run: RunDir) -> bool:
    """Whether the run's program has been through a prompt step (or started from another run's)."""
    return any(s.kind in (StepKind.PROMPT, StepKind.INIT) for s in run.done_steps())


def note(text: str) -> None:
    """One line for the user on the console (stderr), as written: no markup highlighting, no wrapping."""
    console.print(text, highlight=False, soft_wrap=True)
