"""Compare finished runs: scores with intervals, paired significance, the quality/cost front, gates.

    groups = [load_group("seq", Path("runs")), load_group("joint", Path("runs"))]
    report = build_report(groups)            # a Report: runs, pairs, pareto (report.to_json() is --json)
    report.gates = check_gates(report, require=["joint > seq"], min_score=["0.8"])
    report.gates.failures                    # one line per failed gate

A group is one run directory, or a folder of seed runs (`jointopt joint --seeds 0,1,2` makes
NAME/seed-0, NAME/seed-1, ...). A group's test score is that of each run's best step (the step a
user would ship: the best dev score, or the one the recipe's `schedule.select` rule chooses,
selection.py), averaged over seeds per example; its interval resamples examples.
Runs compare only when they used the same data splits and the same metric. compare_render.py
shows a report: tables, JSON text, plot.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .answers import answer_summary, answer_warnings
from .errors import GateError, InputError
from .files import read_jsonl
from .metrics import is_binary
from .rundir import RunDir, Step, StepKind
from .schedule import best_step
from .selection import Selection, choose_step, dev_cost
from .stats import Difference, bootstrap_ci, mcnemar, paired_difference, pareto_front

GATE = re.compile(r"^\s*([^\s<>=]+)\s*(>=|>)\s*([^\s<>=]+)\s*$")  # run names hold no '<', '>' or '='
# the steps whose program compare scores and counts (bootstrap steps only record traces)
PROGRAM_KINDS = (
    StepKind.BASELINE,
    StepKind.PROMPT,
    StepKind.WEIGHT,
    StepKind.SIMULTANEOUS,
    StepKind.INIT,
    StepKind.EVAL,
)


# ---------------------------------------------------------------- loading
@dataclass
class RunRecord:
    """What compare needs of one run directory."""

    path: Path
    seed: int
    strategy: str
    fingerprint: str | None
    metric: dict
    steps: list[Step]
    best: Step | None
    test: dict[int, float] = field(default_factory=dict)  # test example index -> score, best step
    test_rows: list[dict] = field(default_factory=list, repr=False)  # the best step's test predictions
    error: str | None = None  # why the run stopped, when its last step failed
    selection: Selection | None = None  # with a schedule.select rule: what it chooses among the steps

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        run = RunDir.existing(path)
        recipe, manifest, every = run.recipe(), run.manifest(), run.steps()
        steps = [s for s in every if s.status == "done" and s.kind in PROGRAM_KINDS]
        scored = [s for s in steps if "dev" in s.scores]
        select = recipe.schedule.select
        selection = choose_step(run.path, steps, select) if select is not None else None
        best = next((s for s in scored if s.folder == manifest.get("best")), None)
        if best is None:  # an unfinished joint run: the best so far, as the schedule picks it
            best = best_step(scored) if selection is None else next(s for s in scored if s.folder == selection.folder)
        record = cls(
            run.path,
            recipe.seed,
            recipe.schedule.strategy,
            manifest.get("data_fingerprint"),
            {"name": recipe.metric.name, "field": recipe.label_field},
            steps,
            best,
            selection=selection,
        )
        last = every[-1] if every else None
        if last is not None and last.status != "done":
            record.error = f"{last.folder} {last.status}: {last.error or ''}".strip()
        predictions = run.step_dir(best) / "predictions-test.jsonl" if best else None
        # a run that stopped on a failed step has no result: a test score of a step it adopted or
        # reached before the failure would read as the strategy's
        if predictions is not None and predictions.is_file() and record.error is None:
            record.test_rows = read_jsonl(predictions)
            record.test = {int(r["index"]): float(r["score"]) for r in record.test_rows}
        return record

    @property
    def baseline(self) -> float | None:
        return next((s.scores["dev"] for s in self.steps if s.kind == StepKind.BASELINE and "dev" in s.scores), None)

    @property
    def seconds(self) -> float:
        """Wall time of the run's steps (steps a sweep adopted from a sibling count as if run here)."""
        return sum(s.seconds or 0.0 for s in self.steps)

    @property
    def tokens(self) -> int:
        return sum(s.tokens.get("in", 0) + s.tokens.get("out", 0) for s in self.steps)

    @property
    def train_steps(self) -> int:
        return sum(t.get("steps", 0) for s in self.steps for t in s.info.get("training", {}).values())


@dataclass
class Group:
    label: str
    path: Path
    runs: list[RunRecord]


def load_group(arg: str, runs_dir: Path, label: str | None = None) -> Group:
    """A run directory, or a folder of seed runs, given as a path or as a name under the runs root."""
    path = Path(arg)
    if not path.exists() and not path.is_absolute():
        path = runs_dir / arg
    if (path / "manifest.json").is_file():
        return Group(label or arg, path, [RunRecord.load(path)])
    members = sorted(p.parent for p in path.glob("*/manifest.json")) if path.is_dir() else []
    if not members:
        raise InputError(f"{arg}: no run directory at {path} (nor seed runs inside it)")
    return Group(label or arg, path, [RunRecord.load(p) for p in members])


def check_comparable(groups: list[Group]) -> None:
    """Same data splits and same metric everywhere, else InputError (exit code 2)."""
    runs = [(g, r) for g in groups for r in g.runs]
    g0, r0 = runs[0]
    for _, r in runs:
        if r.fingerprint is None:
            raise InputError(f"{r.path}: has no evaluated step yet; nothing to compare")
        if r.fingerprint != r0.fingerprint:
            raise InputError(f"cannot compare {r0.path} and {r.path}: they used different data splits")
        if r.metric != r0.metric:
            raise InputError(
                f"cannot compare {r0.path} and {r.path}: different metrics "
                f"({r0.metric['name']} on {r0.metric['field']} vs {r.metric['name']} on {r.metric['field']})"
            )
    labels = [g.label for g in groups]
    if len(set(labels)) != len(labels):
        raise InputError(f"the same run is named twice: {', '.join(labels)}")


# ---------------------------------------------------------------- the report
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


def _selected(run: RunRecord) -> tuple[str | None, str | None]:
    """(the run's schedule.select rule in words, why it chose no step); (None, None) without a rule."""
    return (run.selection.rule, run.selection.fallback) if run.selection else (None, None)


def build_report(groups: list[Group]) -> Report:
    check_comparable(groups)
    binary = is_binary(groups[0].runs[0].metric["name"])
    field_name = groups[0].runs[0].metric["field"]
    runs, matrices = [], {}
    for g in groups:
        n = len(g.runs)
        n_test = test = test_low = test_high = test_std = None
        if (matrix := _test_matrix(g)) is not None:
            indices, scores = matrix
            matrices[g.label] = (indices, scores)
            n_test = len(indices)
            test, test_low, test_high = _rounded(bootstrap_ci(scores.mean(axis=0)))
            if n > 1:
                test_std = round(float(scores.mean(axis=1).std(ddof=1)), 4)
        runs.append(
            GroupSummary(
                label=g.label,
                path=str(g.path),
                strategy=g.runs[0].strategy,
                seeds=[r.seed for r in g.runs],
                n_test=n_test,
                baseline=_mean([r.baseline for r in g.runs]),
                best_dev=_mean([r.best.scores["dev"] if r.best else None for r in g.runs]),
                best_step=sorted({r.best.folder for r in g.runs if r.best}),
                test=test,
                test_low=test_low,
                test_high=test_high,
                test_std=test_std,
                seconds=round(sum(r.seconds for r in g.runs) / n, 1),
                tokens=round(sum(r.tokens for r in g.runs) / n),
                train_steps=round(sum(r.train_steps for r in g.runs) / n),
                per_run=[
                    RunSummary(
                        str(r.path),
                        r.seed,
                        r.best.folder if r.best else None,
                        r.best.scores.get("dev") if r.best else None,
                        r.best.scores.get("test") if r.best and not r.error else None,
                        r.error,
                        *_selected(r),
                    )
                    for r in g.runs
                ],
                errors=[f"{r.path.name}: {r.error}" if n > 1 else r.error for r in g.runs if r.error],
            )
        )
        if (summary := answer_summary([row for r in g.runs for row in r.test_rows], field_name)) is not None:
            runs[-1].answers = summary.answers
            if matrix is not None:
                runs[-1].warnings = answer_warnings(summary, list(matrix[1].mean(axis=0)))
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
    return PairSummary(
        a,
        b,
        n,
        delta,
        low,
        high,
        d.only_a,
        d.only_b,
        None if d.p_mcnemar is None else round(d.p_mcnemar, 4),
        d.significant,
    )


def _pareto(groups: list[Group]) -> list[Candidate]:
    """Every evaluated step of every run is a candidate program: (dev score, mean tokens per example)."""
    candidates = []
    for g in groups:
        for r in g.runs:
            seed_part = f"/{r.path.name}" if len(g.runs) > 1 else ""
            for s in r.steps:
                if "dev" not in s.scores or "adopted_from" in s.info:  # a sibling's step: counted there
                    continue
                cost = dev_cost(r.path / s.folder)
                if cost["tokens"] is not None:
                    candidates.append(
                        Candidate(
                            f"{g.label}{seed_part}/{s.folder}",
                            g.label,
                            s.scores["dev"],
                            cost["tokens"],
                            cost["seconds"],
                        )
                    )
    front = set(pareto_front([(c.dev, c.tokens) for c in candidates]))
    for i, c in enumerate(candidates):
        c.on_front = i in front
    return candidates


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def _rounded(values):
    return tuple(round(v, 4) + 0.0 for v in values)  # + 0.0: no "-0.000" in tables


# ---------------------------------------------------------------- gates
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
