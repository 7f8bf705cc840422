"""The run directories a comparison reads: each run's program steps, the step it ships, that step's
test predictions; groups of seed runs; the check that runs are comparable."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..files import read_jsonl
from ..rundir import RunDir, Step
from ..selection import Selection, shipping
from ..step_kinds import PROGRAM_KINDS, StepKind


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
    # step folder -> split -> examples that raised an error and whose answers did not parse (failed steps too)
    failures: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        """The run at `path`: its finished program steps, the step it ships (selection.shipping: a
        joint run's recorded choice, else the best so far) and that step's test predictions."""
        run = RunDir.existing(path)
        recipe, every, shipped = run.recipe(), run.steps(), shipping(run)
        record = cls(
            run.path,
            recipe.seed,
            recipe.schedule.strategy,
            run.manifest().get("data_fingerprint"),
            {"name": recipe.metric.name, "field": recipe.label_field},
            [s for s in run.done_steps() if s.kind in PROGRAM_KINDS],
            shipped.step,
            selection=shipped.selection,
            failures={step.folder: counts for step in every if (counts := run.eval_failures(step))},
        )
        last = every[-1] if every else None
        if last is not None and last.status != "done":
            record.error = f"{last.folder} {last.status}: {last.error or ''}".strip()
        predictions = run.step_dir(shipped.step) / "predictions-test.jsonl" if shipped.step else None
        # a run that stopped on a failed step has no result: a test score of a step it adopted or
        # reached before the failure would read as the strategy's
        if predictions is not None and predictions.is_file() and record.error is None:
            record.test_rows = read_jsonl(predictions)
            record.test = {int(r["index"]): float(r["score"]) for r in record.test_rows}
        return record

    @property
    def baseline(self) -> float | None:
        """The baseline's dev score (the recipe's program before any step)."""
        return next((s.scores["dev"] for s in self.steps if s.kind == StepKind.BASELINE and "dev" in s.scores), None)

    @property
    def seconds(self) -> float:
        """Wall time of the run's steps (steps a sweep adopted from a sibling count as if run here)."""
        return sum(s.seconds or 0.0 for s in self.steps)

    @property
    def tokens(self) -> int:
        """Prompt and completion tokens of the run's steps."""
        return sum(s.tokens.get("in", 0) + s.tokens.get("out", 0) for s in self.steps)

    @property
    def train_steps(self) -> int:
        """Optimizer steps of the run's LoRA training."""
        return sum(t.get("steps", 0) for s in self.steps for t in s.info.get("training", {}).values())


@dataclass
class Group:
    """What compare shows as one row: a run, or a folder of seed runs, under the name it was given."""

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
