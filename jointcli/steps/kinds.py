"""Each kind of step, run against a run directory: begin, work, record, finish (or fail).

    eval_step(ctx, "dev");  prompt_step(ctx, "p");  bootstrap_step(ctx, "w");  weight_step(ctx, "w")

Every step starts from the run's current program state (the latest finished step's) and a step
that changes the program saves the new state, so steps chain whichever command runs them. What
a step may touch is `StepContext`; `jointcli.context.Context` is the one implementation.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import dspy

from ..checks import step_optimizer
from ..console import console, phase, step_log
from ..errors import InputError, JointoptError, StepError
from ..files import read_jsonl, write_json, write_jsonl
from ..program import build_program, model_of, module_names, predictors_of
from ..recipe import LocalModel, PromptOptimizer, Recipe, SimultaneousOptimizer, WeightOptimizer
from ..rundir import RunDir, Step, StepKind
from ..state import ModuleState, ProgramState, current_state, load_program, save_state
from ..weights.checkpoint import resolve_checkpoint

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


def run_step(ctx: StepContext, kind: StepKind, body: Callable[[Step], None], info: dict | None = None) -> Step:
    """Begin a step, run `body(step)`; the manifest records success, failure or interruption."""
    step = ctx.run.begin(kind)
    step.info.update(info or {})
    start = time.perf_counter()
    try:
        with step_log(ctx.run.step_dir(step) / "dspy.log"):
            body(step)
    except KeyboardInterrupt:
        ctx.run.fail(step, "interrupted", time.perf_counter() - start)
        raise
    except JointoptError as err:
        ctx.run.fail(step, str(err), time.perf_counter() - start)
        raise
    except Exception as err:  # a library failed inside the step: the step failed, not the input
        message = f"step {step.folder} failed: {type(err).__name__}: {err}".splitlines()[0]
        ctx.run.fail(step, message, time.perf_counter() - start)
        raise StepError(message) from err
    ctx.run.finish(step, time.perf_counter() - start)
    return step


# ---------------------------------------------------------------- eval
def eval_step(ctx: StepContext, split: str = "dev") -> Step:
    program, _ = ctx.current_program()
    # the first evaluation of a run is its baseline, also after a warm start (init)
    first = all(s.kind == StepKind.INIT for s in ctx.run.done_steps())
    kind = StepKind.BASELINE if first else StepKind.EVAL
    return run_step(ctx, kind, lambda step: ctx.record_eval(step, ctx.evaluate(program, split), split))


def test_eval(ctx: StepContext, step: Step) -> None:
    """Score a finished step's program on the test split, into that step's folder."""
    program, _ = ctx.current_program(upto=step.index)
    with step_log(ctx.run.step_dir(step) / "dspy-test.log"):
        result = ctx.evaluate(program, "test")
    ctx.record_eval(step, result, "test")
    ctx.run.update(step)


# ---------------------------------------------------------------- p
def prompt_step(ctx: StepContext, key: str) -> Step:
    from .prompts import make_optimizer, optimize_prompts

    spec: PromptOptimizer = step_optimizer(ctx.recipe, key, PromptOptimizer)

    def body(step: Step) -> None:
        program, state = ctx.current_program()
        names = module_names(ctx.recipe, program)
        chosen = names if spec.modules == "all" else list(spec.modules)
        reflection = ctx.pool.get(spec.reflection_model, None) if spec.reflection_model else None
        seed = ctx.recipe.seed + step.index
        optimizer = make_optimizer(key, spec, ctx.metric, ctx.recipe.runtime.num_threads, seed, reflection)
        lm = next(p.lm for _, p in program.named_predictors())
        # optimizers that propose instructions use the settings' LM
        with dspy.context(lm=lm), phase(f"prompt step {key} ({spec.optimizer})", total=None):
            optimized = optimize_prompts(program, spec, optimizer, ctx.trainset(step.index), chosen, names, seed)
        ctx.attach(optimized, state)
        save_state(ctx.run, ctx.run.step_dir(step), optimized, state)
        ctx.record_eval(step, ctx.evaluate(optimized, "dev"), "dev")

    return run_step(ctx, StepKind.PROMPT, body, {"optimizer": key, "name": spec.optimizer})


# ---------------------------------------------------------------- bootstrap
def _collect(ctx: StepContext, spec: WeightOptimizer, step_index: int):
    from .traces import collect_traces, label_fields, label_traces
    from .weights import weight_modules

    program, state = ctx.current_program()
    names = module_names(ctx.recipe, program)
    modules = weight_modules(ctx.recipe, spec, names, state.modules)
    trainset = ctx.trainset(step_index)  # not empty, and a teacher named: checked with the recipe (checks.py)
    source = spec.traces.source
    if source == "labels":  # one `predict` module: checked with the recipe too
        return label_traces(program, trainset, names[0])
    if source == "teacher":
        teacher_state = ProgramState(state.program_file, {m: ModuleState(spec.traces.teacher) for m in state.modules})
        program = ctx.program_for(teacher_state)
    gold = label_fields(program, modules, ctx.recipe.data.labels) if source == "program+labels" else None
    return collect_traces(
        program,
        trainset,
        ctx.metric,
        modules,
        spec.traces.threshold,
        ctx.recipe.runtime.num_threads,
        gold,
        source="teacher" if source == "teacher" else "program",
        all_modules=names,
    )


def _write_traces(folder: Path, traces) -> dict:
    """traces.jsonl, traces.json (counts) and, when examples failed to run, failures.jsonl: the errors
    go to the file, the console gets one line."""
    write_jsonl(folder / "traces.jsonl", traces.rows)
    counts = traces.counts()
    write_json(folder / "traces.json", counts)
    if traces.failures:
        write_jsonl(folder / "failures.jsonl", traces.failures)
        where = Counter(f["module"] for f in traces.failures)
        first = traces.failures[0]["error"].splitlines()[0][:160]
        console.print(
            f"{len(traces.failures)} of {traces.run} examples failed to run (in "
            f"{', '.join(f'{m}: {n}' for m, n in where.most_common())}), e.g. {first}; all in "
            f"{folder.name}/failures.jsonl",
            highlight=False,
            soft_wrap=True,
        )
    return counts


def bootstrap_step(ctx: StepContext, key: str) -> Step:
    spec: WeightOptimizer = step_optimizer(ctx.recipe, key, WeightOptimizer)

    def body(step: Step) -> None:
        counts = _write_traces(ctx.run.step_dir(step), _collect(ctx, spec, step.index))
        step.info["traces"] = counts
        if not counts["rows"]:
            from .weights import no_traces_error

            raise no_traces_error(counts, spec, _prompted(ctx.run))

    return run_step(ctx, StepKind.BOOTSTRAP, body, {"optimizer": key, "source": spec.traces.source})


def _prompted(run: RunDir) -> bool:
    """Whether the run's program has been through a prompt step (or started from another run's)."""
    return any(s.kind in (StepKind.PROMPT, StepKind.INIT) for s in run.done_steps())


def fresh_traces(run: RunDir) -> Path | None:
    """traces.jsonl of a bootstrap step made since the program last changed, if any."""
    for step in reversed(run.done_steps()):
        folder = run.step_dir(step)
        if step.kind == StepKind.BOOTSTRAP and (folder / "traces.jsonl").exists():
            return folder / "traces.jsonl"
        if (folder / "state.json").exists():
            return None
    return None


# ---------------------------------------------------------------- w
def weight_step(ctx: StepContext, key: str, traces_path: Path | None = None) -> Step:
    from .weights import group_rows, no_traces_error, train_adapters, weight_modules

    spec: WeightOptimizer = step_optimizer(ctx.recipe, key, WeightOptimizer)
    if traces_path is not None and not Path(traces_path).is_file():
        raise InputError(f"--traces: {traces_path} is not a file")

    def body(step: Step) -> None:
        folder = ctx.run.step_dir(step)
        source = traces_path or fresh_traces(ctx.run)
        if source is not None:
            rows = read_jsonl(Path(source))
            counts = {"rows": len(rows), "from": str(source)}
            shutil.copyfile(source, folder / "traces.jsonl")
        else:
            traces = _collect(ctx, spec, step.index)
            rows, counts = traces.rows, _write_traces(folder, traces)
        step.info["traces"] = counts
        program, state = ctx.current_program()
        modules = weight_modules(ctx.recipe, spec, module_names(ctx.recipe, program), state.modules)
        groups = group_rows(rows, modules, state.modules, shared=spec.adapters == "shared")
        if not groups:
            raise no_traces_error(counts, spec, _prompted(ctx.run))
        instructions = {m: predictors_of(program, m)[0].signature.instructions for m in modules}
        step.info["training"] = train_adapters(
            ctx.recipe, spec, groups, folder, ctx.recipe.seed + step.index, instructions
        )
        _merge_logs(folder, list(groups))
        new = ProgramState(state.program_file, dict(state.modules))
        for module in modules:
            name = state.modules[module].model if spec.adapters == "shared" else module
            if name in groups:
                adapter = str((folder / "adapters" / name).relative_to(ctx.run.path))
                new.modules[module] = ModuleState(state.modules[module].model, adapter)
        tuned = ctx.program_for(new)
        save_state(ctx.run, folder, tuned, new)
        ctx.record_eval(step, ctx.evaluate(tuned, "dev"), "dev")

    kind = StepKind.SIMULTANEOUS if isinstance(spec, SimultaneousOptimizer) else StepKind.WEIGHT
    return run_step(ctx, kind, body, {"optimizer": key})


def _merge_logs(folder: Path, names: list[str]) -> None:
    rows = []
    for name in names:
        path = folder / f"train_log-{name}.jsonl"
        if path.exists():
            rows += [{"adapter": name, **r} for r in read_jsonl(path)]
            path.unlink()
    write_jsonl(folder / "train_log.jsonl", rows)


# ---------------------------------------------------------------- init
@dataclass
class WarmStart:
    """What `--init-from` copies: the source run, its recipe, its best step and that step's state, and
    per module of this recipe whether it is copied (value: with its adapter) or kept as the recipe has it."""

    source: RunDir
    recipe: Recipe
    best: str | None
    state: ProgramState
    copied: dict[str, bool]
    kept: list[str]
    ignored: list[str]  # the source's modules that this recipe has not


def _signatures(recipe: Recipe, program: dspy.Module) -> dict[str, str]:
    """Each module's signature as 'in1, in2 -> out': the recipe module's fields, or a class predictor's."""
    if recipe.program.modules:
        fields = {m.name: m.fields() for m in recipe.program.modules}
    else:
        fields = {
            name: (list(p.signature.input_fields), list(p.signature.output_fields))
            for name, p in program.named_predictors()
        }
    return {name: f"{', '.join(ins)} -> {', '.join(outs)}" for name, (ins, outs) in fields.items()}


def _base(recipe: Recipe, model: str) -> str:
    spec = recipe.models.get(model)
    return f"models.{model} ({spec.path if isinstance(spec, LocalModel) else getattr(spec, 'model', 'none')})"


def _same_base(mine: Recipe, model: str, theirs: Recipe, their_model: str) -> bool:
    """Whether an adapter trained on `theirs`' model fits `mine`'s: the same checkpoint, local both."""
    a, b = mine.models.get(model), theirs.models.get(their_model)
    if not (isinstance(a, LocalModel) and isinstance(b, LocalModel)):
        return False
    return a.path == b.path or resolve_checkpoint(a.path) == resolve_checkpoint(b.path)


def warm_start(recipe: Recipe, source_path: Path) -> WarmStart:
    """Match the modules of `source_path`'s best state to `recipe`'s, by name and signature; InputError
    when none matches, a same-named module has another signature, or an adapter's base model differs."""
    source = RunDir.existing(source_path)
    theirs = source.recipe()
    best = source.manifest().get("best")
    upto = next((s.index for s in source.done_steps() if s.folder == best), None)
    their_program = build_program(theirs)
    state = current_state(source, theirs, their_program, upto)
    if state.program_file is None and not any(m.adapter for m in state.modules.values()):
        raise InputError(f"--init-from: {source.path} has no optimized program state to start from")
    here, there = _signatures(recipe, build_program(recipe)), _signatures(theirs, their_program)
    copied = {}
    for module, signature in here.items():
        if module not in there or module not in state.modules:
            continue
        if there[module] != signature:
            raise InputError(
                f"--init-from: module {module!r}: signature {signature!r} here, {there[module]!r} in {source.path}"
            )
        ms = state.modules[module]
        if ms.adapter and not _same_base(recipe, model_of(recipe, module), theirs, ms.model):
            raise InputError(
                f"--init-from: module {module!r}: its adapter in {source.path} was trained on "
                f"{_base(theirs, ms.model)}, here it runs on {_base(recipe, model_of(recipe, module))}"
            )
        copied[module] = bool(ms.adapter)
    if not copied:
        raise InputError(
            f"--init-from: no module of {source.path} ({', '.join(there)}) matches this recipe's "
            f"({', '.join(here)}) by name and signature"
        )
    return WarmStart(
        source, theirs, best, state, copied, [m for m in here if m not in copied], [m for m in there if m not in here]
    )


def _copy_prompts(start: WarmStart, recipe: Recipe) -> dspy.Module:
    """This recipe's program with each copied module's demos and instructions from the source's."""
    theirs = load_program(start.source, start.recipe, start.state)
    mine = build_program(recipe)
    for module in start.copied:
        for p, q in zip(predictors_of(mine, module), predictors_of(theirs, module)):
            p.demos = copy.deepcopy(q.demos)
            p.signature = p.signature.with_instructions(q.signature.instructions)
    return mine


def init_step(ctx: StepContext, source_path: Path) -> Step | None:
    """Copy another run's best program state (prompts and adapters) in as this run's first state: of
    the modules that match this recipe's by name and signature (warm_start); the others keep the recipe's."""
    if any(s.kind == StepKind.INIT for s in ctx.run.done_steps()):
        return None
    if ctx.run.done_steps():
        raise InputError(f"--init-from: {ctx.run.path} already has steps; warm starts apply to a new run")
    start = warm_start(ctx.recipe, source_path)
    source, state = start.source, start.state
    if start.kept:
        console.print(
            f"--init-from: {', '.join(start.kept)} not in {source.path} with this signature: kept as "
            "this recipe has it (its instructions, no demos, no adapter)",
            highlight=False,
            soft_wrap=True,
        )
    if start.ignored:
        console.print(
            f"--init-from: {source.path}'s {', '.join(start.ignored)} not in this recipe: ignored",
            highlight=False,
            soft_wrap=True,
        )

    def body(step: Step) -> None:
        folder = ctx.run.step_dir(step)
        new = ProgramState.initial(ctx.recipe, build_program(ctx.recipe))
        for module, with_adapter in start.copied.items():
            if with_adapter:
                shutil.copytree(source.path / state.modules[module].adapter, folder / "adapters" / module)
                new.modules[module].adapter = str((folder / "adapters" / module).relative_to(ctx.run.path))
        if state.program_file:
            save_state(ctx.run, folder, _copy_prompts(start, ctx.recipe), new)
        else:
            write_json(folder / "state.json", new.to_json())

    prompts = ["prompts"] if state.program_file else []
    copied = {m: prompts + (["adapter"] if a else []) for m, a in start.copied.items()}
    return run_step(
        ctx,
        StepKind.INIT,
        body,
        {
            "from": str(source.path),
            "from_step": start.best,
            "copied": copied,
            "kept": start.kept,
            "ignored": start.ignored,
        },
    )
