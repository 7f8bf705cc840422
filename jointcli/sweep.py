"""Sweep: one recipe under several strategies and seeds, into sibling run folders, then compare.

    jointopt sweep recipes/sst2.yaml --strategies "p, w, p -> w, w -> p, p -> w -> p" --seeds 0,1,2

makes runs/<name>/<strategy>/seed-<n> (strategy "p -> w" -> folder "p-w", zero-shot -> "zero-shot").
Every run resumes like `jointopt joint`. Strategies run shortest first, and a run whose schedule
begins like a finished sibling's (same seed, same recipe but the strategy) adopts that sibling's
steps instead of computing them again: `p -> w -> p` starts from `p -> w`'s three folders. The
result is the same as running it alone (steps are seeded and the LM greedy), minus the wait.
"""

from __future__ import annotations

from .errors import InputError
from .rundir import RunDir, Step
from .schedule import ZERO_SHOT, _plan, parse_strategy

DEFAULT_STRATEGIES = "p, w, p -> w, w -> p, p -> w -> p"


def parse_strategies(text: str, optimizers: dict) -> list[str]:
    """'p, p -> w' -> ['p', 'p -> w'], each checked; duplicates refused."""
    strategies = [" -> ".join(parse_strategy(part, optimizers)) or "none" for part in text.split(",")]
    if len(set(strategies)) != len(strategies):
        raise InputError(f"--strategies: {text!r} names a strategy twice")
    return sorted(strategies, key=lambda s: 0 if s == "none" else s.count("->") + 1)  # prefixes first


def slug(strategy: str) -> str:
    """'p -> w -> p' -> 'p-w-p'; zero-shot -> 'zero-shot'."""
    if strategy.strip().lower() in ZERO_SHOT:
        return "zero-shot"
    return "-".join(part.strip() for part in strategy.split("->"))


def _same_but_schedule(a, b) -> bool:
    dump = lambda r: {k: v for k, v in r.model_dump(mode="json").items() if k != "schedule"}  # noqa: E731
    return dump(a) == dump(b)


def adopt_prefix(ctx, donors: list[RunDir]) -> int:
    """Into a run without steps, copy the longest finished prefix of its plan that a donor has."""
    if ctx.run.steps():
        return 0
    plan = _plan(ctx.recipe)
    best: tuple[int, RunDir | None, list[Step]] = (0, None, [])
    for donor in donors:
        if donor.path == ctx.run.path or not _same_but_schedule(donor.recipe(), ctx.recipe):
            continue
        done = [s for s in donor.done_steps() if s.kind in ("baseline", "p", "w")]
        n = 0
        for step, (kind, key) in zip(done, plan):
            if step.kind != kind or (key and step.info.get("optimizer") != key):
                break
            n += 1
        if n > best[0] and [s.index for s in done[:n]] == list(range(n)):
            best = (n, donor, done[:n])
    n, donor, steps = best
    if n:
        ctx.run.adopt(donor, steps)
    return n


def sibling_runs(root, seed: int) -> list[RunDir]:
    """Finished-or-not runs of one seed under a sweep's folder: <root>/<strategy>/seed-<seed>."""
    return [RunDir(p.parent) for p in sorted(root.glob(f"*/seed-{seed}/manifest.json"))]
