"""Bootstrap: record what each module was asked and answered on the training split, keep what passes.

    traces = collect_traces(program, trainset, metric, modules=["classify"], threshold=1.0)
    traces.rows[0] == {"module": "classify", "example": 3, "score": 1.0, "source": "program",
                       "messages": [...]}

A row's `messages` are the chat messages the module's adapter sends (system, demos, user)
followed by the assistant's answer in that adapter's format: exactly what a fine-tune on the
module should teach. The adapter is DSPy's ChatAdapter, or for a recipe module with `adapter: text`
the plain TextAdapter (no system message, no field markers). Failed predictions (parse failures,
errors) are never kept, whatever the metric says; an example whose program or metric raised is an
error (`Traces.errors`), one whose answer did not parse a parse failure, as in an evaluation.

With `gold` (trace source `program+labels`), an example whose trace failed still teaches the
modules that produce label fields: the module's own current prompt (its demos included) on the
inputs it was given, answered with the gold labels (its other outputs, such as a chain of
thought's reasoning, as the program produced them). Such rows have "source": "labels"; modules
whose outputs are not labels learn from passing traces only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import dspy
from dspy.utils.exceptions import AdapterParseError

from ..errors import StepError
from ..program import module_adapter, predictors_of
from .parallel import parallel_map


@dataclass
class Traces:
    rows: list[dict]
    run: int  # examples run
    passed: int  # examples whose score reached the threshold
    per_module: dict[str, int] = field(default_factory=dict)  # rows
    errors: int = 0  # examples whose program or metric raised (parse failures aside)
    # module -> examples it ran on, answered in a form that parsed, and that then passed the metric:
    # in a pipeline, the module that runs but never parses blocks every module after it
    modules: dict[str, dict[str, int]] = field(default_factory=dict)
    # {"example", "module", "in", "parse_failure", "error"} of the examples that raised or did not parse
    failures: list[dict] = field(default_factory=list)
    parse_failures: int = 0  # examples with an answer no adapter could parse

    def counts(self) -> dict:
        """traces.json: examples run and passed, rows per module and per source (program, teacher or
        labels), and each module's ran/parsed/passed."""
        return {
            "run": self.run,
            "passed": self.passed,
            "rows": len(self.rows),
            "per_module": self.per_module,
            "per_source": dict(Counter(row["source"] for row in self.rows)),
            "parse_failures": self.parse_failures,
            "errors": self.errors,
            "modules": self.modules,
        }

    def too_many_errors(self, max_rate: float, where: str) -> StepError | None:
        """The error that fails the step when more than `max_rate` of the examples raised (parse
        failures aside; runtime.max_error_rate), as an evaluation's; None otherwise."""
        if not self.errors or self.errors / self.run <= max_rate + 1e-9:
            return None
        first = next(f for f in self.failures if not f["parse_failure"])
        return StepError(
            f"bootstrapping traces: {self.errors} of {self.run} training examples raised an error "
            f"({self.errors / self.run:.0%}, more than runtime.max_error_rate {max_rate:g}); the first, in the "
            f"{first['in']}: {first['error'].splitlines()[0][:300]}; all in {where}"
        )


def _messages(predictor: dspy.Predict, inputs: dict, outputs: dict) -> list[dict]:
    data = module_adapter(predictor).format_finetune_data(
        signature=predictor.signature, demos=predictor.demos, inputs=inputs, outputs=outputs
    )
    return data["messages"]


def _module_of(program: dspy.Module, modules: list[str]) -> dict[int, str]:
    return {id(p): m for m in modules for p in predictors_of(program, m)}


def label_fields(program: dspy.Module, modules: list[str], labels: list[str]) -> dict[str, list[str]]:
    """module -> the label fields it outputs, for the modules that output any."""
    out = {}
    for m in modules:
        fields = [f for p in predictors_of(program, m) for f in p.signature.output_fields if f in labels]
        if fields:
            out[m] = fields
    return out


def collect_traces(
    program: dspy.Module,
    trainset: list[dspy.Example],
    metric,
    modules: list[str],
    threshold: float,
    num_threads: int = 4,
    gold: dict[str, list[str]] | None = None,
    source: str = "program",
    all_modules: list[str] | None = None,
) -> Traces:
    """Run `program` over `trainset` and keep, per module, the calls of examples that pass (rows of
    `source`: "program", or "teacher" when `program` runs on a teacher model); with `gold` (module ->
    its label fields: `label_fields`), failed examples teach those modules the gold labels inside
    their current prompts. `all_modules` (in the order they run; default `modules`) are counted:
    ran, parsed, passed."""
    owner = _module_of(program, modules)
    tally = _ModuleTally(program, all_modules or modules)

    rows, passed, errors, parse_failures, failures = [], 0, 0, 0, []
    per_module = {m: 0 for m in modules}
    for index, score, calls, error in parallel_map(
        lambda item: _run_one(program, metric, *item), list(enumerate(trainset)), num_threads, "bootstrapping traces"
    ):
        failed_in = tally.add(calls, passed=score is not None and score >= threshold, failed=error is not None)
        if error is not None:
            parse_failures += error["parse_failure"]
            errors += not error["parse_failure"]
            module = failed_in if error["in"] == "program" else None
            failures.append({"example": index, "module": module, **error, "error": error["error"][:2000]})
        if score is not None and score >= threshold:
            passed += 1
            for predictor, inputs, outputs in calls:
                if (module := owner.get(id(predictor))) is not None:
                    rows.append(_row(module, index, score, source, predictor, dict(inputs), outputs.toDict()))
                    per_module[module] += 1
        elif gold:
            for row in _gold_rows(program, trainset[index], index, score or 0.0, calls, gold):
                rows.append(row)
                per_module[row["module"]] += 1
    return Traces(rows, len(trainset), passed, per_module, errors, tally.counts, failures, parse_failures)


def _run_one(program: dspy.Module, metric, index: int, example: dspy.Example):
    """(index, score or None, the calls traced, the failure or None) of one training example."""
    with dspy.context(trace=[]):
        stage = "program"
        try:
            prediction = program(**example.inputs())
            stage = "metric"
            score = float(metric(example, prediction))
        except Exception as err:  # a failed example teaches nothing; counted, kept for the user, judged
            failure = {"in": stage, "parse_failure": isinstance(err, AdapterParseError)}
            return index, None, list(dspy.settings.trace), {**failure, "error": f"{type(err).__name__}: {err}"}
        return index, score, list(dspy.settings.trace), None


class _ModuleTally:
    """Per module: examples it ran on, answered parsably, and that passed. A module that raised left
    no call in the trace: the failed one is the first module, in running order, without a call."""

    def __init__(self, program: dspy.Module, order: list[str]):
        self.order, self.owner = order, _module_of(program, order)
        self.counts = {m: {"ran": 0, "parsed": 0, "passed": 0} for m in order}

    def add(self, calls: list, passed: bool, failed: bool) -> str | None:
        """Count one example; returns the module it failed in, if it failed."""
        answered = {self.owner[id(p)] for p, _, _ in calls if id(p) in self.owner}
        failed_in = next((m for m in self.order if m not in answered), None) if failed else None
        for m in self.order:
            if m in answered:
                self.counts[m]["ran"] += 1
                self.counts[m]["parsed"] += 1
                self.counts[m]["passed"] += passed
            elif m == failed_in:
                self.counts[m]["ran"] += 1
        return failed_in


def blocking_module(counts: dict) -> str | None:
    """The first module, of a pipeline's, that ran but never answered in a form that parsed, so that
    the modules after it never ran (from traces.json's "modules")."""
    modules = list(counts.get("modules", {}).items())
    return next((m for m, c in modules[:-1] if c["ran"] and not c["parsed"]), None)


def _row(module: str, index: int, score: float, source: str, predictor, inputs: dict, outputs: dict) -> dict:
    return {
        "module": module,
        "example": index,
        "score": score,
        "source": source,
        "messages": _messages(predictor, inputs, outputs),
    }


def _gold_rows(
    program: dspy.Module, example: dspy.Example, index: int, score: float, calls: list, gold: dict[str, list[str]]
) -> list[dict]:
    """For a failed example: each label module's prompt, on the inputs it was given, with the gold
    answer. A module that failed to parse left no call: its inputs are then the example's inputs and
    the outputs of the calls before it (modules read fields by name). A module whose inputs or other
    outputs are unknown (an earlier module failed) gives no row."""
    labels = example.labels().toDict()
    known = {**example.inputs().toDict(), **{k: v for _, _, o in calls for k, v in o.items()}}
    rows = []
    for module, fields in gold.items():
        for predictor in predictors_of(program, module):
            seen = next(((dict(i), o.toDict()) for p, i, o in calls if p is predictor), None)
            wanted = list(predictor.signature.input_fields)
            inputs = seen[0] if seen else {k: known[k] for k in wanted if k in known}
            outputs = {
                f: labels[f] if f in fields else (seen[1].get(f) if seen else None)
                for f in predictor.signature.output_fields
            }
            if set(wanted) <= set(inputs) and all(v is not None for v in outputs.values()):
                rows.append(_row(module, index, score, "labels", predictor, inputs, outputs))
    return rows


def label_traces(program: dspy.Module, trainset: list[dspy.Example], module: str) -> Traces:
    """Rows from the gold labels: the module's prompt with the right answer (single-module programs)."""
    (predictor,) = predictors_of(program, module)
    rows = [
        _row(module, i, 1.0, "labels", predictor, example.inputs().toDict(), example.labels().toDict())
        for i, example in enumerate(trainset)
    ]
    return Traces(rows, len(trainset), len(trainset), {module: len(rows)})
