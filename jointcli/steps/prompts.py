"""The prompt step (p): run one of DSPy's own prompt optimizers on some modules of the program.

    >>> spec = PromptOptimizer(type="prompt", optimizer="LabeledFewShot", args={"k": 2})
    >>> optimizer = make_optimizer("p", spec, {"metric": None, "num_threads": 4, "seed": 0})
    >>> type(optimizer).__name__, optimizer.k
    ('LabeledFewShot', 2)

With a program and its training examples (the program's LM answers the optimizer's calls):

    program = optimize_prompts(program, spec, optimizer, trainset, ["classify"], all_modules=["classify"], seed=0)

Settings come from the recipe (`optimizers.<key>.args` go to the constructor, `compile_args` to
`compile`); checks.py checks their names and types against these signatures before any step, so an
argument the optimizer does not take is an error, never silently dropped. KNNFewShot compiles nothing:
its program looks its demos up on every call, a lookup the step records in the program state (knn.py).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from ..errors import InputError
from ..recipe import PromptOptimizer
from .parallel import parallel_map, watching_servers

PROMPT_OPTIMIZERS = (
    "LabeledFewShot",
    "BootstrapFewShot",
    "BootstrapFewShotWithRandomSearch",
    "BootstrapFewShotWithOptuna",
    "MIPROv2",
    "COPRO",
    "SIMBA",
    "InferRules",
    "KNNFewShot",
    "GEPA",
)
# jointopt passes these; a recipe names the models (prompt_model, task_model, reflection_model), not args
SUPPLIED = ("student", "trainset", "teacher", "metric", "prompt_model", "task_model", "reflection_lm", "vectorizer")
NEEDS = {"MIPROv2": "optuna", "BootstrapFewShotWithOptuna": "optuna"}  # the optional package each needs
# **kwargs an optimizer's constructor hands to another optimizer: their names are that one's parameters
FORWARDS_TO = {"InferRules": "BootstrapFewShot", "KNNFewShot": "BootstrapFewShot"}
NOT_A_STEP = {
    "Ensemble": "Ensemble combines several programs into one (compile(programs)); a prompt step optimizes "
    "the run's one program: compare the runs instead (jointopt compare), or ensemble exported programs in "
    "your own code",
}


# Optimizers whose demos are bootstrapped: the program, with labeled demos from the training split, answers
# training examples, and the answers that pass the metric become demos (MIPROv2 bootstraps its demo sets so)
BOOTSTRAPPING = ("BootstrapFewShot", "BootstrapFewShotWithRandomSearch", "BootstrapFewShotWithOptuna", "MIPROv2")
PROBE_EXAMPLES = 8  # run first, in parallel: when none of them parses, no demo can be bootstrapped
NO_FORMAT = "no demo could be bootstrapped: the model does not follow the output format"


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


def init_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The constructor's named parameters of optimizer `name`, with those of the optimizer its **kwargs
    go to (InferRules hands them to BootstrapFewShot).

    >>> sorted(init_parameters("InferRules"))[:4]
    ['max_bootstrapped_demos', 'max_errors', 'max_labeled_demos', 'max_rounds']
    """
    accepted = parameters(optimizer_class(name).__init__)
    if name in FORWARDS_TO:
        accepted = {**parameters(optimizer_class(FORWARDS_TO[name]).__init__), **accepted}
    return accepted


def make_optimizer(key: str, spec: PromptOptimizer, supplied: dict[str, Any]):
    """The DSPy optimizer object: the recipe's args plus what jointopt supplies (metric, threads, seed,
    the models, ...) where the constructor takes it and the recipe did not set it."""
    accepted = init_parameters(spec.optimizer)
    kwargs: dict[str, Any] = dict(spec.args)
    for name, value in supplied.items():
        if name in accepted and name not in kwargs and value is not None:
            kwargs[name] = value
    try:
        return optimizer_class(spec.optimizer)(**kwargs)
    except (TypeError, ValueError, AssertionError) as err:  # what checks.py's rules do not know of
        shown = ", ".join(k for k in kwargs if k not in SUPPLIED or k in spec.args)
        raise InputError(f"optimizers.{key}: {spec.optimizer}({shown}) rejected its arguments: {err}") from None


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


def demo_counts(optimizer, compile_args: dict) -> tuple[int, int] | None:
    """(demos to bootstrap, labeled demos of the program that bootstraps them) of a BOOTSTRAPPING optimizer,
    as it will compile (its compile arguments win: MIPROv2's max_*_demos, Optuna's max_demos); None for
    the others."""
    if type(optimizer).__name__ not in BOOTSTRAPPING:
        return None
    boot = getattr(optimizer, "max_bootstrapped_demos", getattr(optimizer, "max_num_samples", 0))
    boot = compile_args.get("max_bootstrapped_demos", compile_args.get("max_demos", boot))
    labeled = compile_args.get("max_labeled_demos", getattr(optimizer, "max_labeled_demos", 0))
    return int(boot or 0), int(labeled or 0)


def bootstrap_teacher(program: dspy.Module, trainset: list[dspy.Example], labeled: int) -> dspy.Module:
    """The program that answers the training examples while demos are bootstrapped, as DSPy's
    BootstrapFewShot makes it: the program, or with `labeled` demos when it is not compiled, a fresh copy
    with that many labeled demos of the training split (LabeledFewShot, seeded as DSPy seeds it)."""
    teacher = program.deepcopy()
    if labeled and getattr(teacher, "_compiled", False) is False:
        teacher = dspy.LabeledFewShot(k=labeled).compile(teacher.reset_copy(), trainset=trainset)
    return teacher


def cannot_bootstrap(optimizer, spec: PromptOptimizer, program, trainset: list, num_threads: int) -> str | None:
    """Why `optimizer` cannot bootstrap a demo, found in seconds, or None: it bootstraps, and the program it
    bootstraps with answers none of the first PROBE_EXAMPLES training examples in a form that parses (run
    in parallel, each without itself among the labeled demos, as DSPy runs them). Run under the step's
    LM and adapter. Examples that fail for another reason leave the decision to the optimizer."""
    counts = demo_counts(optimizer, spec.compile_args)
    examples = trainset[:PROBE_EXAMPLES]
    if counts is None or counts[0] == 0 or not examples:
        return None
    teacher = bootstrap_teacher(program, trainset, counts[1])

    def parses(example: dspy.Example) -> str:
        own = teacher.deepcopy()
        for predictor in own.predictors():
            predictor.demos = [d for d in predictor.demos if d != example]
        try:
            own(**example.inputs())
            return "parsed"
        except AdapterParseError:
            return "unparsed"
        except Exception:  # noqa: BLE001 - another failure: the optimizer decides, as it would have
            return "failed"

    outcomes = parallel_map(parses, examples, num_threads, "can it bootstrap a demo")
    if any(o != "unparsed" for o in outcomes):
        return None
    demos = f", with {counts[1]} labeled demos" if counts[1] and getattr(program, "_compiled", False) is False else ""
    return f"{NO_FORMAT} (0 of the first {len(examples)} training examples parsed{demos})"
