"""Compare finished runs: scores with intervals, paired significance, the quality/cost front, gates.

    groups = [load_group("seq", Path("runs")), load_group("joint", Path("runs"))]
    report = build_report(groups)            # a Report: runs, pairs, pareto (report.to_json() is --json)
    report.gates = check_gates(report, require=["joint > seq"], min_score=["0.8"])
    report.gates.failures                    # one line per failed gate

A group is one run directory, or a folder of seed runs (`jointopt joint --seeds 0,1,2` makes
NAME/seed-0, NAME/seed-1, ...). A group's test score is that of each run's best step (the step a
user would ship: the best dev score, or the one the recipe's `schedule.select` rule chooses,
selection.py), averaged over seeds per example; its interval resamples examples.
Runs compare only when they used the same data splits and the same metric.

runs.py reads the run directories, report.py builds the report, gates.py checks the gates,
render.py writes the report as JSON and a plot; tables.py prints its tables.
"""

from .gates import check_gate_syntax, check_gates, parse_min_score, parse_require
from .report import Candidate, Gates, GroupSummary, Majority, PairSummary, Report, RunSummary, build_report
from .runs import Group, RunRecord, check_comparable, load_group

__all__ = [
    "Candidate",
    "Gates",
    "Group",
    "GroupSummary",
    "Majority",
    "PairSummary",
    "Report",
    "RunRecord",
    "RunSummary",
    "build_report",
    "check_comparable",
    "check_gate_syntax",
    "check_gates",
    "load_group",
    "parse_min_score",
    "parse_require",
]
