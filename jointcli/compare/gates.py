"""Gates: what `--require` and `--min-score` ask of a comparison; a failed one exits with code 3.

>>> parse_require("joint > seq")  # joint significantly better than seq on test
('joint', '>', 'seq')
>>> parse_require("joint >= seq")  # joint not significantly worse
('joint', '>=', 'seq')
>>> parse_min_score("0.8"), parse_min_score("joint=0.8")  # every run's test score, one run's
(('', 0.8), ('joint', 0.8))

`check_gate_syntax` checks their form before any run is read (a sweep: before it runs);
`check_gates(report, require, min_score)` checks them against a report (compare.report).
"""

from __future__ import annotations

import re

from ..errors import InputError
from .report import Gates, Report

GATE = re.compile(r"^\s*([^\s<>=]+)\s*(>=|>)\s*([^\s<>=]+)\s*$")  # run names hold no '<', '>' or '='


def parse_require(gate: str) -> tuple[str, str, str]:
    """'A > B' -> ('A', '>', 'B'): A significantly better than B; 'A >= B': A not significantly worse."""
    m = GATE.match(gate)
    if not m:
        raise InputError(f"--require {gate!r}: write it as 'A > B' or 'A >= B' with run names")
    a, op, b = m.groups()
    if a == b:
        raise InputError(f"--require {gate!r}: compares {a!r} with itself")
    return a, op, b


def parse_min_score(gate: str) -> tuple[str, float]:
    """'0.8' -> ('', 0.8): every run's test score; 'NAME=0.8' -> ('NAME', 0.8): one run's."""
    name, _, value = gate.rpartition("=")
    try:
        threshold = float(value)
    except ValueError:
        raise InputError(f"--min-score {gate!r}: write a number, or NAME=number") from None
    if not 0.0 <= threshold <= 1.0:  # NaN too
        raise InputError(f"--min-score {gate!r}: a test score is between 0 and 1")
    return name, threshold


def check_gate_syntax(require: list[str], min_score: list[str]) -> None:
    """The gates' form, before any run is read (or, for a sweep, run)."""
    for gate in require:
        parse_require(gate)
    for gate in min_score:
        parse_min_score(gate)


def check_gates(report: Report, require: list[str], min_score: list[str]) -> Gates:
    """The gates and one line per failed one. `require`: "A > B" (A significantly better) or
    "A >= B" (A not significantly worse). `min_score`: "0.8" (every run's test score) or "NAME=0.8"."""
    failures = []
    by_label = {r.label: r for r in report.runs}
    for gate in require:
        a, op, b = parse_require(gate)
        for name in (a, b):
            if name not in by_label:
                raise InputError(f"--require {gate!r}: no run named {name!r} (runs: {', '.join(by_label)})")
        pair = next((p for p in report.pairs if {p.a, p.b} == {a, b}), None)
        if pair is None:
            failures.append(f"{gate}: no paired test scores for {a} and {b}")
            continue
        sign = 1 if pair.a == a else -1
        delta, low, high = sign * pair.delta + 0.0, *sorted((sign * pair.low + 0.0, sign * pair.high + 0.0))
        worse = pair.significant and delta < 0
        better = pair.significant and delta > 0
        if (op == ">" and not better) or (op == ">=" and worse):
            verdict = "significantly worse" if worse else "not significantly better"
            failures.append(f"{gate}: {a} - {b} = {delta:+.3f} [{low:+.3f}, {high:+.3f}], {verdict}")
    for gate in min_score:
        name, threshold = parse_min_score(gate)
        if name and name not in by_label:
            raise InputError(f"--min-score {gate!r}: no run named {name!r} (runs: {', '.join(by_label)})")
        for r in report.runs:
            if name and r.label != name:
                continue
            if r.test is None:
                failures.append(f"--min-score {threshold}: {r.label} has no test score")
            elif r.test < threshold:
                failures.append(f"--min-score {threshold}: {r.label} scored {r.test:.3f} on test")
    return Gates(list(require), list(min_score), failures)
