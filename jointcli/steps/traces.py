"""Bootstrap: record what each module was asked and answered on the training split, keep what passes.

    traces = collect_traces(program, trainset, metric, modules=["classify"], threshold=1.0)
    traces.rows[0] == {"module": "classify", "example": 3, "score": 1.0, "messages": [...]}

A row's `messages` are the chat messages DSPy's adapter sends for that module (system, demos,
user) followed by the assistant's answer in the adapter's format: exactly what a fine-tune on
the module should teach. Failed predictions (parse failures, errors) are never kept, whatever
the metric says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dspy

from .parallel import parallel_map
from ..program import predictors_of


@dataclass
class Traces:
    rows: list[dict]
    run: int  # examples run
    passed: int  # examples whose score reached the threshold
    per_module: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    def counts(self) -> dict:
        return {"run": self.run, "passed": self.passed, "rows": len(self.rows),
                "per_module": self.per_module, "errors": self.errors}


def _adapter() -> dspy.ChatAdapter:
    return dspy.settings.adapter or dspy.ChatAdapter()


def _messages(predictor: dspy.Predict, inputs: dict, outputs: dict) -> list[dict]:
    data = _adapter().format_finetune_data(signature=predictor.signature, demos=predictor.demos,
                                           inputs=inputs, outputs=outputs)
    return data["messages"]


def _module_of(program: dspy.Module, modules: list[str]) -> dict[int, str]:
    return {id(p): m for m in modules for p in predictors_of(program, m)}


def collect_traces(program: dspy.Module, trainset: list[dspy.Example], metric, modules: list[str],
                   threshold: float, num_threads: int = 4) -> Traces:
    """Run `program` over `trainset` and keep, per module, the calls of examples that pass."""
    owner = _module_of(program, modules)

    def one(item):
        index, example = item
        with dspy.context(trace=[]):
            try:
                prediction = program(**example.inputs())
            except Exception:  # a failed prediction teaches nothing; counted as an error
                return index, None, []
            score = float(metric(example, prediction))
            return index, score, list(dspy.settings.trace)

    rows, passed, errors = [], 0, 0
    per_module = {m: 0 for m in modules}
    for index, score, calls in parallel_map(one, list(enumerate(trainset)), num_threads, "bootstrapping traces"):
        if score is None:
            errors += 1
            continue
        if score < threshold:
            continue
        passed += 1
        for predictor, inputs, outputs in calls:
            module = owner.get(id(predictor))
            if module is None:
                continue
            rows.append({"module": module, "example": index, "score": score,
                         "messages": _messages(predictor, dict(inputs), outputs.toDict())})
            per_module[module] += 1
    return Traces(rows, len(trainset), passed, per_module, errors)


def label_traces(program: dspy.Module, trainset: list[dspy.Example], module: str) -> Traces:
    """Rows from the gold labels: the module's prompt with the right answer (single-module programs)."""
    (predictor,) = predictors_of(program, module)
    rows = [{"module": module, "example": i, "score": 1.0,
             "messages": _messages(predictor, example.inputs().toDict(), example.labels().toDict())}
            for i, example in enumerate(trainset)]
    return Traces(rows, len(trainset), len(trainset), {module: len(rows)})
