"""The prompt step (p): run one of DSPy's own prompt optimizers on some modules of the program.

    >>> spec = PromptOptimizer(type="prompt", optimizer="LabeledFewShot", args={"k": 2})
    >>> optimizer = make_optimizer("p", spec, metric=None, num_threads=4, seed=0)
    >>> type(optimizer).__name__, optimizer.k
    ('LabeledFewShot', 2)

With a program and its training examples (the program's LM answers the optimizer's calls):

    program = optimize_prompts(program, spec, optimizer, trainset, ["classify"], all_modules=["classify"], seed=0)

Settings come from the recipe (`optimizers.<key>.args` go to the constructor, `compile_args` to
`compile`); checks.py checks their names and types against these signatures before any step, so an
argument the optimizer does not take is an error, never silently dropped.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import dspy

from ..errors import InputError
from ..recipe import PromptOptimizer
from .parallel import watching_servers

PROMPT_OPTIMIZERS = (
    "LabeledFewShot",
    "BootstrapFewShot",
    "BootstrapFewShotWithRandomSearch",
    "MIPROv2",
    "COPRO",
    "SIMBA",
    "GEPA",
)
SUPPLIED = ("student", "trainset", "teacher", "metric")  # jointopt passes these; a recipe does not


def optimizer_class(name: str):
    """The DSPy class of a prompt optimizer of PROMPT_OPTIMIZERS (the recipe's name is checked by checks.py)."""
    return getattr(dspy.teleprompt, name)


def parameters(fn) -> dict[str, inspect.Parameter]:
    """Named parameters of `fn`; a **kwargs catch-all does not count (it would swallow typos)."""
    return {
        n: p
        for n, p in inspect.signature(fn).parameters.items()
        if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def make_optimizer(
    key: str, spec: PromptOptimizer, metric: Callable, num_threads: int, seed: int, reflection_lm: dspy.LM | None = None
):
    """The DSPy optimizer object: the recipe's args plus what jointopt supplies (metric, threads, seed)."""
    cls = optimizer_class(spec.optimizer)
    accepted = parameters(cls.__init__)
    kwargs: dict[str, Any] = dict(spec.args)
    supplied = {"metric": metric, "num_threads": num_threads, "seed": seed, "reflection_lm": reflection_lm}
    for name, value in supplied.items():
        if name in accepted and name not in kwargs and value is not None:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as err:  # what checks.py's rules do not know of
        raise InputError(
            f"optimizers.{key}: {spec.optimizer}({', '.join(kwargs)}) rejected its arguments: {err}"
        ) from None


def optimize_prompts(
    program: dspy.Module,
    spec: PromptOptimizer,
    optimizer,
    trainset: list[dspy.Example],
    modules: list[str],
    all_modules: list[str],
    seed: int,
) -> dspy.Module:
    """Compile `program` with `optimizer`; modules not in `modules` keep their prompts."""
    kwargs = dict(spec.compile_args)
    if "seed" in parameters(type(optimizer).compile):
        kwargs.setdefault("seed", seed)
    with watching_servers():  # the optimizer counts a dead server's calls as failed examples: a failed step
        optimized = optimizer.compile(program, trainset=trainset, **kwargs)  # its prints: stderr (open_run)
    keep = [m for m in all_modules if m not in modules]
    if keep:
        before = dict(program.named_predictors())
        for name, predictor in optimized.named_predictors():
            if any(name == m or name.startswith(m + ".") for m in keep):
                predictor.demos = copy.deepcopy(before[name].demos)
                predictor.signature = before[name].signature
    return optimized
