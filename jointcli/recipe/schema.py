"""The whole recipe: its sections, and the references between them (a module's model, a teacher, the
data flow from the data's inputs through the modules to the labels); and the rule of a run's name,
which the recipe's `name` and the command line's `--name` both follow (`check_run_name`), and the
folder a run's name gives it under the runs root (`run_folder`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from ..errors import InputError
from .optimizers import OptimizerSpec, PromptOptimizer
from .sections import Data, Metric, ModelSpec, Program, Runtime, Schedule, Strict, Tracking, did_you_mean

# ---------------------------------------------------------------- a run's name
NAME_MAX = 100  # characters: one folder name, with room for a sweep's '-sweep' under any file system's limit
_NAME_CHARACTERS = re.compile(r"[\w.-]+")
NAME_RULE = f"letters, digits, '_', '-' and '.', at most {NAME_MAX} characters, not starting with '.' and without '..'"


def run_name_problem(name: str) -> str | None:
    """What keeps `name` from naming a folder under the runs root, or None: it is one folder name
    (no path separator, no '..'), not hidden (no leading '.'), and of a length every file system takes.

    >>> run_name_problem("sst2-wp.v2") is None
    True
    >>> run_name_problem("../../escaped").split(";")[0]
    "'../../escaped' has '/'"
    """
    if not name:
        why = "is empty"
    elif bad := sorted({c for c in name if not _NAME_CHARACTERS.fullmatch(c)}):
        why = f"has {', '.join(map(repr, bad))}"
    elif ".." in name:
        why = "has '..'"
    elif name.startswith("."):
        why = "starts with '.'"
    elif len(name) > NAME_MAX:
        why = f"is {len(name)} characters long"
    else:
        return None
    return f"{name[: NAME_MAX + 20]!r} {why}; a run name is {NAME_RULE}"


def check_run_name(name: str, where: str) -> str:
    """`name` if it follows the rule of run names (run_name_problem), else an InputError that begins
    with `where` (e.g. '--name'): the one check of every run name the user gives."""
    if problem := run_name_problem(name):
        raise InputError(f"{where}: {problem}")
    return name


def run_folder(root: Path, name: str) -> Path:
    """The folder of run `name` under the runs root, where `name` may hold jointopt's own folders
    (NAME/seed-0, a sweep's NAME/p-w/seed-0); an InputError when it would not be inside the root.

    >>> run_folder(Path("runs"), "../escaped")
    Traceback (most recent call last):
    jointcli.errors.InputError: run name '../escaped': its folder escaped is not inside the runs root runs
    """
    root = Path(root)
    path = Path(os.path.normpath(root / name))
    if Path(os.path.normpath(root)) not in path.parents:
        raise InputError(f"run name {name!r}: its folder {path} is not inside the runs root {root}")
    return path


# ---------------------------------------------------------------- the recipe
class Recipe(Strict):
    name: str = Field(description=f"the run's name: its folder under the runs root ({NAME_RULE})")
    seed: int = Field(0, ge=0)
    data: Data
    metric: Metric = Metric()
    program: Program
    models: dict[str, ModelSpec]
    optimizers: dict[str, OptimizerSpec] = Field(default_factory=dict)
    schedule: Schedule = Schedule()
    runtime: Runtime = Runtime()
    tracking: Tracking = Field(
        Tracking(),
        exclude=True,  # where a run is reported is no part of the run: not in its frozen recipe.yaml
        description="experiment tracking (MLflow): where runs are reported, kept out of the run's frozen recipe",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if problem := run_name_problem(name):
            raise ValueError(problem)
        return name

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        for m in self.program.modules:
            self._model_ref(f"program.modules.{m.name}.model", m.model)
        for pred, model in self.program.models.items():
            self._model_ref(f"program.models.{pred}", model)
        self._model_ref("program.default_model", self.program.default_model)
        self._check_dataflow()
        self._check_optimizers()
        return self

    def _model_ref(self, where: str, name: str | None) -> None:
        if name is not None and name not in self.models:
            raise ValueError(
                f"{where}: unknown model {name!r}; models are {', '.join(self.models) or 'none'}"
                f"{did_you_mean(name, self.models)}"
            )

    def _check_dataflow(self) -> None:
        if not self.program.modules:
            return
        known = set(self.data.inputs)
        for m in self.program.modules:
            ins, outs = m.fields()
            missing = [f for f in ins if f not in known]
            if missing:
                raise ValueError(
                    f"program.modules.{m.name}.signature: inputs {missing} are neither "
                    "data inputs nor outputs of an earlier module"
                )
            known.update(outs)
        missing = [f for f in self.data.labels if f not in known]
        if missing:
            raise ValueError(f"data.labels: {missing} produced by no module of the program")
        if self.metric.field and self.metric.field not in self.data.labels:
            raise ValueError(f"metric.field: {self.metric.field!r} is not one of data.labels")

    def _check_optimizers(self) -> None:
        # which modules an optimizer names is checks.py's (a `class` program's are known once imported)
        for key, opt in self.optimizers.items():
            if not re.fullmatch(r"[A-Za-z]\w*", key):
                raise ValueError(f"optimizers.{key}: names must be letters/words usable in a strategy")
            if key.lower() == "none":
                raise ValueError(f"optimizers.{key}: the name means zero-shot in a strategy; choose another")
            if isinstance(opt, PromptOptimizer):
                for field in ("reflection_model", "prompt_model", "task_model"):
                    self._model_ref(f"optimizers.{key}.{field}", getattr(opt, field))
            else:
                self._model_ref(f"optimizers.{key}.traces.teacher", opt.traces.teacher)

    @property
    def label_field(self) -> str:
        return self.metric.field or self.data.labels[0]
