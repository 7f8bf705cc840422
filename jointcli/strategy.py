"""Strategies and seed lists as users write them: `schedule.strategy`, `--strategies`, `--seeds`.

    >>> parse_strategy("p -> w -> p", {"p": ..., "w": ...})
    ['p', 'w', 'p']
    >>> parse_strategy("none", {"p": ...})
    []
    >>> parse_seeds("0,1,2")
    [0, 1, 2]
    >>> slug("p -> w -> p"), slug("zero-shot")
    ('p-w-p', 'zero-shot')

This module loads no library: the CLI reads DEFAULT_STRATEGIES from it when it starts. Only the
text is checked here (each letter names an optimizer; seeds are distinct integers from 0); what each
step needs to run is checks.py's.
"""

from __future__ import annotations

from .errors import InputError

ZERO_SHOT = ("none", "zero-shot")  # an empty strategy is an error: a value lost on its way, not a choice
# zero-shot, each kind alone, the same two steps of one kind (the controls: does alternating beat
# spending the steps on one kind?), then the alternations
DEFAULT_STRATEGIES = "none, p, w, p -> p, w -> w, p -> w, w -> p, p -> w -> p"


def parse_strategy(text: str, optimizers: dict, where: str = "schedule.strategy") -> list[str]:
    """'p -> w -> p' -> ['p', 'w', 'p']; each letter must be a key of `optimizers`. `where` names the
    strategy's origin in errors (a sweep's --strategies)."""
    if text.strip().lower() in ZERO_SHOT:
        return []
    if not text.strip():
        raise InputError(f"{where}: empty; write steps like 'p -> w -> p', or 'none' for zero-shot")
    keys = [part.strip() for part in text.split("->")]
    for key in keys:
        if not key:
            raise InputError(f"{where}: {text!r} has an empty step; write steps like 'p -> w -> p'")
        if key not in optimizers:
            # the recipe package (pydantic): only for this hint, so that `jointopt --help`, which
            # reads DEFAULT_STRATEGIES from here, does not load it
            from .recipe import did_you_mean

            raise InputError(
                f"{where}: unknown step {key!r} in {text!r}; steps are the keys of "
                f"optimizers: {', '.join(optimizers) or 'none'}{did_you_mean(key, optimizers)}"
            )
    return keys


def parse_strategies(text: str, optimizers: dict) -> list[str]:
    """A sweep's strategies, each checked, shortest first (a strategy's prefixes run before it);
    duplicates refused.

    >>> parse_strategies("p -> w, none, p", {"p": ..., "w": ...})
    ['none', 'p', 'p -> w']
    """
    strategies = [
        " -> ".join(parse_strategy(part, optimizers, where="--strategies")) or "none" for part in text.split(",")
    ]
    if len(set(strategies)) != len(strategies):
        raise InputError(f"--strategies: {text!r} names a strategy twice")
    return sorted(strategies, key=lambda s: 0 if s == "none" else s.count("->") + 1)  # prefixes first


def slug(strategy: str) -> str:
    """A strategy as a folder name: 'p -> w -> p' -> 'p-w-p'; zero-shot -> 'zero-shot'."""
    if strategy.strip().lower() in ZERO_SHOT:
        return "zero-shot"
    return "-".join(part.strip() for part in strategy.split("->"))


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: at least one seed, each once, none negative (as the recipe's `seed`)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--seeds: {text!r} is not a comma-separated list of integers") from None
    if not values or len(set(values)) != len(values):
        raise InputError(f"--seeds: {text!r} must name at least one seed, each once")
    if min(values) < 0:
        raise InputError(f"--seeds: {text!r}: seeds are integers from 0")
    return values
