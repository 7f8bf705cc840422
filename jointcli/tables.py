"""Every table jointopt prints, built with rich in one place: a run's steps (`status` and the step
commands), a plan (`plan`) and a comparison (`compare`, `sweep`), each with the lines under it.

    print_steps(RunDir.existing(Path("runs/sst2")))   # the steps table, then the selection, traces, warnings
    print_plan(build_plan(recipe), console)
    print_report(build_report(groups), console)

The tables go to the console they are given (stderr: stdout is left to `--json`). In a terminal they
fit its width; in a log or a pipe there is no width to fit, and rows stay on one line (`wide`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from .answers import format_answers
from .console import console
from .selection import shipping

if TYPE_CHECKING:
    from .compare import Report
    from .plan import Plan
    from .rundir import RunDir

LOG_WIDTH = 10_000  # columns of a table printed to a log or a pipe: wider than any row (a table takes what it needs)


def wide(out: Console) -> Console:
    """`out` in a terminal; elsewhere a console on the same file LOG_WIDTH columns wide, so that a log
    keeps each row on one line, however long its note (a step's error)."""
    return out if out.is_terminal else Console(file=out.file, width=max(out.width, LOG_WIDTH))


def _show(out: Console, table: Table) -> None:
    """A table in its own layout (the console soft-wraps messages: a table's title stays centred)."""
    out.print(table, soft_wrap=False)


def _table(title: str, columns: tuple[str, ...], right: tuple[str, ...]) -> Table:
    """A table with `columns`, those in `right` right-aligned (numbers), the others left-aligned."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left")
    return table


def _number(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def failure_counts(counts: dict[str, dict[str, int]]) -> str:
    """A step's failed examples (RunDir.eval_failures) in a few words: those that raised an error
    beside those whose answers did not parse; dev's unmarked, test's after 'test:'.

    >>> failure_counts({"dev": {"errors": 2, "parse_failures": 1}, "test": {"errors": 0, "parse_failures": 3}})
    '2 errors, 1 parse failure; test: 3 parse failures'
    """
    parts = []
    for split, c in counts.items():
        words = [_plural(c[k], w) for k, w in (("errors", "error"), ("parse_failures", "parse failure")) if c[k]]
        if words:
            parts.append(("" if split == "dev" else f"{split}: ") + ", ".join(words))
    return "; ".join(parts)


def _say(line: str) -> None:
    console.print(line, highlight=False)


# ---------------------------------------------------------------- a run's steps
def print_steps(run: RunDir, notes: dict[str, str] | None = None) -> None:
    """The steps table of `run` (`notes`: more to say of some steps, by folder; "best" marks the step
    the manifest records as the one that ships); then the step the schedule.select rule chooses, the
    majority-class score of each split, each bootstrap's counts, and every warning an evaluation
    raised (answers.py). Label-like outputs get a column of what each step answered on dev."""
    steps, best = run.steps(), run.manifest().get("best")
    labelled = any("dev_answers" in s.info for s in steps)
    columns = ("step", "status", "dev", "test", "seconds", "tokens in/out") + (("dev answers",) if labelled else ())
    table = _table(f"run {run.path}", columns + ("note",), right=("dev", "test", "seconds"))
    for s in steps:
        note = "; ".join(n for n in (failure_counts(run.eval_failures(s)), s.error, (notes or {}).get(s.folder)) if n)
        if s.folder == best:
            note = ("best " + note).strip()
        answers = (format_answers(s.info.get("dev_answers", {})),) if labelled else ()
        table.add_row(
            s.folder,
            s.status,
            _number(s.scores.get("dev")),
            _number(s.scores.get("test")),
            _number(s.seconds, ".1f"),
            f"{s.tokens.get('in', 0):,}/{s.tokens.get('out', 0):,}",
            *answers,
            note,
        )
    _show(wide(console), table)
    _print_step_notes(run, steps)


def _print_step_notes(run: RunDir, steps: list) -> None:
    if line := _selection_line(run):
        _say(line)
    for split in ("dev", "test"):
        share = next((s.info[f"{split}_majority"] for s in steps if f"{split}_majority" in s.info), None)
        if share is not None:
            console.print(f"majority class on {split}: {share:.3f} (the score of answering one label to everything)")
    for s in steps:
        if line := _traces_line(s.info.get("traces", {})):
            _say(f"{s.folder} traces: {line}")
    for s in steps:
        for split in ("dev", "test"):
            for warning in s.info.get(f"{split}_warnings", []):
                _say(f"[yellow]warning[/]: {s.folder} {split}: {warning}")


def _selection_line(run: RunDir) -> str | None:
    """With a schedule.select rule: the rule and the step it chooses (selection.shipping), in one line;
    a warning when it chose none (the best dev score is used)."""
    chosen = shipping(run).selection
    if chosen is None:
        return None
    if chosen.fallback:
        return f"[yellow]warning[/]: schedule.select ({chosen.rule}): {chosen.fallback}"
    return f"best step by schedule.select ({chosen.rule}): {chosen.folder}"


def _traces_line(counts: dict) -> str:
    """A bootstrap's counts in one line: per module ran/parsed/passed (which module blocks a
    pipeline), then the rows per source."""
    if "modules" not in counts:
        return ""
    modules = "; ".join(
        f"{m} ran {c['ran']}, parsed {c['parsed']}, passed {c['passed']}" for m, c in counts["modules"].items()
    )
    sources = ", ".join(f"{k} {v}" for k, v in counts.get("per_source", {}).items()) or "none"
    return "; ".join(part for part in (f"{counts['run']} examples", modules, f"rows: {sources}") if part)


# ---------------------------------------------------------------- a plan
PHASE_LABELS = {"train": "LoRA training (tokens trained)", "bootstrap": "bootstrap", "rollouts": "rollouts (sampled)"}


def print_plan(plan: Plan, out: Console) -> None:
    """The plan on `out`: the modules and their models, one row per phase of each step, what each
    weight step trains and the memory it needs, what the probe measured, the warnings."""
    out = wide(out)
    _show(out, _modules_table(plan))
    _show(out, _phases_table(plan))
    for line in _training_lines(plan):
        out.print(line, highlight=False)
    if plan.probe:
        out.print(_probe_line(plan.probe), highlight=False)
    out.print(
        "LM calls: a-b (~n) is a range and its estimate, ~n approximate (DSPy's own formula); the test "
        "evaluation scores the best step by dev, and the last too when it is another",
        highlight=False,
    )
    for warning in plan.warnings:
        out.print(f"[yellow]warning[/]: {warning}", highlight=False)


def _modules_table(plan: Plan) -> Table:
    columns = ("module", "model", "type", "path", "architecture", "parameters")
    table = _table(f"{plan.recipe}: modules and their models", columns, right=("parameters",))
    for module, m in plan.modules.items():
        count = f"{m['parameters']:,}" if m.get("parameters") else ""
        table.add_row(module, m["model"], m["type"], m["path"], m.get("architecture") or "", count)
    return table


def _phases_table(plan: Plan) -> Table:
    probed = "seconds from a probe on this machine" if plan.probe else "no probe: no seconds"
    columns = ("step", "phase", "LM calls", "tokens in", "tokens out (at most)", "seconds")
    table = _table(f"plan: {plan.strategy} ({probed}; {plan.machine['cpu']})", columns, right=columns[2:])
    for s in plan.steps:
        for i, (name, phase) in enumerate(s.phases.items()):
            table.add_row(
                s.step if i == 0 else "",
                s.method if name == "optimizer" else PHASE_LABELS.get(name, f"{name} eval"),
                "" if name == "train" else str(phase.calls),
                f"{phase.tokens_in:,}",
                "" if name == "train" else f"{phase.tokens_out:,}",
                _number(phase.seconds, ",.0f"),
            )
    table.add_row("total", "", "", "", "", _number(plan.seconds, ",.0f"))
    return table


def _training_lines(plan: Plan) -> list[str]:
    """One line per adapter a weight step trains: parameters, rows, optimizer steps, memory."""
    lines = []
    for s in plan.steps:
        for name, t in s.train.items():
            mem = t["memory_gb"]
            whole = f" (the whole process ~{mem['process']:.1f} GB)" if "process" in mem else ""
            what = "LoRA and the soft prompt train" if s.kind == "s" else "LoRA trains"
            rows = "rollouts" if s.kind == "g" else "rows"
            lines.append(
                f"{s.step} {name}: {what} {t['lora_parameters']:,} of {t['parameters']:,} parameters "
                f"({t['lora_parameters'] / t['parameters']:.2%}); {t['rows']} {rows} of ~{t['row_tokens']} tokens "
                f"at most, {t['steps']} optimizer steps ({t['steps_from']}); memory ({t['device']}, {t['dtype']}; "
                f"activations of {t['micro_batch_tokens']}-token micro-batches): LoRA ~{mem['lora']:.1f} GB, "
                f"full fine-tuning ~{mem['full']:.1f} GB{whole}, "
                f"{plan.machine['memory_available_gb']} GB available"
            )
    return lines


def _probe_line(p: dict) -> str:
    (t0, s0), (t1, s1) = p["batched"]
    lora = (
        f"; a LoRA optimizer step {p['step_seconds']:.1f} s on rows of ~{p['row_tokens']:.0f} tokens, then "
        f"evaluation x{p['adapter_factor']:.2f} with the adapter"
        if p["step_seconds"]
        else ""
    )
    return (
        f"probe ({p['seconds']:.0f} s): {s0:.2f} s an example batched at ~{t0:.0f} prompt tokens, {s1:.2f} s "
        f"at ~{t1:.0f}, {p['single']:.2f} s alone; pass rate {p['pass_rate']:.2f}{lora}"
    )


# ---------------------------------------------------------------- a comparison
RUN_COLUMNS = (
    "run",
    "strategy",
    "seeds",
    "baseline",
    "best dev",
    "test [95% CI]",
    "± std (seeds)",
    "best step",
    "wall s",
    "eval tokens",
    "train steps",
)


def print_report(report: Report, out: Console) -> None:
    """The comparison on `out`: the runs table (with the majority-class row), what each run's
    schedule.select chose, each run's errors, answers and warnings, the pairwise differences and
    the quality/cost Pareto front."""
    out = wide(out)
    _show(out, _runs_table(report))
    _print_selection(report, out)
    _print_failures(report, out)
    for r in report.runs:
        for error in r.errors:
            out.print(f"[red]{r.label}[/] did not finish: {error}", highlight=False)
        if r.answers:
            out.print(f"{r.label} answers on test: {format_answers(r.answers)}", highlight=False)
        for warning in r.warnings:
            out.print(f"[yellow]warning[/]: {r.label}: {warning}", highlight=False)
    if report.pairs:
        _show(out, _pairs_table(report))
    if any(c.on_front for c in report.pareto):
        _show(out, _front_table(report))


def _runs_table(report: Report) -> Table:
    chosen_by = "dev or schedule.select" if any(p.selected_by for r in report.runs for p in r.per_run) else "dev"
    title = (
        f"runs ({report.metric['name']} on {report.metric['field']}; test = best step by {chosen_by}, "
        "95% bootstrap interval over examples)"
    )
    table = _table(title, RUN_COLUMNS, right=RUN_COLUMNS[2:7] + RUN_COLUMNS[8:])
    for r in report.runs:
        table.add_row(
            r.label,
            r.strategy or "zero-shot",
            str(len(r.seeds)),
            _number(r.baseline),
            _number(r.best_dev),
            "" if r.test is None else f"{r.test:.3f} [{r.test_low:.3f}, {r.test_high:.3f}]",
            _number(r.test_std),
            ", ".join(r.best_step),
            _number(r.seconds, ",.1f"),
            f"{r.tokens:,}",
            str(r.train_steps),
        )
    if (m := report.majority) is not None:  # what a program answering one label to everything scores
        table.add_row("majority class", f"always {m.label!r}", "", "", "", f"{m.test:.3f}", "", "", "", "", "")
    return table


def _print_selection(report: Report, out: Console) -> None:
    """Each run's schedule.select rule (one line per group and rule), and a warning for each run
    whose rule chose no step (its best dev score was used)."""
    for r in report.runs:
        for rule in dict.fromkeys(p.selected_by for p in r.per_run if p.selected_by):
            out.print(f"{r.label}: best step by schedule.select: {rule}", highlight=False)
        for p in r.per_run:
            if p.selection_warning:
                name = f"{r.label}/{Path(p.path).name}" if len(r.per_run) > 1 else r.label
                out.print(f"[yellow]warning[/]: {name}: schedule.select: {p.selection_warning}", highlight=False)


def _print_failures(report: Report, out: Console) -> None:
    """Per run with failed examples, each step's: those that raised an error (a warning) beside those
    whose answers did not parse."""
    for r in report.runs:
        for p in r.per_run:
            steps = [f"{folder} ({failure_counts(c)})" for folder, c in p.failures.items() if failure_counts(c)]
            if not steps:
                continue
            name = f"{r.label}/{Path(p.path).name}" if len(r.per_run) > 1 else r.label
            errors = any(split["errors"] for c in p.failures.values() for split in c.values())
            lead = "[yellow]warning[/]: " if errors else ""
            out.print(f"{lead}{name} failed examples by step: {', '.join(steps)}", highlight=False)


def _pairs_table(report: Report) -> Table:
    title = "pairwise test differences (A - B on the same examples; paired bootstrap"
    columns = ("A", "B", "n", "A - B [95% CI]", "A only / B only", "McNemar p", "verdict")
    table = _table(title + (", McNemar" if report.binary else "") + ")", columns, right=columns[2:6])
    for p in report.pairs:
        table.add_row(
            p.a,
            p.b,
            str(p.n),
            f"{p.delta:+.3f} [{p.low:+.3f}, {p.high:+.3f}]",
            "" if p.only_a is None else f"{p.only_a} / {p.only_b}",
            _number(p.p_mcnemar, ".4f"),
            "[green]significant[/]" if p.significant else "not significant",
        )
    return table


def _front_table(report: Report) -> Table:
    front = sorted((c for c in report.pareto if c.on_front), key=lambda c: (c.tokens, -c.dev))
    title = (
        f"quality/cost Pareto front ({len(front)} of {len(report.pareto)} step programs): "
        "dev score against mean tokens per example"
    )
    columns = ("program", "dev", "tokens/example", "seconds/example")
    table = _table(title, columns, right=columns[1:])
    for c in front:
        table.add_row(c.candidate, _number(c.dev), _number(c.tokens, ".0f"), _number(c.seconds, ".3f"))
    return table
