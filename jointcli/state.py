"""Program state: what one step hands the next.

A state is (1) the prompts of every module (instructions and demos), saved in DSPy's own JSON
format by `program.save`, and (2) per module, the model it runs on and the LoRA adapter on top
of that model, if any. A step folder holds it as `program.json` + `state.json`:

    {"program": "program.json",
     "modules": {"classify": {"model": "small", "adapter": "02-w/adapters/classify"}}}

A KNNFewShot step's state adds `"knn"`: what rebuilds the neighbour lookup its program does on every
call, which program.json cannot hold (steps/knn.py; Context.attach rebuilds it).

Paths are relative to the run directory, so a run directory can be moved or copied whole.
The state of a run is the state of its latest finished step that has one; before any, the
recipe's own program (its instructions, no demos, no adapters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import dspy

from .errors import InputError
from .files import atomic_target, read_json, write_json
from .program import build_program, model_of, module_names, predictors_of
from .recipe import Recipe
from .rundir import STATE_KINDS, RunDir


@dataclass
class ModuleState:
    model: str
    adapter: str | None = None  # folder relative to the run directory


@dataclass
class ProgramState:
    program_file: str | None = None  # program.json, relative to the run directory; None: the recipe's program
    modules: dict[str, ModuleState] = field(default_factory=dict)
    knn: dict | None = None  # a KNNFewShot step's neighbour lookup, which program.json cannot hold (steps/knn.py)

    @classmethod
    def initial(cls, recipe: Recipe, program: dspy.Module) -> ProgramState:
        return cls(None, {m: ModuleState(model_of(recipe, m)) for m in module_names(recipe, program)})

    def with_modules(self, modules: dict[str, ModuleState]) -> ProgramState:
        """This program (and its KNNFewShot lookup) with other models or adapters for its modules."""
        return ProgramState(self.program_file, dict(modules), self.knn)

    def to_json(self) -> dict:
        knn = {"knn": self.knn} if self.knn else {}
        return {"program": self.program_file, "modules": {k: vars(v) for k, v in self.modules.items()}, **knn}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> ProgramState:
        try:
            return cls(data.get("program"), {k: ModuleState(**v) for k, v in data["modules"].items()}, data.get("knn"))
        except (KeyError, TypeError, AttributeError) as err:
            raise InputError(f"{where}: damaged program state ({err})") from None


def current_state(run: RunDir, recipe: Recipe, program: dspy.Module, upto: int | None = None) -> ProgramState:
    """The state of the latest finished step (up to index `upto`) that saved one, else the recipe's own.
    A finished init, p or w step without its state.json is an error, never skipped: the state
    before it is not this run's program."""
    for step in reversed(run.done_steps()):
        if upto is not None and step.index > upto:
            continue
        path = run.step_dir(step) / "state.json"
        if step.kind in STATE_KINDS:
            return ProgramState.from_json(read_json(path), path)
    return ProgramState.initial(recipe, program)


def load_program(run: RunDir, recipe: Recipe, state: ProgramState) -> dspy.Module:
    """The recipe's program with the prompts of `state` loaded (models are attached separately)."""
    program = build_program(recipe)
    if state.program_file:
        path = run.path / state.program_file
        if not path.is_file():
            raise InputError(f"{path}: missing; the run directory is damaged")
        try:
            program.load(str(path))
        except Exception as err:  # DSPy raises several types on a bad file
            raise InputError(f"{path}: cannot load program ({err})") from None
    return program


def save_state(run: RunDir, folder: Path, program: dspy.Module, state: ProgramState) -> ProgramState:
    """Write `program.json` (plain DSPy JSON, without LMs) and `state.json` into a step folder."""
    saved_lms = [(p, p.lm) for _, p in program.named_predictors()]
    for p, _ in saved_lms:
        p.lm = None  # models live in state.json; plain DSPy then loads program.json as-is
    try:
        with atomic_target(folder / "program.json") as tmp:
            program.save(str(tmp))
    finally:
        for p, lm in saved_lms:
            p.lm = lm
    new = ProgramState(str((folder / "program.json").relative_to(run.path)), state.modules, state.knn)
    write_json(folder / "state.json", new.to_json())
    return new


def attach_models(program: dspy.Module, recipe: Recipe, state: ProgramState, run_path: Path, pool) -> None:
    """Set each predictor's LM: the module's model, with its adapter when it has one."""
    for module, ms in state.modules.items():
        adapter = (run_path / ms.adapter) if ms.adapter else None
        lm = pool.get(ms.model, adapter)
        for predictor in predictors_of(program, module):
            predictor.lm = lm
