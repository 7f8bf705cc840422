"""A sweep as a task graph: one task per (strategy, seed), each after the sibling it adopts steps from.

    tasks = sweep_tasks(["none", "p", "p -> w"], [0], "sst2-sweep")
    [(t.strategy, t.after.strategy if t.after else None) for t in tasks]
    # [('none', None), ('p', 'none'), ('p -> w', 'p')]

A sweep runs its strategies shortest first so that a run adopts the finished steps of the sibling
whose schedule it begins like (sweep.adopt_prefix): `p -> w` starts from `p`'s baseline and prompt
step. Every strategy shares the baseline, so the zero-shot run comes first and the others fan out
from it; a task only waits for the one sibling it adopts from. Each task is the command
`jointopt sweep RECIPE --strategies S --seeds N --name ROOT`: the same run folder and adoption as
in the whole sweep, so that Ray (ray_sweep.py), a CI matrix or a SLURM array can run the graph
(`jointopt sweep --dry-run` prints it).

This module loads no library: `--dry-run` runs nothing.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from .strategy import parse_strategy, slug


@dataclass(frozen=True)
class SweepTask:
    id: int  # 1, 2, ... in the order a serial sweep runs them
    strategy: str  # "p -> w"; "none" is zero-shot
    seed: int
    folder: str  # <sweep name>/<strategy folder>/seed-<n>, under the runs root
    after: SweepTask | None  # the sibling whose finished steps this run adopts: it runs first

    @property
    def root(self) -> str:
        """The sweep's folder under the runs root: <sweep name>."""
        return self.folder.split("/", 1)[0]

    @property
    def run(self) -> str:
        """The run's folder within the sweep: <strategy folder>/seed-<n>."""
        return self.folder.split("/", 1)[1]

    def args(self, recipe: Path, overrides: list[str], runs_dir: Path, force: bool = False) -> list[str]:
        """The arguments of `jointopt` that run this task alone (into the sweep's folders)."""
        flags = ["--strategies", self.strategy, "--seeds", str(self.seed), "--name", self.root]
        flags += ["--runs-dir", str(runs_dir)]
        return ["sweep", str(recipe), *overrides, *flags, *(["--force"] if force else [])]


def _shared_steps(a: list[str], b: list[str]) -> int:
    """How many steps two strategies begin with alike (the baseline, shared by all, not counted)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def sweep_tasks(plan: list[str], seeds: list[int], root: str, optimizers: dict | None = None) -> list[SweepTask]:
    """The tasks of a sweep over `plan` (strategies, shortest first: strategy.parse_strategies) and
    `seeds`, in a serial sweep's order; each after the earlier strategy of its seed that shares the
    most steps with it (the zero-shot run, which shares the baseline, when none shares more). Without
    `optimizers`, steps are the letters between the arrows.

    >>> tasks = sweep_tasks(["none", "p", "w", "p -> w", "w -> p"], [0, 1], "s")
    >>> [(t.id, t.folder, t.after and t.after.id) for t in tasks if t.seed == 0]  # doctest: +NORMALIZE_WHITESPACE
    [(1, 's/zero-shot/seed-0', None), (3, 's/p/seed-0', 1), (5, 's/w/seed-0', 1), (7, 's/p-w/seed-0', 3),
     (9, 's/w-p/seed-0', 5)]
    """
    steps = {s: parse_strategy(s, optimizers or _letters(s)) for s in plan}
    tasks: list[SweepTask] = []
    for strategy in plan:
        for seed in seeds:
            earlier = [t for t in tasks if t.seed == seed]
            after = max(earlier, key=lambda t: _shared_steps(steps[t.strategy], steps[strategy]), default=None)
            folder = f"{root}/{slug(strategy)}/seed-{seed}"
            tasks.append(SweepTask(len(tasks) + 1, strategy, seed, folder, after))
    return tasks


def _letters(strategy: str) -> dict:
    return {part.strip(): None for part in strategy.split("->")}


def dry_run(tasks: list[SweepTask], recipe: Path, overrides: list[str], runs_dir: Path, as_json: bool) -> str:
    """What `jointopt sweep --dry-run` prints: each task's command and the task it waits for, as lines
    (`# N: ...` then the command) or, with `as_json`, a list a CI matrix can read.

    >>> tasks = sweep_tasks(["none", "p"], [0], "sst2-sweep")
    >>> print(dry_run(tasks, Path("recipes/sst2.yaml"), [], Path("runs"), as_json=False))
    # 1: zero-shot, seed 0 -> runs/sst2-sweep/zero-shot/seed-0
    jointopt sweep recipes/sst2.yaml --strategies none --seeds 0 --name sst2-sweep --runs-dir runs
    # 2: p, seed 0 -> runs/sst2-sweep/p/seed-0 (after 1)
    jointopt sweep recipes/sst2.yaml --strategies p --seeds 0 --name sst2-sweep --runs-dir runs
    """
    rows = [
        {
            "id": t.id,
            "strategy": t.strategy,
            "seed": t.seed,
            "folder": str(runs_dir / t.folder),
            "after": t.after.id if t.after else None,
            "command": shlex.join(["jointopt", *t.args(recipe, overrides, runs_dir)]),
        }
        for t in tasks
    ]
    if as_json:
        return json.dumps(rows, indent=2)
    lines = []
    for row in rows:
        name = "zero-shot" if row["strategy"] == "none" else row["strategy"]
        after = f" (after {row['after']})" if row["after"] else ""
        lines += [f"# {row['id']}: {name}, seed {row['seed']} -> {row['folder']}{after}", row["command"]]
    return "\n".join(lines)
