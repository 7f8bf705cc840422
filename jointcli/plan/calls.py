"""LM calls of the prompt optimizers, from DSPy 3.4's own formulas at the recipe's settings (the
recipe's arguments, else DSPy's defaults), and the demos each step leaves in the program.
A count is a range where it depends on what the model answers (`Calls`)."""

from __future__ import annotations

import math

from ..recipe import PromptOptimizer, Recipe
from ..steps.prompts import optimizer_class, parameters
from .result import Calls


def optimizer_settings(spec: PromptOptimizer) -> dict:
    """The optimizer's constructor and compile() arguments: the recipe's, else DSPy's defaults."""
    cls = optimizer_class(spec.optimizer)
    defaults: dict = {}
    for fn in (cls.__init__, cls.compile):  # compile's None means "the constructor's" (MIPROv2's demos)
        defaults.update(
            {
                n: p.default
                for n, p in parameters(fn).items()
                if p.default is not p.empty and (p.default is not None or n not in defaults)
            }
        )
    return {**defaults, **spec.args, **spec.compile_args}


def bootstrap_runs(s: dict, train: int, pass_rate: float | None) -> Calls:
    """Program runs of BootstrapFewShot's teacher: examples in order until max_bootstrapped_demos pass,
    each tried up to max_rounds times; the expected count from a pass rate (else the bound)."""
    need, rounds = s["max_bootstrapped_demos"], s["max_rounds"]
    if not need:
        return Calls.exact(0)
    low, high = min(need, train), train * rounds
    if not pass_rate:
        return Calls(low, high, high)
    tried = min(train, math.ceil(need / pass_rate))
    return Calls(low, high, min(high, round(tried * (1 + (rounds - 1) * (1 - pass_rate)))))


def optimizer_calls(spec: PromptOptimizer, train: int, predictors: int, pass_rate: float | None) -> Calls:
    """LM calls of a prompt optimizer's compile() on `train` examples (jointopt passes no valset)."""
    s, name = optimizer_settings(spec), spec.optimizer
    if name in ("LabeledFewShot", "KNNFewShot"):  # KNNFewShot's calls come later: each program call bootstraps
        return Calls.exact(0)
    if name == "BootstrapFewShot":
        runs, extra = bootstrap_runs(s, train, pass_rate), 0
    elif name == "BootstrapFewShotWithRandomSearch":  # n+3 candidates scored on the trainset, n+1 bootstrapped
        n = s["num_candidate_programs"]
        runs, extra = _scaled(bootstrap_runs(s, train, pass_rate), n + 1, (n + 3) * train), 0
    elif name == "MIPROv2":
        runs, extra = _mipro_runs(s, train, predictors, pass_rate)
    elif name == "GEPA":  # its metric-call budget; the reflection model's calls come on top
        from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS, GEPA  # the gepa package: only for GEPA

        budget = (
            GEPA.auto_budget(None, predictors, AUTO_RUN_SETTINGS[s["auto"]]["n"], train)
            if s.get("auto")
            else s.get("max_metric_calls") or s["max_full_evals"] * train
        )
        runs, extra = Calls(budget, budget, budget, True), 0
    elif name == "COPRO":  # breadth candidates per predictor per depth, each scored on the trainset
        n = predictors * s["depth"] * s["breadth"] * train
        runs, extra = Calls(n, n, n, True), predictors * s["depth"]
    else:  # SIMBA: per step, bsize examples x num_candidates trajectories, then the candidates on the batch
        n = s["max_steps"] * s["bsize"] * s["num_candidates"] * 2
        runs, extra = Calls(n, n, n, True), 0
    return Calls(
        runs.low * predictors + extra,
        runs.high * predictors + extra,
        runs.expected * predictors + extra,
        runs.approximate or extra > 0,
    )


def knn_runs_per_call(spec: PromptOptimizer, pass_rate: float | None) -> Calls:
    """Program runs behind one call of a KNNFewShot program (DSPy's knn_fewshot.py): BootstrapFewShot
    over the k nearest training examples, then the call itself on the demos it bootstrapped.

    >>> knn = PromptOptimizer(type="prompt", optimizer="KNNFewShot", args={"k": 3})
    >>> print(knn_runs_per_call(knn, None), knn_runs_per_call(knn.model_copy(update={"args": {"k": 8}}), 0.5))
    4 5-9 (~9)
    """
    args = {n: v for n, v in spec.args.items() if n != "k"}  # the rest are BootstrapFewShot's
    bootstrap = optimizer_settings(PromptOptimizer(type="prompt", optimizer="BootstrapFewShot", args=args))
    runs = bootstrap_runs(bootstrap, spec.args["k"], pass_rate)
    return Calls(runs.low + 1, runs.high + 1, runs.expected + 1, runs.approximate)


def _scaled(boot: Calls, times: int, plus: int) -> Calls:
    """`times` bootstraps plus `plus` runs: an approximate count."""
    return Calls(boot.low * times + plus, boot.high * times + plus, boot.expected * times + plus, True)


def _mipro_runs(s: dict, train: int, predictors: int, pass_rate: float | None) -> tuple[Calls, int]:
    """MIPROv2 (mipro_optimizer_v2.py): trainset split 20/80 into train/val; auto sets n, the val size
    and num_trials; minibatches of minibatch_size with a full eval every minibatch_full_eval_steps."""
    from dspy.teleprompt.mipro_optimizer_v2 import AUTO_RUN_SETTINGS, MIN_MINIBATCH_SIZE  # optuna: only for MIPROv2

    val = min(1000, max(1, int(train * 0.8)))
    zeroshot = s["max_bootstrapped_demos"] == 0 and s["max_labeled_demos"] == 0
    if s["auto"]:
        n, val = AUTO_RUN_SETTINGS[s["auto"]]["n"], min(val, AUTO_RUN_SETTINGS[s["auto"]]["val_size"])
        minibatch, instruct = val > MIN_MINIBATCH_SIZE, n if zeroshot else int(n * 0.5)
        trials = int(max(2 * predictors * (1 if zeroshot else 2) * math.log2(n), 1.5 * n))
    else:
        n, trials, minibatch, instruct = s["num_candidates"], s["num_trials"], s["minibatch"], s["num_candidates"]
    size, every = s["minibatch_size"], s["minibatch_full_eval_steps"]
    evals = size * trials + val * (trials // every + 1) if minibatch else val * trials
    boot = bootstrap_runs(
        {"max_rounds": 1, **s, "max_bootstrapped_demos": s["max_bootstrapped_demos"] or 3}, train - val, pass_rate
    )
    return _scaled(boot, n + 1, evals), 10 + instruct * predictors + predictors + 1


def demos_after(spec: PromptOptimizer, before: int, train: int) -> int:
    """Demos per predictor after a prompt step (COPRO and GEPA change instructions only)."""
    s = optimizer_settings(spec)
    if spec.optimizer in ("LabeledFewShot", "KNNFewShot"):  # KNNFewShot: those of each call, from k examples
        return min(train, s["k"])
    if spec.optimizer == "SIMBA":
        return min(train, s["max_demos"])
    if spec.optimizer in ("COPRO", "GEPA"):
        return before
    return min(train, max(s["max_labeled_demos"], s["max_bootstrapped_demos"]))


def demos_by_step(recipe: Recipe, keys: list[str], names: list[str], train: int) -> list[dict[str, int]]:
    """Demos per module of the program after the baseline and after each step."""
    walk = [{m: 0 for m in names}]
    for key in keys:
        spec, demos = recipe.optimizers[key], dict(walk[-1])
        if isinstance(spec, PromptOptimizer):
            for m in names if spec.modules == "all" else spec.modules:
                demos[m] = demos_after(spec, demos[m], train)
        walk.append(demos)
    return walk
