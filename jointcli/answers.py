"""What a program answers, for label-like outputs: the distribution of its predictions, the score of
always answering the majority class, and warnings when a score means less than it seems.

    >>> gold = ["positive"] * 6 + ["negative"] * 4
    >>> rows = [{"gold": {"sentiment": g}, "prediction": {"sentiment": "Positive."}} for g in gold]
    >>> rows[-1]["prediction"] = None  # a parse failure
    >>> summary = answer_summary(rows, "sentiment")  # rows as in predictions.jsonl; None: not label-like
    >>> summary.answers, summary.majority_label, summary.majority_score
    ({'positive': 9, '<none>': 1}, 'positive', 0.6)
    >>> format_answers(summary.answers)
    'positive 9, <none> 1'
    >>> for warning in answer_warnings(summary, [1.0] * 6 + [0.0] * 4):
    ...     print(warning)
    answers 'positive' to every example it answers
    0.600 is within the 95% interval [0.300, 0.900] of always answering 'positive' (0.600)

When a step's score means little, `likely_causes` lists what it can see that would explain it, each
with the override that tests it (the schedule adds them to the step's warnings):

    >>> facts = StepFacts("w", ["neg"] * 40 + ["pos"] * 20, "label", steps=8, rows=60, floor=24,
    ...     trained=["neg"] * 50 + ["pos"] * 10, instructions={"program.modules.0.instructions": "Classify it."})
    >>> for line in likely_causes(facts):  # doctest: +NORMALIZE_WHITESPACE
    ...     print(line)
    likely cause: 8 optimizer steps on 60 rows are too few to learn more than one answer;
        test: optimizers.w.train.steps=24
    likely cause: the training split is 40 of 60 'neg' (0.67): answering 'neg' to everything scores that
    likely cause: the weight step trained on rows that are 50 of 60 'neg' (0.83; the training split: 0.67);
        test: optimizers.w.traces.source=labels
    likely cause: the instructions do not name the labels (neg, pos);
        test: 'program.modules.0.instructions=Classify it. Answer with one of: neg, pos.'

A field is label-like when its gold values on the split are few (at most MAX_LABELS distinct ones):
sentiment, a flower species; not a number or free text. Values are compared as the built-in
exact_match metric compares them (case, punctuation and surrounding quotes ignored). A program that
answers one value to everything scores the majority share; a score whose 95% interval holds the
majority-class score is not distinguishable from such a program.
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from dataclasses import dataclass, field

from .metrics import normalize_exact

MAX_LABELS = 10
NO_ANSWER = "<none>"  # a parse failure or an error: no value for the field


@dataclass
class AnswerSummary:
    """What a program answered on one split, beside the score of always answering the majority label."""

    answers: dict[str, int]  # predicted value -> examples, most common first; NO_ANSWER for none
    majority_label: str  # the most common gold value (ties: the first in sorted order)
    majority_score: float  # its share of the split: the score of always answering it
    labels: int  # distinct gold values

    def to_json(self) -> dict:
        return {
            "answers": self.answers,
            "majority_label": self.majority_label,
            "majority_score": round(self.majority_score, 4),
            "labels": self.labels,
        }


def answer_summary(rows: list[dict], field: str | None) -> AnswerSummary | None:
    """From evaluation rows ({"gold": {...}, "prediction": {...} | None}); None when the field is
    not label-like, a row has no gold value for it, or there are no rows."""
    values = [(r.get("gold") or {}).get(field) for r in rows] if field else []
    if not values or any(v is None for v in values):
        return None
    gold = Counter(normalize_exact(v) for v in values)
    if len(gold) > MAX_LABELS or len(gold) >= len(rows) > 2:
        return None
    label, count = min(gold.items(), key=lambda kv: (-kv[1], kv[0]))
    answers = Counter(_answer(r, field) for r in rows)
    return AnswerSummary(
        dict(sorted(answers.items(), key=lambda kv: (-kv[1], kv[0]))), label, count / len(rows), len(gold)
    )


def _answer(row: dict, field: str) -> str:
    value = (row.get("prediction") or {}).get(field)
    return NO_ANSWER if value is None else normalize_exact(value) or NO_ANSWER


def format_answers(answers: dict[str, int]) -> str:
    """'positive 46, <none> 4' for {"positive": 46, "<none>": 4}: the answers in tables and logs."""
    return ", ".join(f"{answer} {n}" for answer, n in answers.items())


def answer_warnings(summary: AnswerSummary | None, scores: list[float]) -> list[str]:
    """One line per reason to distrust the score: the program collapsed to one answer, its 95%
    interval holds the majority-class score, or lies below it (while some answers parse)."""
    from .stats import bootstrap_ci  # numpy: `status` imports this module only to format answers

    if summary is None or not scores:
        return []
    warnings = []
    given = [a for a in summary.answers if a != NO_ANSWER]
    if len(given) == 1 and summary.labels > 1:
        warnings.append(f"answers {given[0]!r} to every example it answers")
    mean, low, high = bootstrap_ci(scores)
    if low <= summary.majority_score <= high:
        warnings.append(
            f"{mean:.3f} is within the 95% interval [{low:.3f}, {high:.3f}] of always answering "
            f"{summary.majority_label!r} ({summary.majority_score:.3f})"
        )
    elif high < summary.majority_score and given:  # answers that parse, and worse than a constant
        warnings.append(
            f"{mean:.3f} is below always answering {summary.majority_label!r} ({summary.majority_score:.3f}): "
            f"its 95% interval [{low:.3f}, {high:.3f}] lies under that score"
        )
    return warnings


# ---------------------------------------------------------------- what to try
IMBALANCED = 0.65  # a majority share of the training rows from which a constant answer is a likely outcome
TRACES_SKEW = 0.15  # trained rows more one-sided than the training split by this much: the traces skewed them


@dataclass
class StepFacts:
    """What a step's likely causes are read from (the schedule gathers them from the run)."""

    key: str | None  # the optimizer key (None: the baseline)
    gold: list  # the training split's gold values of the label field
    label: str  # the label field
    steps: int | None = None  # a weight step's optimizer steps (its first adapter's), and its rows
    rows: int | None = None
    floor: int | None = None  # train.min_steps of the weight step's optimizer
    trained: list[str] | None = None  # the answers of the rows the weight step trained on
    # where the instructions of each module that outputs the label can be set (an override key, or a
    # sentence saying where) -> the instructions
    instructions: dict[str, str] = field(default_factory=dict)
    model: str | None = None  # the recipe's name of the model that answers the label
    tuned: bool = False  # the step's program runs on weights a weight step trained


def _share(values: list) -> tuple[str, int, float]:
    """(the most common value, its count, its share), as exact_match compares values."""
    value, count = Counter(normalize_exact(v) for v in values).most_common(1)[0]
    return value, count, count / len(values)


def _named(text: str, value: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", normalize_exact(text)) is not None


def likely_causes(facts: StepFacts) -> list[str]:
    """The causes of a collapsed or majority-level score that the facts show, each with the override
    that tests it: too few optimizer steps for the rows, a label imbalance in the training rows (the
    split's, or the traces' when they are more one-sided), instructions that do not name the labels; for
    a program on trained weights that none of them explains, the model's size."""
    out = []
    if facts.steps is not None and facts.floor and facts.steps < facts.floor:
        out.append(
            f"likely cause: {facts.steps} optimizer steps on {facts.rows} rows are too few to learn more than "
            f"one answer; test: optimizers.{facts.key}.train.steps={facts.floor}"
        )
    if facts.gold:
        value, count, share = _share(facts.gold)
        if share >= IMBALANCED:
            out.append(
                f"likely cause: the training split is {count} of {len(facts.gold)} {value!r} ({share:.2f}): "
                f"answering {value!r} to everything scores that"
            )
        if facts.trained:
            top, n, trained_share = _share(facts.trained)
            if trained_share >= IMBALANCED and trained_share >= share + TRACES_SKEW:
                out.append(
                    f"likely cause: the weight step trained on rows that are {n} of {len(facts.trained)} {top!r} "
                    f"({trained_share:.2f}; the training split: {share:.2f}); test: "
                    f"optimizers.{facts.key}.traces.source=labels"
                )
    out += _unnamed_labels(facts)
    if not out and (facts.steps is not None or facts.tuned):  # trained, and none of these explains it
        length = f"{facts.steps} optimizer steps on {facts.rows} rows" if facts.steps is not None else "training length"
        out.append(
            f"likely cause: none of those jointopt checks ({length}, trained rows as balanced as the split, "
            "instructions that name the labels): the task may be beyond the model; test: a larger one, "
            f"models.{facts.model or 'NAME'}.path=<a Hugging Face checkpoint folder>"
        )
    return out


def _unnamed_labels(facts: StepFacts) -> list[str]:
    labels = sorted({normalize_exact(v) for v in facts.gold})
    if not 2 <= len(labels) <= MAX_LABELS:
        return []
    out = []
    for where, text in facts.instructions.items():
        if all(_named(text, v) for v in labels):
            continue
        named = f"the instructions do not name the labels ({', '.join(labels)})"
        better = f"{text.rstrip().rstrip('.')}. Answer with one of: {', '.join(labels)}."
        if where.startswith("program.modules."):
            out.append(f"likely cause: {named}; test: {shlex.quote(f'{where}={better}')}")
        else:
            out.append(f"likely cause: {named}; name them in {where}")
    return out
