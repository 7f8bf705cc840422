"""How a comparison (compare.Report) is shown: rich tables on the console, JSON text, a PNG plot.

print_report(report, console)            # tables: runs, pairwise differences, Pareto front
print(report_json(report))               # --json
plot_report(report, groups, Path("compare.png"))
"""

from __future__ import annotations

import json
from pathlib import Path

from .answers import format_answers
from .compare import Group, Report
from .errors import InputError


def report_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2)


def print_report(report: Report, console) -> None:
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal:  # a log or a pipe: no terminal to wrap for, keep rows on one line
        console = Console(file=console.file, width=max(console.width, 160))

    f = lambda v, spec=".3f": "" if v is None else format(v, spec)  # noqa: E731
    chosen_by = "dev or schedule.select" if any(p.selected_by for r in report.runs for p in r.per_run) else "dev"
    runs = Table(
        title=f"runs ({report.metric['name']} on {report.metric['field']}; test = best step by {chosen_by}, "
        "95% bootstrap interval over examples)"
    )
    for col in (
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
    ):
        runs.add_column(col, justify="left" if col in ("run", "strategy", "best step") else "right")
    for r in report.runs:
        test = "" if r.test is None else f"{r.test:.3f} [{r.test_low:.3f}, {r.test_high:.3f}]"
        runs.add_row(
            r.label,
            r.strategy or "zero-shot",
            str(len(r.seeds)),
            f(r.baseline),
            f(r.best_dev),
            test,
            f(r.test_std),
            ", ".join(r.best_step),
            f(r.seconds, ".0f"),
            str(r.tokens),
            str(r.train_steps),
        )
    if (m := report.majority) is not None:  # what a program answering one label to everything scores
        runs.add_row("majority class", f"always {m.label!r}", "", "", "", f"{m.test:.3f}", "", "", "", "", "")
    console.print(runs)
    _print_selection(report, console)
    for r in report.runs:
        for error in r.errors:
            console.print(f"[red]{r.label}[/] did not finish: {error}", highlight=False, soft_wrap=True)
        if r.answers:
            console.print(f"{r.label} answers on test: {format_answers(r.answers)}", highlight=False, soft_wrap=True)
        for warning in r.warnings:
            console.print(f"[yellow]warning[/]: {r.label}: {warning}", highlight=False, soft_wrap=True)
    if report.pairs:
        pairs = Table(
            title="pairwise test differences (A - B on the same examples; paired bootstrap"
            + (", McNemar" if report.binary else "")
            + ")"
        )
        for col in ("A", "B", "n", "A - B [95% CI]", "A only / B only", "McNemar p", "verdict"):
            pairs.add_column(col, justify="left" if col in ("A", "B", "verdict") else "right")
        for p in report.pairs:
            verdict = "[green]significant[/]" if p.significant else "not significant"
            counts = "" if p.only_a is None else f"{p.only_a} / {p.only_b}"
            pairs.add_row(
                p.a,
                p.b,
                str(p.n),
                f"{p.delta:+.3f} [{p.low:+.3f}, {p.high:+.3f}]",
                counts,
                f(p.p_mcnemar, ".4f"),
                verdict,
            )
        console.print(pairs)
    front = sorted((c for c in report.pareto if c.on_front), key=lambda c: (c.tokens, -c.dev))
    if front:
        table = Table(
            title=f"quality/cost Pareto front ({len(front)} of {len(report.pareto)} step programs): "
            "dev score against mean tokens per example"
        )
        for col in ("program", "dev", "tokens/example", "seconds/example"):
            table.add_column(col, justify="left" if col == "program" else "right")
        for c in front:
            table.add_row(c.candidate, f(c.dev), f(c.tokens, ".0f"), f(c.seconds, ".3f"))
        console.print(table)


def _print_selection(report: Report, console) -> None:
    """Each run's schedule.select rule (one line per group and rule), and a warning for each run
    whose rule chose no step (its best dev score was used)."""
    for r in report.runs:
        for rule in dict.fromkeys(p.selected_by for p in r.per_run if p.selected_by):
            console.print(f"{r.label}: best step by schedule.select: {rule}", highlight=False, soft_wrap=True)
        for p in r.per_run:
            if p.selection_warning:
                name = f"{r.label}/{Path(p.path).name}" if len(r.per_run) > 1 else r.label
                console.print(
                    f"[yellow]warning[/]: {name}: schedule.select: {p.selection_warning}",
                    highlight=False,
                    soft_wrap=True,
                )


def plot_report(report: Report, groups: list[Group], out: Path) -> None:
    """Two panels: dev score by step for each run, and the dev-score/tokens candidates with their front."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'jointopt[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_target

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
    for label in dict.fromkeys(c.group for c in report.pareto):
        points = [c for c in report.pareto if c.group == label]
        right.scatter([c.tokens for c in points], [c.dev for c in points], label=label, alpha=0.7)
    front = sorted((c for c in report.pareto if c.on_front), key=lambda c: c.tokens)
    if front:
        right.step(
            [c.tokens for c in front],
            [c.dev for c in front],
            where="post",
            color="black",
            linewidth=1,
            label="Pareto front",
        )
    right.set(title="quality against inference cost", xlabel="mean tokens per example", ylabel="dev score")
    right.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
