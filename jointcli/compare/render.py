"""A comparison (compare.Report) as JSON text (`--json`) and as a PNG plot (`--plot`); its tables
are in tables.py.

    print(report_json(report))
    plot_report(report, groups, Path("compare.png"))   # needs matplotlib: pip install 'jointopt[plot]'
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..files import atomic_target
from .report import Report
from .runs import Group


def report_json(report: Report) -> str:
    """What `--json` prints: the report's fields, indented."""
    return json.dumps(report.to_json(), indent=2)


def plot_report(report: Report, groups: list[Group], out: Path) -> None:
    """Two panels: dev score by step for each run, and the dev-score/tokens candidates with their front."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'jointopt[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
