"""The comparison of groups of runs (compare.runs): a row per group with its test score and its
interval, a paired difference per pair of groups, every step program on the quality/cost plane,
the majority-class score. `Report.to_json()` is what `--json` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..answers import answer_summary, answer_warnings
from ..errors import GateError
from ..metrics import is_binary
from ..selection import dev_cost
from ..stats import Difference, bootstrap_ci, mcnemar, paired_difference, pareto_front
from .runs import Group, RunRecord, check_comparable


# Field order is the order of the keys in `--json`.
@dataclass
class RunSummary:
    """One run of a group: its best step (by dev score, or by schedule.select), and that step's test score."""

    path: str
    seed: int
    best_step: str | None
    best_dev: float | None
    test: float | None  # None when the run stopped on a failed step
    error: str | None
    selected_by: str | None = None  # the schedule.select rule in words; None: the best dev score
    selection_warning: str | None = None  # why the rule chose no step (the best dev score is used)
    # step folder -> split -> {"errors": examples that raised, "parse_failures": answers that did not parse}
    failures: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)


@dataclass
class GroupSummary:
    """A row of the runs table: a group's scores (means over its seeds) and costs."""

    label: str
    path: str
    strategy: str
    seeds: list[int]
    n_test: int | None  # test examples every run of the group scored; None: no test result
    baseline: float | None
    best_dev: float | None
    best_step: list[str]
    test: float | None
    test_low: float | None  # 95% bootstrap interval over examples
    test_high: float | None
    test_std: float | None  # across seeds, with more than one
    seconds: float
    tokens: int
    train_steps: int
    per_run: list[RunSummary]
    errors: list[str]
    answers: dict[str, int] | None = None  # label-like fields: the best steps' test answers, all seeds
    warnings: list[str] = field(default_factory=list)  # reasons to distrust the test score (answers.py)


@dataclass
class PairSummary:
    """Group a against group b on the test examples both scored: a - b, paired."""

    a: str
    b: str
    n: int
    delta: float
    low: float
    high: float
    only_a: int | None  # McNemar's discordant counts (binary metrics, runs matched by seed)
    only_b: int | None
    p_mcnemar: float | None
    significant: bool


@dataclass
class Candidate:
    """A step's program as a point of the quality/cost plane."""

    candidate: str  # label[/seed-run]/step folder
    group: str
    dev: float
    tokens: float  # mean per dev example
    seconds: float | None  # mean per dev example, from uncached calls only
    on_front: bool = False


@dataclass
class Gates:
    """The gates asked for and those that failed (one line each)."""

    require: list[str]
    min_score: list[str]
    failures: list[str]

    def error(self) -> GateError | None:
        """What a failed gate ends with (exit code 3)."""
        return GateError("gate failed: " + "; ".join(self.failures)) if self.failures else None


@dataclass
class Majority:
    """The majority-class row: always answering the most common gold label of the test examples."""

    label: str
    test: float
    n: int


@dataclass
class Report:
    metric: dict  # {"name": ..., "field": ...}
    binary: bool
    runs: list[GroupSummary]
    pairs: list[PairSummary]
    pareto: list[Candidate]
    majority: Majority | None = None  # label-like fields only
    gates: Gates | None = None

    def to_json(self) -> dict:
        """What `--json` prints: plain values, keys in field order; "gates" once they are checked."""
        data = asdict(self)
        if self.gates is None:
            del data["gates"]
        return data


def _test_matrix(group: Group) -> tuple[list[int], np.ndarray] | None:
    """(example indices, seeds x examples scores) over the test examples every run scored."""
    if not group.runs or any(not r.test for r in group.runs):
        return None
    common = sorted(set.intersection(*(set(r.test) for r in group.runs)))
    return common, np.array([[r.test[i] for i in common] for r in group.runs])


def _run_summary(run: RunRecord) -> RunSummary:
    """A run's best step and its scores; the schedule.select rule in words and why it chose no step."""
    best, rule = run.best, run.selection
    return RunSummary(
        str(run.path),
        run.seed,
        best.folder if best else None,
        best.scores.get("dev") if best else None,
        best.scores.get("test") if best and not run.error else None,
        run.error,
        rule.rule if rule else None,
        rule.fallback if rule else None,
        run.failures,
    )


def _group_summary(g: Group, matrix: tuple[list[int], np.ndarray] | None, field_name: str) -> GroupSummary:
    """A group's row: means over its seeds; the test score's interval over the examples all seeds scored."""
    n = len(g.runs)
    summary = GroupSummary(
        label=g.label,
        path=str(g.path),
        strategy=g.runs[0].strategy,
        seeds=[r.seed for r in g.runs],
        n_test=None,
        baseline=_mean([r.baseline for r in g.runs]),
        best_dev=_mean([r.best.scores["dev"] if r.best else None for r in g.runs]),
        best_step=sorted({r.best.folder for r in g.runs if r.best}),
        test=None,
        test_low=None,
        test_high=None,
        test_std=None,
        seconds=round(sum(r.seconds for r in g.runs) / n, 1),
        tokens=round(sum(r.tokens for r in g.runs) / n),
        train_steps=round(sum(r.train_steps for r in g.runs) / n),
        per_run=[_run_summary(r) for r in g.runs],
        errors=[f"{r.path.name}: {r.error}" if n > 1 else r.error for r in g.runs if r.error],
    )
    if matrix is not None:
        indices, scores = matrix
        summary.n_test = len(indices)
        summary.test, summary.test_low, summary.test_high = _rounded(bootstrap_ci(scores.mean(axis=0)))
        if n > 1:
            summary.test_std = round(float(scores.mean(axis=1).std(ddof=1)), 4)
    if (answers := answer_summary([row for r in g.runs for row in r.test_rows], field_name)) is not None:
        summary.answers = answers.answers
        if matrix is not None:
            summary.warnings = answer_warnings(answers, list(matrix[1].mean(axis=0)))
    return summary


def build_report(groups: list[Group]) -> Report:
    """The comparison of `groups` (check_comparable first): a row per group, a paired difference per
    pair of groups with test scores, every step program on the quality/cost plane."""
    check_comparable(groups)
    binary = is_binary(groups[0].runs[0].metric["name"])
    field_name = groups[0].runs[0].metric["field"]
    matrices = {g.label: matrix for g in groups if (matrix := _test_matrix(g)) is not None}
    runs = [_group_summary(g, matrices.get(g.label), field_name) for g in groups]
    return Report(
        groups[0].runs[0].metric,
        binary,
        runs,
        _pairs(groups, matrices, binary),
        _pareto(groups),
        _majority(groups, field_name),
    )


def _majority(groups: list[Group], field_name: str) -> Majority | None:
    """The majority-class score on the test examples of the first run with test predictions
    (comparable runs share their test split)."""
    rows = next((r.test_rows for g in groups for r in g.runs if r.test_rows), [])
    summary = answer_summary(rows, field_name)
    if summary is None:
        return None
    return Majority(summary.majority_label, round(summary.majority_score, 4), len(rows))


def _pairs(groups: list[Group], matrices: dict, binary: bool) -> list[PairSummary]:
    pairs = []
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            if a.label not in matrices or b.label not in matrices:
                continue
            (ia, sa), (ib, sb) = matrices[a.label], matrices[b.label]
            common = sorted(set(ia) & set(ib))
            if not common:
                continue
            pa, pb = sa[:, [ia.index(k) for k in common]], sb[:, [ib.index(k) for k in common]]
            diff = paired_difference(pa.mean(axis=0), pb.mean(axis=0))
            seeds_a, seeds_b = [r.seed for r in a.runs], [r.seed for r in b.runs]
            if binary and sorted(seeds_a) == sorted(seeds_b):
                # McNemar on (example, seed) pairs, runs matched by seed
                order_b = [seeds_b.index(s) for s in seeds_a]
                diff.only_a, diff.only_b, diff.p_mcnemar = mcnemar(pa.ravel(), pb[order_b].ravel())
            pairs.append(_pair(a.label, b.label, len(common), diff))
    return pairs


def _pair(a: str, b: str, n: int, d: Difference) -> PairSummary:
    delta, low, high = _rounded((d.delta, d.low, d.high))
    p = None if d.p_mcnemar is None else round(d.p_mcnemar, 4)
    return PairSummary(a, b, n, delta, low, high, d.only_a, d.only_b, p, d.significant)


def _pareto(groups: list[Group]) -> list[Candidate]:
    """Every evaluated step of every run is a candidate program: (dev score, mean tokens per example)."""
    candidates = []
    for g in groups:
        for r in g.runs:
            seed_part = f"/{r.path.name}" if len(g.runs) > 1 else ""
            for s in r.steps:
                if "dev" not in s.scores or "adopted_from" in s.info:  # a sibling's step: counted there
                    continue
                cost, name = dev_cost(r.path / s.folder), f"{g.label}{seed_part}/{s.folder}"
                if cost["tokens"] is not None:
                    candidates.append(Candidate(name, g.label, s.scores["dev"], cost["tokens"], cost["seconds"]))
    front = set(pareto_front([(c.dev, c.tokens) for c in candidates]))
    for i, c in enumerate(candidates):
        c.on_front = i in front
    return candidates


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def _rounded(values):
    return tuple(round(v, 4) + 0.0 for v in values)  # + 0.0: no "-0.000" in tables
