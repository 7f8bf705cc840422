"""The warm start (init): another run's best program copied in as this run's first state.

    start = warm_start(recipe, Path("runs/other"))     # which modules match; bad input before any run opens
    InitStep(Path("runs/other")).run(ctx)               # `joint --init-from runs/other`: 00-init

The source's step is the one it ships (selection.shipped_step; its latest state when no step has a
dev score). Its modules match this recipe's by name and signature: a match brings its prompts
(instructions and demos) and its adapter, whose base model must be this module's; the others keep
the recipe's own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import dspy

from ..errors import InputError
from ..files import copy_dir, write_json
from ..program import build_program, model_of, predictors_of
from ..recipe import LocalModel, Recipe
from ..rundir import RunDir, Step
from ..selection import shipped_step
from ..state import ProgramState, current_state, load_program, save_state
from ..step_kinds import StepKind
from ..weights.checkpoint import resolve_checkpoint
from .base import StepContext, note, run_step


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


def warm_start(recipe: Recipe, source_path: Path) -> WarmStart:
    """Match the modules of `source_path`'s best state to `recipe`'s, by name and signature; InputError
    when none matches, a same-named module has another signature, or an adapter's base model differs."""
    source = RunDir.existing(source_path)
    theirs = source.recipe()
    best = shipped_step(source)
    their_program = build_program(theirs)
    state = current_state(source, theirs, their_program, best.index if best else None)
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
    kept, ignored = [m for m in here if m not in copied], [m for m in there if m not in here]
    return WarmStart(source, theirs, best.folder if best else None, state, copied, kept, ignored)


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


def _copy_prompts(start: WarmStart, recipe: Recipe) -> dspy.Module:
    """This recipe's program with each copied module's demos and instructions from the source's."""
    theirs = load_program(start.source, start.recipe, start.state)
    mine = build_program(recipe)
    for module in start.copied:
        for p, q in zip(predictors_of(mine, module), predictors_of(theirs, module)):
            p.demos = copy.deepcopy(q.demos)
            p.signature = p.signature.with_instructions(q.signature.instructions)
    return mine


class InitStep:
    """Copy the best program state of the run at `source` in as this run's first state: the modules
    that match this recipe's by name and signature (warm_start); the others keep the recipe's."""

    def __init__(self, source: Path):
        self.source = Path(source)

    def run(self, ctx: StepContext) -> Step | None:
        if any(s.kind == StepKind.INIT for s in ctx.run.done_steps()):
            return None
        if ctx.run.done_steps():
            raise InputError(f"--init-from: {ctx.run.path} already has steps; warm starts apply to a new run")
        start = warm_start(ctx.recipe, self.source)
        if start.kept:
            note(
                f"--init-from: {', '.join(start.kept)} not in {start.source.path} with this signature: kept as "
                "this recipe has it (its instructions, no demos, no adapter)"
            )
        if start.ignored:
            note(f"--init-from: {start.source.path}'s {', '.join(start.ignored)} not in this recipe: ignored")
        prompts = ["prompts"] if start.state.program_file else []
        info = {
            "from": str(start.source.path),
            "from_step": start.best,
            "copied": {m: prompts + (["adapter"] if a else []) for m, a in start.copied.items()},
            "kept": start.kept,
            "ignored": start.ignored,
        }
        return run_step(ctx, StepKind.INIT, lambda step: _copy_in(ctx, start, step), info)


def init_step(ctx: StepContext, source_path: Path) -> Step | None:
    """`InitStep(source_path).run(ctx)`: what `joint --init-from` runs before the schedule."""
    return InitStep(source_path).run(ctx)


def _copy_in(ctx: StepContext, start: WarmStart, step: Step) -> None:
    """The warm start's adapters and prompts into the init step's folder, and its program state."""
    folder = ctx.run.step_dir(step)
    new = ProgramState.initial(ctx.recipe, build_program(ctx.recipe))
    for module, with_adapter in start.copied.items():
        if with_adapter:
            copy_dir(start.source.path / start.state.modules[module].adapter, folder / "adapters" / module)
            new.modules[module].adapter = str((folder / "adapters" / module).relative_to(ctx.run.path))
    if start.state.program_file:
        save_state(ctx.run, folder, _copy_prompts(start, ctx.recipe), new)
    else:
        write_json(folder / "state.json", new.to_json())
