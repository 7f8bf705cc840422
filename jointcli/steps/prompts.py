"""The prompt step (p): run one of DSPy's own prompt optimizers on some modules of the program.

    optimizer = make_optimizer(spec, metric, num_threads=4, seed=0, reflection_lm=None)
    program = optimize_prompts(program, spec, optimizer, trainset, modules=["classify"], seed=0)

Settings come from the recipe (`optimizers.<key>.args` go to the constructor, `compile_args` to
`compile`); an argument the optimizer does not take is an error, never silently dropped.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from typing import Any, Callable

import dspy

from ..errors import InputError
from ..recipe import PromptOptimizer

PROMPT_OPTIMIZERS = ("LabeledFewShot", "BootstrapFewShot", "BootstrapFewShotWithRandomSearch",
                     "MIPROv2", "COPRO", "SIMBA", "GEPA")


def _optimizer_class(name: str):
    if name not in PROMPT_OPTIMIZERS:
        raise InputError(f"unknown prompt optimizer {name!r}; available: {', '.join(PROMPT_OPTIMIZERS)}")
    return getattr(dspy.teleprompt, name)


def _accepted(fn) -> set[str]:
    """Named parameters of `fn`; a **kwargs catch-all does not count (it would swallow typos)."""
    return {n for n, p in inspect.signature(fn).parameters.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def check_optimizer(key: str, spec: PromptOptimizer) -> None:
    """Validate the optimizer's name and the names of its arguments, without running it."""
    cls = _optimizer_class(spec.optimizer)
    for where, given, fn in (("args", spec.args, cls.__init__), ("compile_args", spec.compile_args, cls.compile)):
        accepted = _accepted(fn) - {"student", "trainset", "teacher", "metric"}
        unknown = sorted(set(given) - accepted)
        if unknown:
            raise InputError(f"optimizers.{key}.{where}: {spec.optimizer} does not accept {unknown}; "
                             f"it accepts: {', '.join(sorted(accepted))}")
    if spec.optimizer == "GEPA" and not spec.reflection_model:
        raise InputError(f"optimizers.{key}.reflection_model: GEPA needs a reflection model (a name under models)")


def make_optimizer(key: str, spec: PromptOptimizer, metric: Callable, num_threads: int, seed: int,
                   reflection_lm: dspy.LM | None = None):
    """The DSPy optimizer object: the recipe's args plus what jointopt supplies (metric, threads, seed)."""
    check_optimizer(key, spec)
    cls = _optimizer_class(spec.optimizer)
    accepted = _accepted(cls.__init__)
    kwargs: dict[str, Any] = dict(spec.args)
    supplied = {"metric": metric, "num_threads": num_threads, "seed": seed, "reflection_lm": reflection_lm}
    for name, value in supplied.items():
        if name in accepted and name not in kwargs and value is not None:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise InputError(f"optimizers.{key}: {spec.optimizer}({', '.join(kwargs)}) rejected its arguments: {err}") \
            from None


def optimize_prompts(program: dspy.Module, spec: PromptOptimizer, optimizer, trainset: list[dspy.Example],
                     modules: list[str], all_modules: list[str], seed: int) -> dspy.Module:
    """Compile `program` with `optimizer`; modules not in `modules` keep their prompts."""
    kwargs = dict(spec.compile_args)
    if "seed" in _accepted(type(optimizer).compile):
        kwargs.setdefault("seed", seed)
    # Some optimizers print progress (BootstrapFewShot: "Bootstrapped 4 full traces..."); stdout is
    # for results (--json), so their prints go to stderr with the rest of the human output.
    with contextlib.redirect_stdout(sys.stderr):
        optimized = optimizer.compile(program, trainset=trainset, **kwargs)
    keep = [m for m in all_modules if m not in modules]
    if keep:
        before = dict(program.named_predictors())
        for name, predictor in optimized.named_predictors():
            if any(name == m or name.startswith(m + ".") for m in keep):
                predictor.demos = copy.deepcopy(before[name].demos)
                predictor.signature = before[name].signature
    return optimized
