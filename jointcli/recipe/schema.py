"""The whole recipe: its sections, and the references between them (a module's model, a teacher, the
data flow from the data's inputs through the modules to the labels)."""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from .optimizers import OptimizerSpec, PromptOptimizer
from .sections import Data, Metric, ModelSpec, Program, Runtime, Schedule, Strict, did_you_mean


# ---------------------------------------------------------------- the recipe
class Recipe(Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    seed: int = Field(0, ge=0)
    data: Data
    metric: Metric = Metric()
    program: Program
    models: dict[str, ModelSpec]
    optimizers: dict[str, OptimizerSpec] = Field(default_factory=dict)
    schedule: Schedule = Schedule()
    runtime: Runtime = Runtime()

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
