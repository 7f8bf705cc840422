"""The DSPy program a recipe describes, and which model each of its modules runs on.

A recipe's `program.modules` become a `Pipeline`: modules run in order, each reading the data
inputs and the outputs of earlier modules. `program.class` imports a user's own dspy.Module
instead; its predictors are then the "modules" of the recipe. A recipe module runs under DSPy's
ChatAdapter, or with `adapter: text` under the plain-chat TextAdapter (text_adapter.py); a
`class` program's predictors always run under the ChatAdapter.
"""

from __future__ import annotations

import dspy

from .errors import InputError
from .imports import import_ref
from .recipe import Module, Recipe
from .text_adapter import TextAdapter

_TEXT_ADAPTER = TextAdapter()


class Pipeline(dspy.Module):
    """Recipe modules run in order; each one's outputs become inputs of the next."""

    def __init__(self, modules: list[Module]):
        super().__init__()
        self._specs = list(modules)
        for spec in self._specs:
            signature = dspy.Signature(spec.signature, spec.instructions)
            kind = dspy.ChainOfThought if spec.type == "chain_of_thought" else dspy.Predict
            module = kind(signature)
            module.jointopt_adapter = spec.adapter  # for module_adapter; optimizers' copies keep it
            setattr(self, spec.name, module)

    def forward(self, **inputs):
        values = dict(inputs)
        produced = {}
        for spec in self._specs:
            wanted, _ = spec.fields()
            module = getattr(self, spec.name)
            with dspy.context(adapter=module_adapter(module)):
                prediction = module(**{k: values[k] for k in wanted})
            for key, value in prediction.items():
                values[key] = produced[key] = value
        return dspy.Prediction(**produced)


def module_adapter(module: dspy.Module) -> dspy.Adapter:
    """The adapter a module (or its predictor) runs under, and formats its fine-tune rows with:
    the TextAdapter for a recipe module with `adapter: text`, else the process's (ChatAdapter)."""
    if getattr(module, "jointopt_adapter", "chat") == "text":
        return _TEXT_ADAPTER
    return dspy.settings.adapter or dspy.ChatAdapter()


def build_program(recipe: Recipe) -> dspy.Module:
    """A fresh program, with the recipe's instructions and no demos."""
    if recipe.program.modules:
        return Pipeline(recipe.program.modules)
    cls = import_ref(recipe.program.class_, "program.class")
    try:
        program = cls()
    except Exception as err:  # the user's constructor: report, don't trace
        raise InputError(f"program.class: {recipe.program.class_}() failed: {err}") from None
    if not isinstance(program, dspy.Module):
        raise InputError(f"program.class: {recipe.program.class_} is not a dspy.Module")
    names = {name for name, _ in program.named_predictors()}
    unknown = sorted(set(recipe.program.models) - names)
    if unknown:
        raise InputError(
            f"program.models: no predictors {unknown} in {recipe.program.class_} (it has {', '.join(sorted(names))})"
        )
    return program


def module_names(recipe: Recipe, program: dspy.Module) -> list[str]:
    """The recipe's names for the units that get prompts, models and adapters."""
    if recipe.program.modules:
        return [m.name for m in recipe.program.modules]
    return [name for name, _ in program.named_predictors()]


def predictors_of(program: dspy.Module, module: str) -> list[dspy.Predict]:
    """The predictors of one module (a ChainOfThought module holds one at `name.predict`)."""
    return [p for name, p in program.named_predictors() if name == module or name.startswith(module + ".")]


def model_of(recipe: Recipe, module: str) -> str:
    """The name of the model a module runs on, from the recipe."""
    for m in recipe.program.modules:
        if m.name == module:
            return m.model
    model = recipe.program.models.get(module, recipe.program.default_model)
    if model is None:
        if len(recipe.models) == 1:
            return next(iter(recipe.models))
        raise InputError(f"program.models: predictor {module!r} has no model and program.default_model is unset")
    return model
