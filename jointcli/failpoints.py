"""A testing hook: SIGKILL this process at a named point, to check that a resume survives a kill there.

    JOINTOPT_FAILPOINT=train-step:2 jointopt joint recipes/sst2.yaml    # killed at the 2nd optimizer step

The value is NAME (killed the first time NAME is reached) or NAME:N (the Nth time). Names:

    write/FILE    a finished temporary file or folder is about to be renamed to FILE: a step's files
                  being written (predictions.jsonl, traces.jsonl, program.json, an adapter's folder)
    finish/KIND   a step of KIND (baseline, p, w, ...) has written all its files; the manifest does
                  not say `done` yet
    train-step    a LoRA optimizer step has just been taken
    example       an example of an evaluation or a bootstrap is done (example:2: the second)

Unset, as it is outside tests, a failpoint costs one environment lookup. The kill tests
(tests/test_joint.py, tests/test_rundir.py) set it in the process they kill.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

VARIABLE = "JOINTOPT_FAILPOINT"
_reached: Counter[str] = Counter()


def _target(spec: str) -> tuple[str, int]:
    """The point a spec names and at which time it is reached to kill.

    >>> _target("write/eval.json:2"), _target("finish/w")
    (('write/eval.json', 2), ('finish/w', 1))
    """
    name, _, count = spec.rpartition(":")
    return (name, int(count)) if name and count.isdigit() else (spec, 1)


def failpoint(name: str) -> None:
    """Kill this process, with no chance to clean up, if $JOINTOPT_FAILPOINT names this point."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    target, count = _target(spec)
    if name == target:
        _reached[name] += 1
        if _reached[name] == count:
            os.kill(os.getpid(), signal.SIGKILL)
