"""Every check of a recipe that needs no run, in one place. `jointopt validate` and `jointopt plan`
run them all; every command that runs steps (eval, optimize-prompts, bootstrap, finetune, joint,
sweep) runs them before it opens a run directory (Context.open), so bad input fails before any step.
status, compare and export read runs that exist and run none of them.

    check_recipe(recipe)                                  # None, or an InputError (exit code 2), one line
    check_recipe(recipe, steps=())                        # the same, but what the strategy's steps need
    spec = step_optimizer(recipe, "w", WeightOptimizer)   # the optimizer a command's step runs, checked

The recipe package's schema checks the form of each key and the references between them. This module
checks what the form cannot show: names that must exist (built-in data sets, metrics and models, each
list's owner says which; DSPy prompt optimizers, with their arguments' names and types), the program a
`class` names, what a module with `adapter: text` must be (`predict`, one output), the data file
against the recipe's fields, the objectives of `schedule.select` (selection.py's), and what each step
of the strategy needs. Steps keep only the checks that need what a run finds (no passing traces, a run
that already has steps). Every message starts with the recipe key (or flag) it is about.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import dspy

from .data import check_source, load_splits
from .errors import InputError
from .inference.model_id import check_model_name
from .metrics import build_metric, check_metric_name
from .program import build_program, model_of, module_names
from .recipe import LocalModel, PromptOptimizer, Recipe, Select, WeightOptimizer, did_you_mean
from .selection import COSTS, MAXIMIZE, OBJECTIVES
from .steps.arguments import accepted_parameters, argument_types, describe, fits, optimizer_parameters
from .steps.prompts import NEEDS, NOT_A_STEP, PROMPT_OPTIMIZERS
from .strategy import parse_strategy
from .weights.checkpoint import check_model_path


@contextmanager
def about(where: str) -> Iterator[None]:
    """An InputError raised inside names what it is about: 'models.small.path: no such folder'."""
    try:
        yield
    except InputError as err:
        raise InputError(f"{where}: {err}") from None


def check_recipe(recipe: Recipe, steps: Iterable[str] | None = None) -> None:
    """Every error that depends only on the recipe (and the data it names), or None. `steps`: the
    optimizer keys the command will run, whose needs are checked too; by default the strategy's
    (`validate`, `joint`); () for a command that runs none, or checks its own (step_optimizer)."""
    check_source(recipe.data.source)
    check_metric_name(recipe.metric.name)
    _check_models(recipe)
    module_models = program_models(recipe)
    load_splits(recipe.data)  # the file is read, every row has the fields, the split fits, no duplicates
    _check_metric(recipe, build_metric(recipe.metric, recipe.label_field))  # a user's metric imports
    for key, spec in recipe.optimizers.items():
        _check_optimizer(recipe, key, spec, module_models)
    strategy = parse_strategy(recipe.schedule.strategy, recipe.optimizers)
    check_select(recipe.schedule.select)
    check_steps(recipe, strategy if steps is None else steps, module_models)


def check_steps(recipe: Recipe, keys: Iterable[str], module_models: dict[str, str] | None = None) -> None:
    """What the steps of optimizers `keys` need to run at all: training examples, and for a weight
    step a module on a local model."""
    keys = list(dict.fromkeys(keys))
    module_models = module_models if module_models is not None else (program_models(recipe) if keys else {})
    for key in keys:
        _check_step(recipe, key, recipe.optimizers[key], module_models)


def step_optimizer(recipe: Recipe, key: str, kind: type) -> PromptOptimizer | WeightOptimizer:
    """The optimizer `key` (a command's --optimizer) for a step of `kind`, checked as a step of the
    strategy is (check_recipe has checked the optimizer itself)."""
    spec = recipe.optimizers.get(key)
    if spec is None:
        raise InputError(
            f"optimizers.{key}: no such optimizer in the recipe (it has "
            f"{', '.join(recipe.optimizers) or 'none'}){did_you_mean(key, recipe.optimizers)}"
        )
    if not isinstance(spec, kind):
        wanted = "prompt" if kind is PromptOptimizer else "weight"
        raise InputError(f"optimizers.{key}: is a {spec.type} optimizer; this command needs a {wanted} one")
    check_steps(recipe, [key])
    return spec


def check_select(select: Select | None) -> None:
    """schedule.select (recipe.Select): objectives selection.py knows, each the right way round (a
    cost lower, the score higher), and bounds on costs only."""
    if select is None:
        return
    where = "schedule.select"
    if select.maximize is not None and select.maximize not in MAXIMIZE:
        name = select.maximize.lstrip("-")
        if name in OBJECTIVES:
            right, worst = ("score", "lowest dev score") if name == "score" else (f"-{name}", f"most {name}")
            raise InputError(
                f"{where}.maximize: {select.maximize!r} would choose the step with the {worst}; write {right!r}"
            )
        raise InputError(
            f"{where}.maximize: unknown objective {select.maximize!r}; write one of "
            f"{', '.join(MAXIMIZE)}{did_you_mean(select.maximize, MAXIMIZE)}"
        )
    if select.weights == {}:
        raise InputError(
            f"{where}.weights: empty; give the score or a cost a weight, e.g. {{score: 1.0, tokens: -0.001}}"
        )
    for name, weight in (select.weights or {}).items():
        if name not in OBJECTIVES:
            raise InputError(
                f"{where}.weights: unknown objective {name!r}; objectives are "
                f"{', '.join(OBJECTIVES)}{did_you_mean(name, OBJECTIVES)}"
            )
        if weight == 0:
            raise InputError(f"{where}.weights.{name}: 0 counts nothing; leave it out")
        if (weight > 0) != (name == "score"):
            better = (
                "a lower dev score; the score's weight is positive"
                if name == "score"
                else f"more {name}; a cost's weight is negative (e.g. -0.001)"
            )
            raise InputError(f"{where}.weights.{name}: {weight:g} would prefer {better}")
    for name in select.constraints:
        if name not in COSTS:
            raise InputError(
                f"{where}.constraints: unknown cost {name!r}; constraints are upper bounds on "
                f"{', '.join(COSTS)}{did_you_mean(name, COSTS)}"
            )


# ---------------------------------------------------------------- models and program
def _check_models(recipe: Recipe) -> None:
    for name, model in recipe.models.items():
        if isinstance(model, LocalModel):
            with about(f"models.{name}"):
                check_model_name(name)
            with about(f"models.{name}.path"):
                check_model_path(model.path)


def program_models(recipe: Recipe) -> dict[str, str]:
    """Each module of the program (each predictor of a `class` program) -> the name of its model."""
    _check_signatures(recipe)
    _check_text_modules(recipe)
    program = build_program(recipe)  # imports and makes a `class` program: its errors are InputErrors
    names = module_names(recipe, program)
    if recipe.program.class_:
        _check_class_program(recipe, program, names)
    return {name: model_of(recipe, name) for name in names}


def _check_signatures(recipe: Recipe) -> None:
    """Each module's signature as DSPy reads it (the schema checks only its 'a, b -> c' form)."""
    for m in recipe.program.modules:
        try:
            signature = dspy.Signature(m.signature, m.instructions)
            if m.type == "chain_of_thought":
                dspy.ChainOfThought(signature)
        except Exception as err:  # noqa: BLE001 - DSPy raises several types on a bad signature
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"program.modules.{m.name}.signature: DSPy cannot use {m.signature!r}: {reason}") from None


def _check_text_modules(recipe: Recipe) -> None:
    """`adapter: text` reads the whole answer as the module's one output: no reasoning before it, and
    no second field to split it into."""
    for m in (m for m in recipe.program.modules if m.adapter == "text"):
        where, outputs = f"program.modules.{m.name}.adapter", m.fields()[1]
        if m.type != "predict":
            raise InputError(
                f"{where}: text works for a `predict` module; a {m.type} module answers its "
                "reasoning first (use adapter: chat)"
            )
        if len(outputs) != 1:
            raise InputError(
                f"{where}: text needs exactly one output field, the whole answer; {m.name} has "
                f"{len(outputs)} ({', '.join(outputs)})"
            )


def _check_class_program(recipe: Recipe, program: Any, names: list[str]) -> None:
    ref = recipe.program.class_
    if not names:
        raise InputError(
            f"program.class: {ref} has no predictors (dspy.Predict and the like); nothing would run on a model"
        )
    try:  # the class's forward: DSPy warns when an instance's forward is read outside a call
        inspect.signature(type(program).forward).bind(program, **{f: None for f in recipe.data.inputs})
    except TypeError as err:
        raise InputError(
            f"program.class: {ref}.forward cannot take the data inputs "
            f"{', '.join(recipe.data.inputs)} as keywords ({err})"
        ) from None
    except ValueError:  # no signature to read (a builtin): the first call will tell
        pass


def _check_metric(recipe: Recipe, metric: Any) -> None:
    """A user's metric takes at least (example, prediction): DSPy calls it so."""
    fn = getattr(metric, "user_function", None)
    try:
        if fn is not None:
            inspect.signature(fn).bind(None, None)
    except TypeError:
        raise InputError(f"metric.name: {recipe.metric.name} must take (example, prediction, trace=None)") from None
    except ValueError:  # no signature to read (a builtin): the first call will tell
        pass


# ---------------------------------------------------------------- optimizers
def _check_optimizer(recipe: Recipe, key: str, spec: Any, module_models: dict[str, str]) -> None:
    """What an optimizer of the recipe must be, whether the strategy runs it or not."""
    if spec.modules != "all":
        if not spec.modules:
            raise InputError(f"optimizers.{key}.modules: empty; name modules, or write all")
        unknown = [m for m in spec.modules if m not in module_models]
        if unknown:
            raise InputError(
                f"optimizers.{key}.modules: unknown modules {unknown}; the program has "
                f"{', '.join(module_models)}{did_you_mean(unknown[0], module_models)}"
            )
    if isinstance(spec, PromptOptimizer):
        _check_prompt_optimizer(key, spec)
    else:
        _check_weight_optimizer(recipe, key, spec, module_models)


def _check_prompt_optimizer(key: str, spec: PromptOptimizer) -> None:
    if spec.optimizer in NOT_A_STEP:
        raise InputError(f"optimizers.{key}.optimizer: {NOT_A_STEP[spec.optimizer]}")
    if spec.optimizer not in PROMPT_OPTIMIZERS:
        raise InputError(
            f"optimizers.{key}.optimizer: unknown prompt optimizer {spec.optimizer!r}; available: "
            f"{', '.join(PROMPT_OPTIMIZERS)}{did_you_mean(spec.optimizer, PROMPT_OPTIMIZERS)}"
        )
    package = NEEDS.get(spec.optimizer)
    if package and importlib.util.find_spec(package) is None:
        raise InputError(
            f"optimizers.{key}.optimizer: {spec.optimizer} needs the package {package}: "
            f"pip install 'jointopt[{package}]'"
        )
    for where, given in (("args", spec.args), ("compile_args", spec.compile_args)):
        _check_arguments(key, spec.optimizer, where, given)
    if spec.optimizer == "GEPA":
        _check_gepa(key, spec)
    if spec.optimizer == "KNNFewShot" and spec.modules != "all":
        raise InputError(f"optimizers.{key}.modules: KNNFewShot sets the demos of every module on each call; use all")


def _check_arguments(key: str, optimizer: str, where: str, given: dict) -> None:
    """Names, types (steps/arguments.py: what DSPy says of each) and required arguments of an
    optimizer's constructor (`where` args) or compile() (compile_args)."""
    models = {"prompt_model": "prompt_model", "task_model": "task_model", "reflection_lm": "reflection_model"}
    accepted = accepted_parameters(optimizer, where)
    for name in given:
        if name in models and name in optimizer_parameters(optimizer, where):
            raise InputError(
                f"optimizers.{key}.{where}.{name}: jointopt supplies it; "
                f"name a model in optimizers.{key}.{models[name]}"
            )
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InputError(
            f"optimizers.{key}.{where}: {optimizer} does not accept {unknown}; it accepts: "
            f"{', '.join(sorted(accepted))}{did_you_mean(unknown[0], accepted)}"
        )
    allowed_types = argument_types(optimizer, where)
    for name, value in given.items():
        allowed = allowed_types[name]
        if allowed is not None and not fits(value, allowed):
            raise InputError(f"optimizers.{key}.{where}.{name}: {optimizer} expects {describe(allowed)}, got {value!r}")
    missing = [n for n, p in accepted.items() if p.default is inspect.Parameter.empty and n not in given]
    if missing:
        raise InputError(f"optimizers.{key}.{where}: {optimizer} needs {', '.join(missing)}")


def _check_gepa(key: str, spec: PromptOptimizer) -> None:
    if not spec.reflection_model:
        raise InputError(f"optimizers.{key}.reflection_model: GEPA needs a reflection model (a name under models)")
    budgets = ("auto", "max_full_evals", "max_metric_calls")
    if sum(spec.args.get(b) is not None for b in budgets) != 1:
        raise InputError(f"optimizers.{key}.args: GEPA needs exactly one of {', '.join(budgets)} (its budget)")


def _check_weight_optimizer(recipe: Recipe, key: str, spec: WeightOptimizer, module_models: dict[str, str]) -> None:
    one_predict = len(recipe.program.modules) == 1 and recipe.program.modules[0].type == "predict"
    if spec.traces.source == "labels" and not one_predict:
        raise InputError(
            f"optimizers.{key}.traces.source: labels works for a program of one `predict` "
            "module; use program+labels, program or teacher"
        )
    if spec.traces.source == "teacher" and not spec.traces.teacher:
        raise InputError(f"optimizers.{key}.traces.teacher: source=teacher needs a model name")
    if spec.modules != "all":
        remote = sorted(m for m in spec.modules if not _local(recipe, module_models[m]))
        if remote:
            raise InputError(
                f"optimizers.{key}.modules: {remote} run on LiteLLM models, which jointopt cannot fine-tune"
            )


def _check_step(recipe: Recipe, key: str, spec: Any, module_models: dict[str, str]) -> None:
    if recipe.data.split.train == 0:
        raise InputError(f"data.split.train: 0 examples; the {spec.type} step {key!r} needs training examples")
    if isinstance(spec, WeightOptimizer):
        chosen = list(module_models) if spec.modules == "all" else spec.modules
        if not any(_local(recipe, module_models[m]) for m in chosen):
            raise InputError(f"optimizers.{key}: no module runs on a local model; nothing to fine-tune")


def _local(recipe: Recipe, model: str) -> bool:
    return isinstance(recipe.models[model], LocalModel)
