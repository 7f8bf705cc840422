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

A field is label-like when its gold values on the split are few (at most MAX_LABELS distinct ones):
sentiment, a flower species; not a number or free text. Values are compared as the built-in
exact_match metric compares them (case, punctuation and surrounding quotes ignored). A program that
answers one value to everything scores the majority share; a score whose 95% interval holds the
majority-class score is not distinguishable from such a program.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

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
    """One line per reason to distrust the score: the program collapsed to one answer, or its 95%
    interval holds the majority-class score."""
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
    return warnings
