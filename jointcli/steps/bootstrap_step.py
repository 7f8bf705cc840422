"""The bootstrap step: record what a weight step will train on, from the run's current program.

    BootstrapStep("w").run(ctx)     # what `jointopt bootstrap` does: NN-bootstrap/traces.jsonl

`optimizers.<key>.traces.source` says where the rows come from: the program's passing traces
(`program`), those plus the gold labels of failed examples (`program+labels`), a teacher model's
(`teacher`), or the labels alone (`labels`); traces.py records them. A weight step trains on the
traces of a bootstrap made since the program last changed (`fresh_traces`), else it collects its own.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..checks import step_optimizer
from ..files import write_json, write_jsonl
from ..program import module_names
from ..recipe import WeightOptimizer
from ..rundir import RunDir, Step
from ..state import ModuleState
from ..step_kinds import StepKind
from .base import StepContext, note, prompted, run_step
from .traces import Traces, collect_traces, label_fields, label_traces
from .weights import no_traces_error, weight_modules


class BootstrapStep:
    """Record the traces that weight optimizer `key` would train on now."""

    def __init__(self, key: str):
        self.key = key

    def run(self, ctx: StepContext) -> Step:
        spec: WeightOptimizer = step_optimizer(ctx.recipe, self.key, WeightOptimizer)

        def body(step: Step) -> None:
            counts = write_traces(
                ctx.run.step_dir(step), collect(ctx, spec, step.index), ctx.recipe.runtime.max_error_rate
            )
            step.info["traces"] = counts
            if not counts["rows"]:
                raise no_traces_error(counts, spec, prompted(ctx.run))

        return run_step(ctx, StepKind.BOOTSTRAP, body, {"optimizer": self.key, "source": spec.traces.source})


def bootstrap_step(ctx: StepContext, key: str) -> Step:
    """`BootstrapStep(key).run(ctx)`: what `jointopt bootstrap` runs."""
    return BootstrapStep(key).run(ctx)


def collect(ctx: StepContext, spec: WeightOptimizer, step_index: int) -> Traces:
    """The traces of weight optimizer `spec` on the training split, from its `traces.source`."""
    program, state = ctx.current_program()
    names = module_names(ctx.recipe, program)
    modules = weight_modules(ctx.recipe, spec, names, state.modules)
    trainset = ctx.trainset(step_index)  # not empty, and a teacher named: checked with the recipe (checks.py)
    source = spec.traces.source
    if source == "labels":  # one `predict` module: checked with the recipe too
        return label_traces(program, trainset, names[0])
    if source == "teacher":
        teacher = {m: ModuleState(spec.traces.teacher) for m in state.modules}
        teacher_state = state.with_modules(teacher)  # the same program on the teacher
        program = ctx.program_for(teacher_state)
    gold = label_fields(program, modules, ctx.recipe.data.labels) if source == "program+labels" else None
    return collect_traces(
        program,
        trainset,
        ctx.metric,
        modules,
        spec.traces.threshold,
        ctx.recipe.runtime.num_threads,
        gold,
        source="teacher" if source == "teacher" else "program",
        all_modules=names,
    )


def write_traces(folder: Path, traces: Traces, max_error_rate: float = 1.0) -> dict:
    """traces.jsonl, traces.json (counts) and, when examples failed to run, failures.jsonl: the errors
    go to the file, the console gets one line. Returns the counts; a StepError (the files written) when
    more examples raised than `max_error_rate` (runtime.max_error_rate) allows."""
    write_jsonl(folder / "traces.jsonl", traces.rows)
    counts = traces.counts()
    write_json(folder / "traces.json", counts)
    if traces.failures:
        write_jsonl(folder / "failures.jsonl", traces.failures)
        where = Counter(f["module"] or f["in"] for f in traces.failures)
        first = traces.failures[0]["error"].splitlines()[0][:160]
        note(
            f"{len(traces.failures)} of {traces.run} examples failed to run (in "
            f"{', '.join(f'{m}: {n}' for m, n in where.most_common())}), e.g. {first}; all in "
            f"{folder.name}/failures.jsonl"
        )
    if error := traces.too_many_errors(max_error_rate, f"{folder.name}/failures.jsonl"):
        raise error
    return counts


def fresh_traces(run: RunDir) -> Path | None:
    """traces.jsonl of a bootstrap step made since the program last changed, if any."""
    for step in reversed(run.done_steps()):
        folder = run.step_dir(step)
        if step.kind == StepKind.BOOTSTRAP and (folder / "traces.jsonl").exists():
            return folder / "traces.jsonl"
        if (folder / "state.json").exists():
            return None
    return None
