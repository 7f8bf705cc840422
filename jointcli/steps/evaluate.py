"""Evaluation: run a program over examples with a metric, keeping a record per example.

    result = evaluate(program, splits.dev, metric, num_threads=4)
    result.score, result.parse_failures, result.rows[0]

Unlike `dspy.Evaluate`, every example's prediction, score, error, time and tokens (per model too,
with their cost where DSPy knows a price) are kept: the run directory stores them
(`predictions.jsonl`) and `compare` pairs runs example by example. For a
label-like field, the result also says what the program answered and warns when the score is no
better than always answering the majority class (answers.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dspy
from dspy.utils.exceptions import AdapterParseError

from ..answers import AnswerSummary, answer_summary, answer_warnings
from ..errors import StepError
from .parallel import parallel_map


@dataclass
class EvalResult:
    score: float
    n: int
    scores: list[float]
    parse_failures: int
    errors: int
    seconds: float
    tokens_in: int
    tokens_out: int
    cached_calls: int = 0  # LM calls answered from DSPy's cache (their seconds are not inference time)
    rows: list[dict] = field(repr=False, default_factory=list)
    answer_summary: AnswerSummary | None = None  # label-like fields: what the program answered, the majority class
    warnings: list[str] = field(default_factory=list)  # reasons to distrust the score (answers.py)
    usage: dict[str, dict] = field(default_factory=dict)  # model -> calls, tokens_in, tokens_out, cost_usd

    @property
    def cost_usd(self) -> float | None:
        """What the calls cost, as DSPy/LiteLLM priced them; None when no model had a known price."""
        costs = [u["cost_usd"] for u in self.usage.values() if u["cost_usd"] is not None]
        return sum(costs) if costs else None

    def failures(self) -> list[dict]:
        """failures-<split>.jsonl: each example whose program or metric raised, or whose answer did not
        parse, with where it failed (program or metric) and the error."""
        return [
            {"example": r["index"], "in": r.get("failed_in"), "parse_failure": r["parse_failure"], "error": r["error"]}
            for r in self.rows
            if r["error"]
        ]

    def too_many_errors(self, max_rate: float, where: str | None = None) -> StepError | None:
        """The error that fails the step when more than `max_rate` of the examples raised (parse
        failures aside; runtime.max_error_rate), or every one did; None otherwise. `where`: the file
        that lists them all."""
        if not self.errors or (self.errors / self.n <= max_rate + 1e-9 and self.errors < self.n):
            return None
        first = next(r for r in self.rows if r["error"] and not r["parse_failure"])
        share = (
            "every example raised an error"
            if self.errors == self.n
            else f"{self.errors} of {self.n} examples raised an error ({self.errors / self.n:.0%}, more than "
            f"runtime.max_error_rate {max_rate:g})"
        )
        listed = f"; all in {where}" if where else ""
        return StepError(f"{share}; the first, in the {first.get('failed_in') or 'program'}: {first['error']}{listed}")

    def summary(self) -> dict:
        """eval.json: everything but the per-example rows."""
        return {
            "score": self.score,
            "n": self.n,
            "scores": self.scores,
            "parse_failures": self.parse_failures,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cached_calls": self.cached_calls,
            "cost_usd": self.cost_usd,
            "usage": self.usage,
            "answers": self.answer_summary.to_json() if self.answer_summary else None,
            "warnings": self.warnings,
        }


class CallLog:
    """Stands first in DSPy's `caller_modules` while one example runs, so DSPy appends each LM call's
    history entry here too. Unlike `dspy.track_usage`, this sees cache hits, whose entries keep the
    cached response and its token counts (and cost): an evaluation's cost does not depend on what was
    cached."""

    def __init__(self):
        self.history: list[dict] = []

    def tokens(self) -> tuple[int, int, int]:
        """(input tokens, output tokens, calls answered from DSPy's cache)."""
        counts = [_entry_tokens(entry) for entry in self.history]
        return sum(c[0] for c in counts), sum(c[1] for c in counts), sum(c[2] for c in counts)

    def by_model(self) -> dict[str, dict]:
        """model -> its calls, tokens and cost in USD (None where DSPy/LiteLLM knows no price: a local
        model, a model on a local server)."""
        models: dict[str, dict] = {}
        for entry in self.history:
            tokens_in, tokens_out, _ = _entry_tokens(entry)
            name = str(entry.get("model"))
            models[name] = _add_usage(
                models.get(name),
                {"calls": 1, "tokens_in": tokens_in, "tokens_out": tokens_out, "cost_usd": entry.get("cost")},
            )
        return models


def _entry_tokens(entry: dict) -> tuple[int, int, int]:
    """(input tokens, output tokens, 1 if answered from DSPy's cache) of one history entry."""
    usage = entry.get("usage") or {}
    if usage:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), 0
    # DSPy empties `usage` on a cache hit; the cached response still has its counts
    counted = getattr(entry.get("response"), "usage", None)
    if isinstance(counted, dict):  # a LiteLLM-style cached response
        return int(counted.get("prompt_tokens") or 0), int(counted.get("completion_tokens") or 0), 1
    if counted is not None:
        return int(getattr(counted, "input_tokens", 0) or 0), int(getattr(counted, "output_tokens", 0) or 0), 1
    return 0, 0, 1


def _add_usage(total: dict | None, usage: dict) -> dict:
    """One model's usage added up; its cost stays None while no call's cost is known."""
    if total is None:
        return dict(usage)
    costs = [c for c in (total["cost_usd"], usage["cost_usd"]) if c is not None]
    return {
        "calls": total["calls"] + usage["calls"],
        "tokens_in": total["tokens_in"] + usage["tokens_in"],
        "tokens_out": total["tokens_out"] + usage["tokens_out"],
        "cost_usd": sum(costs) if costs else None,
    }


def _one(program: dspy.Module, metric: Callable, index: int, example: dspy.Example) -> dict:
    inputs = example.inputs().toDict()
    row = {
        "index": index,
        "inputs": inputs,
        "gold": example.labels().toDict(),
        "prediction": None,
        "score": 0.0,
        "error": None,
        "parse_failure": False,
        "failed_in": None,  # program or metric
    }
    start = time.perf_counter()
    calls = CallLog()
    with dspy.context(caller_modules=[calls]):
        stage = "program"
        try:
            prediction = program(**inputs)
            row["prediction"] = {k: _plain(v) for k, v in prediction.items()}
            stage = "metric"
            row["score"] = float(metric(example, prediction))
        except AdapterParseError as err:
            row["parse_failure"], row["error"], row["failed_in"] = True, _first_line(err), stage
        except Exception as err:  # one bad example must not end the evaluation: counted, and judged by the step
            row["error"], row["failed_in"] = f"{type(err).__name__}: {_first_line(err)}", stage
    row["seconds"] = round(time.perf_counter() - start, 4)
    row["tokens_in"], row["tokens_out"], row["cached_calls"] = calls.tokens()
    row["calls"] = len(calls.history)
    row["usage"] = calls.by_model()
    return row


def evaluate(
    program: dspy.Module,
    examples: list[dspy.Example],
    metric: Callable,
    num_threads: int = 4,
    label: str = "evaluating",
    check: bool = True,
) -> EvalResult:
    """Score `program` on `examples`; raises StepError when a model's server failed (parallel_map), and
    with `check` when every example raised (a step checks the result itself, after writing it:
    Context.record_eval)."""
    start = time.perf_counter()
    rows = parallel_map(lambda item: _one(program, metric, *item), list(enumerate(examples)), num_threads, label)
    seconds = time.perf_counter() - start

    errors = [r for r in rows if r["error"] and not r["parse_failure"]]
    scores = [r["score"] for r in rows]
    summary = answer_summary(rows, getattr(metric, "field", None))
    usage: dict[str, dict] = {}
    for row in rows:
        for model, counts in row["usage"].items():
            usage[model] = _add_usage(usage.get(model), counts)
    result = EvalResult(
        score=sum(scores) / len(scores) if scores else 0.0,
        n=len(rows),
        scores=scores,
        parse_failures=sum(r["parse_failure"] for r in rows),
        errors=len(errors),
        seconds=seconds,
        tokens_in=sum(r["tokens_in"] for r in rows),
        tokens_out=sum(r["tokens_out"] for r in rows),
        cached_calls=sum(r["cached_calls"] for r in rows),
        rows=rows,
        answer_summary=summary,
        warnings=answer_warnings(summary, scores),
        usage=usage,
    )
    if check and (error := result.too_many_errors(1.0)):
        raise error
    return result


def _plain(value):
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
