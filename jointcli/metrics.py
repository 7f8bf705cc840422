"""Metrics in DSPy's convention: `metric(example, pred, trace=None) -> float`.

    >>> import dspy
    >>> from jointcli.recipe import Metric
    >>> metric = build_metric(Metric(name="exact_match"), "sentiment")  # the recipe's metric, its label field
    >>> metric(dspy.Example(sentiment="positive"), dspy.Prediction(sentiment=" Positive."))
    1.0
    >>> metric(dspy.Example(sentiment="positive"), dspy.Prediction())  # a parse failure
    0.0

The returned callable also accepts GEPA's extra arguments (pred_name, pred_trace), so the same
function serves Evaluate, the bootstrap optimizers and GEPA. A prediction that lacks the field
(a parse failure) scores 0.0.

Built-ins, each scoring from 0.0 to 1.0: exact_match (normalized string equality), numeric (last
number, |a-b| <= 1e-6), f1 (SQuAD token F1). Anything else is `package.module:function`, imported
with the current directory on sys.path; its result is made a float (a result with a `.score`, such
as GEPA's `dspy.Prediction(score=..., feedback=...)`, gives its score; None and NaN give 0.0). The
user function stays reachable as `metric.user_function`.
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from . import recipe
from .errors import InputError
from .imports import import_ref

MetricFn = Callable[..., float]
BINARY_METRICS = ("exact_match", "numeric")


def is_binary(metric_name: str) -> bool:
    """True when every score is 0.0 or 1.0 (exact_match, numeric): paired tests can use that."""
    return metric_name in BINARY_METRICS


# ---------------------------------------------------------------- helpers
def _value(obj: Any, name: str) -> Any:
    """obj.name for an Example/Prediction/object, obj[name] for a mapping; None when missing."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - an odd object is simply a missing value
        return None


_QUOTES = "\"'`\u2018\u2019\u201c\u201d\u00ab\u00bb"
_SURROUND = string.punctuation + _QUOTES + string.whitespace


def normalize_exact(text: Any) -> str:
    """Lowercase, strip surrounding whitespace/punctuation/quotes, collapse inner whitespace.

    The sign and decimal point of a leading number stay: "-5" and ".5" are not "5".

    >>> normalize_exact(' "Positive." '), normalize_exact("(-5)"), normalize_exact(".5")
    ('positive', '-5', '.5')
    """
    text = " ".join(str(text).lower().split()).rstrip(_SURROUND)
    stripped = text.lstrip(_SURROUND)
    if stripped[:1].isdigit():
        prefix = text[: len(text) - len(stripped)]
        stripped = re.search(r"-?\.?$", prefix).group() + stripped
    return stripped


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | set(_QUOTES)


def normalize_squad(text: Any) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace.

    >>> normalize_squad("The Eiffel  Tower!")
    'eiffel tower'
    """
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d+(?:\.\d+)?|\.\d+)")


def last_number(text: Any) -> float | None:
    """The last number in `text`, or None.

    >>> last_number("1,234"), last_number("$5"), last_number("from 2 to -3.50"), last_number("none")
    (1234.0, 5.0, -3.5, None)
    """
    if text is None:
        return None
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    cleaned = _THOUSANDS.sub("", str(text)).replace("$", "")
    found = _NUMBER.findall(cleaned)
    return float(found[-1]) if found else None


# ---------------------------------------------------------------- built-in scores
def exact_match_score(gold: Any, pred: Any) -> float:
    """1.0 when the two are equal after normalize_exact; 0.0 when either is missing."""
    if gold is None or pred is None:
        return 0.0
    return float(normalize_exact(gold) == normalize_exact(pred))


def numeric_score(gold: Any, pred: Any) -> float:
    """1.0 when the last numbers of the two agree within 1e-6.

    >>> numeric_score("1,234", "The answer is 1234.")
    1.0
    """
    g, p = last_number(gold), last_number(pred)
    if g is None or p is None:
        return 0.0
    return float(math.isclose(g, p, rel_tol=0.0, abs_tol=1e-6))


def f1_score(gold: Any, pred: Any) -> float:
    """SQuAD token F1 of the normalized words (normalize_squad).

    >>> round(f1_score("the Eiffel Tower", "Eiffel tower in Paris"), 3)  # precision 2/4, recall 2/2
    0.667
    """
    if gold is None or pred is None:
        return 0.0
    gold_toks, pred_toks = normalize_squad(gold).split(), normalize_squad(pred).split()
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


_SCORES = {"exact_match": exact_match_score, "numeric": numeric_score, "f1": f1_score}


# ---------------------------------------------------------------- user metrics
def _import_metric(ref: str) -> Callable:
    fn = import_ref(ref, "metric.name")
    if not callable(fn):
        raise InputError(f"metric.name: cannot import {ref!r}: {type(fn).__name__} is not callable")
    return fn


def _arity(fn: Callable) -> int:
    """How many positional arguments to pass: 5 (GEPA style), 3 (with trace) or 2."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 3
    for n in (5, 3, 2):
        try:
            sig.bind(*([None] * n))
            return n
        except TypeError:
            continue
    return 3


def _to_float(result: Any) -> float:
    if result is None:
        return 0.0
    score = _value(result, "score") if not isinstance(result, (int, float)) else result
    if score is None:
        score = result
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise TypeError(f"metric returned {type(result).__name__}, not a number") from None
    return 0.0 if math.isnan(value) else value


# ---------------------------------------------------------------- public
def check_metric_name(name: str) -> None:
    """A name without ':' must be a built-in metric's (the recipe checks the form of the rest)."""
    if ":" not in name and name not in _SCORES:
        raise InputError(
            f"metric.name: unknown metric {name!r}; use one of {', '.join(_SCORES)} or package.module:function"
        )


def build_metric(metric: recipe.Metric, label_field: str) -> MetricFn:
    """A DSPy metric `(example, pred, trace=None, pred_name=None, pred_trace=None) -> float`."""
    field = metric.field or label_field
    name = metric.name
    check_metric_name(name)

    if name in _SCORES:
        score = _SCORES[name]

        def builtin_metric(example, pred, trace=None, pred_name=None, pred_trace=None) -> float:
            return score(_value(example, field), _value(pred, field))

        builtin_metric.__name__ = name
        builtin_metric.__qualname__ = name
        builtin_metric.field = field
        return builtin_metric

    fn = _import_metric(name)
    arity = _arity(fn)

    def user_metric(example, pred, trace=None, pred_name=None, pred_trace=None) -> float:
        return _to_float(fn(*(example, pred, trace, pred_name, pred_trace)[:arity]))

    user_metric.__name__ = name.rpartition(":")[2]
    user_metric.__qualname__ = user_metric.__name__
    user_metric.field = field
    user_metric.user_function = fn
    return user_metric


__all__ = [
    "build_metric",
    "check_metric_name",
    "is_binary",
    "exact_match_score",
    "numeric_score",
    "f1_score",
    "normalize_exact",
    "normalize_squad",
    "last_number",
]
