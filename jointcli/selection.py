"""Choosing the step to ship: the best dev score, or the rule of the recipe's `schedule.select`.

    >>> from jointcli.recipe import Select
    >>> figures = [Figures("01-p", 0.80, tokens=412.0), Figures("02-w", 0.78, tokens=250.0)]
    >>> select_step(figures, Select(maximize="-tokens", constraints={"tokens": 300})).folder
    '02-w'

From a run's files (no model needed, but a run directory):

    step = shipped_step(run)            # what ships: the manifest's `best`, else the rule's choice now
    chosen = choose_step(run.path, run.done_steps(), recipe.schedule.select)   # the rule over some steps

Candidates are the dev-scored steps. Constraints are upper bounds on costs: a step over one is no
candidate, nor is a step whose figure for the rule is unknown. Among the rest the rule's objective
decides (`maximize`, or the sum of `weights` times figures); ties go to the earlier step. When no
step is left, the best dev score is used and `Selection.fallback` says why (the lowest figure of
each bound no step meets). Without a rule: the best dev score, ties to the earlier step.

The figures are what a run already records: a step's dev score; tokens (prompt + completion) and
seconds (uncached calls only) per dev example, from its predictions.jsonl; parameters, the trainable
LoRA parameters of the program as of the step (its state's adapters, counted from their safetensors
headers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError
from .files import read_json, read_jsonl
from .rundir import RunDir, Step
from .step_kinds import PROGRAM_KINDS, STATE_KINDS
from .weights.adapter import SOFT_PROMPT_SUBFOLDER

if TYPE_CHECKING:
    from .recipe import Select

OBJECTIVES = ("score", "tokens", "seconds", "parameters")
COSTS = OBJECTIVES[1:]  # lower is better
MAXIMIZE = ("score",) + tuple(f"-{c}" for c in COSTS)  # what `maximize` may name


@dataclass(frozen=True)
class Figures:
    """What selection knows of one dev-scored step; None: not recorded."""

    folder: str
    score: float  # dev score
    tokens: float | None = None  # mean per dev example
    seconds: float | None = None  # mean per dev example, uncached calls only (None: every call was cached)
    parameters: int | None = None  # trainable LoRA parameters of the program


@dataclass(frozen=True)
class Selection:
    """The chosen step, the rule in words, and why the rule left no step (the best dev score was used)."""

    folder: str
    rule: str
    fallback: str | None = None


# ---------------------------------------------------------------- the rule (pure)
def select_step(candidates: list[Figures], select: Select | None) -> Selection | None:
    """The step `select` chooses among `candidates` (in step order); None when there are none."""
    if not candidates:
        return None
    best_dev = max(candidates, key=lambda f: f.score)  # max keeps the first of equals: the earlier step
    rule = describe(select)
    if select is None:
        return Selection(best_dev.folder, rule)
    weights = objective_weights(select)
    fits = [f for f in candidates if _fits(f, select.constraints) and _value(f, weights) is not None]
    if fits:
        return Selection(max(fits, key=lambda f: _value(f, weights)).folder, rule)
    why = _why_none(candidates, select.constraints, weights)
    return Selection(best_dev.folder, rule, f"{why}; using the best dev score: {best_dev.folder}")


def objective_weights(select: Select) -> dict[str, float]:
    """The rule's objective as weights: `maximize: -tokens` is {tokens: -1}."""
    if select.weights is not None:
        return dict(select.weights)
    name = select.maximize or "score"
    return {name.lstrip("-"): -1.0 if name.startswith("-") else 1.0}


def describe(select: Select | None) -> str:
    """The rule in words: 'maximize -tokens with tokens <= 300'."""
    if select is None:
        return "the best dev score"
    objective = select.maximize or "score"
    if select.weights is not None:
        terms = " ".join(f"{'-' if w < 0 else '+'} {abs(w):g}*{n}" for n, w in select.weights.items())
        objective = terms[2:] if terms.startswith("+ ") else "-" + terms[2:]  # "1*score - 0.001*tokens"
    bounds = _bounds(select.constraints)
    return f"maximize {objective}" + (f" with {bounds}" if bounds else "")


def _bounds(constraints: dict[str, float]) -> str:
    return ", ".join(f"{n} <= {_number(b)}" for n, b in constraints.items())


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _fits(f: Figures, constraints: dict[str, float]) -> bool:
    return all(getattr(f, n) is not None and getattr(f, n) <= bound for n, bound in constraints.items())


def _value(f: Figures, weights: dict[str, float]) -> float | None:
    """The weighted sum of a step's figures; None when one it needs is unknown."""
    values = [getattr(f, n) for n in weights]
    if any(v is None for v in values):
        return None
    return sum(w * v for w, v in zip(weights.values(), values))


def _why_none(candidates: list[Figures], constraints: dict[str, float], weights: dict[str, float]) -> str:
    """Why no step is left: each bound no step meets, with the lowest figure; each figure no step records."""
    misses = []
    for name in dict.fromkeys([*constraints, *weights]):
        known = [f for f in candidates if getattr(f, name) is not None]
        if not known:
            misses.append(f"no step records {name}" + (" (only uncached calls are timed)" if name == "seconds" else ""))
            continue
        low = min(known, key=attrgetter(name))  # min keeps the first of equals: the earlier step
        if name in constraints and getattr(low, name) > constraints[name]:
            misses.append(
                f"no step has {name} <= {_number(constraints[name])} "
                f"(the lowest: {_number(getattr(low, name))}, {low.folder})"
            )
    return "; ".join(misses) or f"no step meets {_bounds(constraints)} at once"


# ---------------------------------------------------------------- the step a run ships
@dataclass(frozen=True)
class Shipped:
    """The step a run ships (None: no step has a dev score) and, with a schedule.select rule, what
    the rule chooses among the run's steps now (its fallback says why it chose none)."""

    step: Step | None
    selection: Selection | None = None


def shipping(run: RunDir, recorded: bool = True) -> Shipped:
    """Which step of `run` ships, for the schedule, compare, status, export and the warm start.

    The step the manifest records as `best` (a joint run's choice), if it is a finished, dev-scored
    step; else (or with `recorded=False`, when the schedule is choosing) the one the recipe's
    schedule.select chooses, or the best dev score, ties to the earlier step. Candidates are the
    finished steps whose program was scored (step_kinds.PROGRAM_KINDS)."""
    steps = [s for s in run.done_steps() if s.kind in PROGRAM_KINDS]
    scored = [s for s in steps if "dev" in s.scores]
    select = run.recipe().schedule.select
    selection = choose_step(run.path, steps, select) if select is not None else None
    best = next((s for s in scored if s.folder == run.manifest().get("best")), None) if recorded else None
    if best is None:
        best = best_step(scored) if selection is None else next(s for s in scored if s.folder == selection.folder)
    return Shipped(best, selection)


def shipped_step(run: RunDir, recorded: bool = True) -> Step | None:
    """The step `run` ships (`shipping`); None when no step has a dev score."""
    return shipping(run, recorded).step


def best_step(steps: list[Step]) -> Step | None:
    """The step with the highest dev score; ties go to the earlier step; None when none has one."""
    return max((s for s in steps if "dev" in s.scores), key=lambda s: s.scores["dev"], default=None)


# ---------------------------------------------------------------- figures from a run's files
def choose_step(run_path: Path, steps: list[Step], select: Select | None) -> Selection | None:
    """The step `select` chooses among the dev-scored ones of `steps` (finished steps of a run, in
    order; those that saved a program state among them, for `parameters`)."""
    weights = objective_weights(select) if select is not None else {}
    needed = set(weights) | set(select.constraints if select is not None else {})
    return select_step([figures_of(run_path, steps, s, needed) for s in steps if "dev" in s.scores], select)


def figures_of(
    run_path: Path, steps: list[Step], step: Step, needed: frozenset[str] | set[str] = frozenset(COSTS)
) -> Figures:
    """A dev-scored step's figures; only the costs in `needed` are read."""
    cost = dev_cost(run_path / step.folder) if needed & {"tokens", "seconds"} else {}
    parameters = program_parameters(run_path, steps, step) if "parameters" in needed else None
    return Figures(step.folder, step.scores["dev"], cost.get("tokens"), cost.get("seconds"), parameters)


def dev_cost(folder: Path) -> dict:
    """Mean inference cost per dev example of a step's program (its predictions.jsonl); seconds only
    from uncached calls."""
    path = folder / "predictions.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    if not rows:
        return {"tokens": None, "seconds": None}
    tokens = sum(r.get("tokens_in", 0) + r.get("tokens_out", 0) for r in rows) / len(rows)
    timed = [r["seconds"] for r in rows if not r.get("cached_calls")]
    return {"tokens": round(tokens, 1), "seconds": round(sum(timed) / len(timed), 4) if timed else None}


def program_parameters(run_path: Path, steps: list[Step], step: Step) -> int | None:
    """The trainable LoRA parameters of the program as of `step`: the adapters named by the state of
    the latest step up to it that saved one (0 before any); None when a file is unreadable."""
    saved = [s for s in steps if s.kind in STATE_KINDS and s.index <= step.index]
    if not saved:
        return 0
    try:
        state = read_json(run_path / max(saved, key=lambda s: s.index).folder / "state.json")
        adapters = sorted({m["adapter"] for m in state["modules"].values() if m.get("adapter")})
        return sum(adapter_parameters(run_path / a) for a in adapters)
    except (InputError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def adapter_parameters(adapter: Path) -> int:
    """The parameters a PEFT adapter folder holds, its soft prompt's (prompt_tuning/) included, from the
    safetensors headers (8 bytes of length, then JSON: tensor name -> dtype, shape, offsets); no torch needed."""
    soft = adapter / SOFT_PROMPT_SUBFOLDER / "adapter_model.safetensors"
    return _tensor_parameters(adapter / "adapter_model.safetensors") + (
        _tensor_parameters(soft) if soft.is_file() else 0
    )


def _tensor_parameters(path: Path) -> int:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
