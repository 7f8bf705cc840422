"""Compare finished runs: scores with intervals, paired significance, the quality/cost front, gates.

    groups = [load_group("seq", Path("runs")), load_group("joint", Path("runs"))]
    report = build_report(groups)            # plain dict: runs, pairs, pareto (what --json prints)
    print_report(report)
    failures = check_gates(report, require=["joint > seq"], min_score=["0.8"])

A group is one run directory, or a folder of seed runs (`jointopt joint --seeds 0,1,2` makes
NAME/seed-0, NAME/seed-1, ...). A group's test score is that of each run's best step by dev score
(the step a user would ship), averaged over seeds per example; its interval resamples examples.
Runs compare only when they used the same data splits and the same metric.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .metrics import is_binary
from .rundir import RunDir, Step, read_jsonl
from .schedule import best_step
from .stats import Difference, bootstrap_ci, mcnemar, paired_difference, pareto_front

GATE = re.compile(r"^\s*(\S+)\s*(>=|>)\s*(\S+)\s*$")


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
    error: str | None = None  # why the run stopped, when its last step failed

    @classmethod
    def load(cls, path: Path) -> "RunRecord":
        run = RunDir.existing(path)
        recipe, manifest = run.recipe(), run.manifest()
        every = [Step(**s) for s in manifest["steps"]]  # RunDir.existing checked they parse
        steps = [s for s in every if s.status == "done" and s.kind in ("baseline", "p", "w", "init", "eval")]
        scored = [s for s in steps if "dev" in s.scores]
        best = next((s for s in scored if s.folder == manifest.get("best")), None)
        if best is None:  # an unfinished joint run: the best so far, as the schedule picks it
            best = best_step(scored)
        record = cls(run.path, recipe.seed, recipe.schedule.strategy, manifest.get("data_fingerprint"),
                     {"name": recipe.metric.name, "field": recipe.label_field}, steps, best)
        last = every[-1] if every else None
        if last is not None and last.status != "done":
            record.error = f"{last.folder} {last.status}: {last.error or ''}".strip()
        predictions = run.path / best.folder / "predictions-test.jsonl" if best else None
        # a run that stopped on a failed step has no result: a test score of a step it adopted or
        # reached before the failure would read as the strategy's
        if predictions is not None and predictions.is_file() and record.error is None:
            record.test = {int(r["index"]): float(r["score"]) for r in read_jsonl(predictions)}
        return record

    @property
    def baseline(self) -> float | None:
        return next((s.scores["dev"] for s in self.steps if s.kind == "baseline" and "dev" in s.scores), None)

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
    for g, r in runs:
        if r.fingerprint is None:
            raise InputError(f"{r.path}: has no evaluated step yet; nothing to compare")
        if r.fingerprint != r0.fingerprint:
            raise InputError(f"cannot compare {r0.path} and {r.path}: they used different data splits")
        if r.metric != r0.metric:
            raise InputError(f"cannot compare {r0.path} and {r.path}: different metrics "
                             f"({r0.metric['name']} on {r0.metric['field']} vs {r.metric['name']} on {r.metric['field']})")
    labels = [g.label for g in groups]
    if len(set(labels)) != len(labels):
        raise InputError(f"the same run is named twice: {', '.join(labels)}")


# ---------------------------------------------------------------- the report
def _test_matrix(group: Group) -> tuple[list[int], np.ndarray] | None:
    """(example indices, seeds x examples scores) over the test examples every run scored."""
    if not group.runs or any(not r.test for r in group.runs):
        return None
    common = sorted(set.intersection(*(set(r.test) for r in group.runs)))
    return common, np.array([[r.test[i] for i in common] for r in group.runs])


def _cost(run: RunRecord, step: Step) -> dict:
    """Mean inference cost per dev example of a step's program; seconds only from uncached calls."""
    path = run.path / step.folder / "predictions.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    if not rows:
        return {"tokens": None, "seconds": None}
    tokens = sum(r.get("tokens_in", 0) + r.get("tokens_out", 0) for r in rows) / len(rows)
    timed = [r["seconds"] for r in rows if not r.get("cached_calls")]
    return {"tokens": round(tokens, 1), "seconds": round(sum(timed) / len(timed), 4) if timed else None}


def build_report(groups: list[Group]) -> dict:
    check_comparable(groups)
    binary = is_binary(groups[0].runs[0].metric["name"])
    runs, matrices = [], {}
    for g in groups:
        matrix = _test_matrix(g)
        entry = {
            "label": g.label, "path": str(g.path), "strategy": g.runs[0].strategy,
            "seeds": [r.seed for r in g.runs], "n_test": None,
            "baseline": _mean([r.baseline for r in g.runs]),
            "best_dev": _mean([r.best.scores["dev"] if r.best else None for r in g.runs]),
            "best_step": sorted({r.best.folder for r in g.runs if r.best}),
            "test": None, "test_low": None, "test_high": None, "test_std": None,
            "seconds": round(sum(r.seconds for r in g.runs) / len(g.runs), 1),
            "tokens": round(sum(r.tokens for r in g.runs) / len(g.runs)),
            "train_steps": round(sum(r.train_steps for r in g.runs) / len(g.runs)),
            "per_run": [{"path": str(r.path), "seed": r.seed, "best_step": r.best.folder if r.best else None,
                         "best_dev": r.best.scores.get("dev") if r.best else None,
                         "test": r.best.scores.get("test") if r.best and not r.error else None, "error": r.error}
                        for r in g.runs],
            "errors": [f"{r.path.name}: {r.error}" if len(g.runs) > 1 else r.error for r in g.runs if r.error],
        }
        if matrix is not None:
            indices, scores = matrix
            matrices[g.label] = (indices, scores)
            entry["n_test"] = len(indices)
            entry["test"], entry["test_low"], entry["test_high"] = _rounded(bootstrap_ci(scores.mean(axis=0)))
            if len(g.runs) > 1:
                entry["test_std"] = round(float(scores.mean(axis=1).std(ddof=1)), 4)
        runs.append(entry)
    return {"metric": groups[0].runs[0].metric, "binary": binary, "runs": runs,
            "pairs": _pairs(groups, matrices, binary), "pareto": _pareto(groups)}


def _pairs(groups: list[Group], matrices: dict, binary: bool) -> list[dict]:
    pairs = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
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
            pairs.append(_pair_entry(a.label, b.label, len(common), diff))
    return pairs


def _pair_entry(a: str, b: str, n: int, d: Difference) -> dict:
    delta, low, high = _rounded((d.delta, d.low, d.high))
    return {"a": a, "b": b, "n": n, "delta": delta, "low": low, "high": high,
            "only_a": d.only_a, "only_b": d.only_b,
            "p_mcnemar": None if d.p_mcnemar is None else round(d.p_mcnemar, 4), "significant": d.significant}


def _pareto(groups: list[Group]) -> list[dict]:
    """Every evaluated step of every run is a candidate program: (dev score, mean tokens per example)."""
    candidates = []
    for g in groups:
        for r in g.runs:
            seed_part = f"/{r.path.name}" if len(g.runs) > 1 else ""
            for s in r.steps:
                if "dev" not in s.scores or "adopted_from" in s.info:  # a sibling's step: counted there
                    continue
                cost = _cost(r, s)
                if cost["tokens"] is not None:
                    candidates.append({"candidate": f"{g.label}{seed_part}/{s.folder}", "group": g.label,
                                       "dev": s.scores["dev"], **cost})
    front = set(pareto_front([(c["dev"], c["tokens"]) for c in candidates]))
    for i, c in enumerate(candidates):
        c["on_front"] = i in front
    return candidates


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def _rounded(values):
    return tuple(round(v, 4) + 0.0 for v in values)  # + 0.0: no "-0.000" in tables


# ---------------------------------------------------------------- gates
def check_gates(report: dict, require: list[str], min_score: list[str]) -> list[str]:
    """One line per failed gate. `require`: "A > B" (A significantly better) or "A >= B" (A not
    significantly worse). `min_score`: "0.8" (every run's test score) or "NAME=0.8"."""
    failures = []
    by_label = {r["label"]: r for r in report["runs"]}
    for gate in require:
        m = GATE.match(gate)
        if not m:
            raise InputError(f"--require {gate!r}: write it as 'A > B' or 'A >= B' with run names")
        a, op, b = m.groups()
        for name in (a, b):
            if name not in by_label:
                raise InputError(f"--require {gate!r}: no run named {name!r} (runs: {', '.join(by_label)})")
        pair = next((p for p in report["pairs"] if {p["a"], p["b"]} == {a, b}), None)
        if pair is None:
            failures.append(f"{gate}: no paired test scores for {a} and {b}")
            continue
        sign = 1 if pair["a"] == a else -1
        delta, low, high = sign * pair["delta"] + 0.0, *sorted((sign * pair["low"] + 0.0, sign * pair["high"] + 0.0))
        worse = pair["significant"] and delta < 0
        better = pair["significant"] and delta > 0
        if (op == ">" and not better) or (op == ">=" and worse):
            verdict = "significantly worse" if worse else "not significantly better"
            failures.append(f"{gate}: {a} - {b} = {delta:+.3f} [{low:+.3f}, {high:+.3f}], {verdict}")
    for gate in min_score:
        name, _, value = gate.rpartition("=")
        try:
            threshold = float(value)
        except ValueError:
            raise InputError(f"--min-score {gate!r}: write a number, or NAME=number") from None
        if name and name not in by_label:
            raise InputError(f"--min-score {gate!r}: no run named {name!r} (runs: {', '.join(by_label)})")
        for r in report["runs"]:
            if name and r["label"] != name:
                continue
            if r["test"] is None:
                failures.append(f"--min-score {threshold}: {r['label']} has no test score")
            elif r["test"] < threshold:
                failures.append(f"--min-score {threshold}: {r['label']} scored {r['test']:.3f} on test")
    return failures


# ---------------------------------------------------------------- output
def print_report(report: dict, console) -> None:
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal:  # a log or a pipe: no terminal to wrap for, keep rows on one line
        console = Console(file=console.file, width=max(console.width, 160))

    f = lambda v, spec=".3f": "" if v is None else format(v, spec)  # noqa: E731
    runs = Table(title=f"runs ({report['metric']['name']} on {report['metric']['field']}; test = best step by dev, "
                       "95% bootstrap interval over examples)")
    for col in ("run", "strategy", "seeds", "baseline", "best dev", "test [95% CI]", "± std (seeds)", "best step",
                "wall s", "eval tokens", "train steps"):
        runs.add_column(col, justify="left" if col in ("run", "strategy", "best step") else "right")
    for r in report["runs"]:
        test = "" if r["test"] is None else f"{r['test']:.3f} [{r['test_low']:.3f}, {r['test_high']:.3f}]"
        runs.add_row(r["label"], r["strategy"] or "zero-shot", str(len(r["seeds"])), f(r["baseline"]),
                     f(r["best_dev"]), test, f(r["test_std"]), ", ".join(r["best_step"]), f(r["seconds"], ".0f"),
                     str(r["tokens"]), str(r["train_steps"]))
    console.print(runs)
    for r in report["runs"]:
        for error in r["errors"]:
            console.print(f"[red]{r['label']}[/] did not finish: {error}", highlight=False, soft_wrap=True)
    if report["pairs"]:
        pairs = Table(title="pairwise test differences (A - B on the same examples; paired bootstrap"
                            + (", McNemar" if report["binary"] else "") + ")")
        for col in ("A", "B", "n", "A - B [95% CI]", "A only / B only", "McNemar p", "verdict"):
            pairs.add_column(col, justify="left" if col in ("A", "B", "verdict") else "right")
        for p in report["pairs"]:
            verdict = ("[green]significant[/]" if p["significant"] else "not significant")
            counts = "" if p["only_a"] is None else f"{p['only_a']} / {p['only_b']}"
            pairs.add_row(p["a"], p["b"], str(p["n"]), f"{p['delta']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]",
                          counts, f(p["p_mcnemar"], ".4f"), verdict)
        console.print(pairs)
    front = sorted((c for c in report["pareto"] if c["on_front"]), key=lambda c: (c["tokens"], -c["dev"]))
    if front:
        table = Table(title=f"quality/cost Pareto front ({len(front)} of {len(report['pareto'])} step programs): "
                            "dev score against mean tokens per example")
        for col in ("program", "dev", "tokens/example", "seconds/example"):
            table.add_column(col, justify="left" if col == "program" else "right")
        for c in front:
            table.add_row(c["candidate"], f(c["dev"]), f(c["tokens"], ".0f"), f(c["seconds"], ".3f"))
        console.print(table)


def plot_report(report: dict, groups: list[Group], out: Path) -> None:
    """Two panels: dev score by step for each run, and the dev-score/tokens candidates with their front."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'jointopt[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .rundir import atomic_target

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for g in groups:  # one line per group: the mean over seeds at each step all its runs reached
        curves = [[s.scores["dev"] for s in r.steps if "dev" in s.scores] for r in g.runs]
        length = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
        seeds = f" ({len(curves)} seeds)" if len(curves) > 1 else ""
        left.plot(range(length), mean, marker="o", label=f"{g.label}{seeds}")
    left.set(title="dev score by step (0 = baseline)", xlabel="step", ylabel="dev score")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.legend(fontsize=8)
    for label in dict.fromkeys(c["group"] for c in report["pareto"]):
        points = [c for c in report["pareto"] if c["group"] == label]
        right.scatter([c["tokens"] for c in points], [c["dev"] for c in points], label=label, alpha=0.7)
    front = sorted((c for c in report["pareto"] if c["on_front"]), key=lambda c: c["tokens"])
    if front:
        right.step([c["tokens"] for c in front], [c["dev"] for c in front], where="post", color="black",
                   linewidth=1, label="Pareto front")
    right.set(title="quality against inference cost", xlabel="mean tokens per example", ylabel="dev score")
    right.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2)
