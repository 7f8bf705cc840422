"""Score a run's chosen program on the data source's examples that the recipe's split never uses.

    .venv/bin/python bench/held_out.py runs/sst2                 # the step the run ships (as compare picks it)
    .venv/bin/python bench/held_out.py runs/sst2 --step 02-w     # another finished step
    .venv/bin/python bench/held_out.py runs/sst2 --limit 200     # the first 200 of them (data.held_out)

The test split is 100 sentences on sst2: enough to see a constant classifier, not to rank settings.
The rest of the source (552 of SST-2's 872 validation sentences) was never trained on, selected on or
looked at, so it tells whether the shipped program learned the task. Prints the accuracy with its
95% bootstrap interval, the majority class's score on the same examples, what the program answered,
and the recall of every gold class (a program that answers one label has recall 1 and 0), then

    held_out: <accuracy> [<low>, <high>] on <n> examples (majority <share>) [cpu ...]

The run's recipe (its recipe.yaml) says where the data and the models are; the run is opened like
any command opens it (locked while this runs) and nothing is written to it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def recall_by_class(rows: list[dict], field: str) -> dict[str, tuple[int, int]]:
    """gold value -> (examples of it scored right, examples of it)."""
    from jointcli.metrics import normalize_exact

    right, total = Counter(), Counter()
    for r in rows:
        gold = normalize_exact(r["gold"][field])
        total[gold] += 1
        right[gold] += r["score"] >= 1.0
    return {g: (right[g], total[g]) for g in sorted(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run directory (runs/<name>)")
    parser.add_argument("--step", help="a finished step's folder name (default: the step the run ships)")
    parser.add_argument("--limit", type=int, help="score at most this many held-out examples")
    args = parser.parse_args()

    from jointcli.answers import answer_summary, format_answers
    from jointcli.context import open_run
    from jointcli.data import held_out
    from jointcli.errors import InputError
    from jointcli.export import find_step
    from jointcli.stats import bootstrap_ci
    from jointcli.steps.evaluate import evaluate
    from jointcli.weights.device import cpu_kind

    run = args.run.resolve()
    if not (run / "recipe.yaml").is_file():
        sys.exit(f"{args.run}: not a run directory (no recipe.yaml)")
    try:
        with open_run(run / "recipe.yaml", [], run.name, run.parent) as ctx:
            step = find_step(ctx.run, args.step or "best")
            program, _ = ctx.current_program(upto=step.index)
            examples = held_out(ctx.recipe.data, args.limit)
            if not examples:
                sys.exit(f"{ctx.recipe.data.source}: the split uses every example; none is held out")
            result = evaluate(program, examples, ctx.metric, ctx.recipe.runtime.num_threads, label="held-out eval")
    except InputError as err:
        sys.exit(str(err))

    field = ctx.recipe.metric.field
    mean, low, high = bootstrap_ci(result.scores)
    summary = answer_summary(result.rows, field)
    print(
        f"run {args.run}, step {step.folder} (dev {step.scores.get('dev', float('nan')):.3f}, "
        f"test {step.scores.get('test', float('nan')):.3f}): {len(examples)} held-out examples of "
        f"{ctx.recipe.data.source}, {result.seconds:.0f} s"
    )
    if summary is not None:
        print(
            f"answers: {format_answers(summary.answers)}; majority class '{summary.majority_label}' "
            f"{summary.majority_score:.3f}"
        )
        for gold, (right, total) in recall_by_class(result.rows, field).items():
            print(f"recall '{gold}': {right / total:.3f} ({right} of {total})")
    majority = f" (majority {summary.majority_score:.3f})" if summary is not None else ""
    print(f"held_out: {mean:.3f} [{low:.3f}, {high:.3f}] on {result.n} examples{majority} [cpu {cpu_kind()}]")


if __name__ == "__main__":
    main()
