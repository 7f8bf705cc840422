"""Run a function over examples on a thread pool, the way DSPy's own Evaluate does, with progress
(a bar in a terminal, plain lines in a log).

    >>> parallel_map(lambda x: x * 2, [1, 2, 3], num_threads=2, label="double")  # progress: on stderr
    [2, 4, 6]

DSPy keeps `dspy.context(...)` settings in thread-local overrides; the workers start from the
caller's, so an LM or adapter chosen with `dspy.context` holds inside them too. The local engine
batches the calls that the threads make at the same time.

`fn` may count an item's errors as that item's (an evaluation's example that raised scores 0), but
an LM call that failed because of its model's server (unreachable, too slow, a refused key, an HTTP
5xx once DSPy's retries are spent: remote.server_failure) ends the map with that error: a server that
is down is a failed step, to resume once it is back, not a row of examples that scored 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import dspy
from dspy.dsp.utils.settings import thread_local_overrides
from dspy.utils.callback import BaseCallback

from ..console import phase
from ..failpoints import failpoint
from ..models.remote import server_failure

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: list[T], num_threads: int, label: str) -> list[R]:
    """[fn(item) for item in items], computed by `num_threads` threads, in order. On Ctrl-C the
    items not yet started are cancelled: only the calls in flight are waited for."""
    overrides = thread_local_overrides.get().copy()

    def work(item: T) -> R:
        token = thread_local_overrides.set({**thread_local_overrides.get(), **overrides})
        try:
            with watching_servers():
                return fn(item)
        finally:
            thread_local_overrides.reset(token)

    pool = ThreadPoolExecutor(max_workers=max(1, num_threads))
    try:
        with phase(label, total=len(items)) as tick:
            futures = [pool.submit(work, item) for item in items]
            results = []
            for future in futures:
                results.append(future.result())
                tick()
                failpoint("example")  # tests: killed in the middle of an evaluation or a bootstrap
            return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def watching_servers() -> Iterator[None]:
    """Raise the StepError of the first LM call in the block (in any thread DSPy starts from it) that
    failed because of its model's server, once the block ends, whatever the block made of that
    failure: DSPy's optimizers and an evaluation's `fn` count such calls as one example's errors."""
    watch = _ServerWatch()
    try:
        with dspy.context(callbacks=[*dspy.settings.callbacks, watch]):
            yield
    except Exception:
        if watch.failure is not None:
            raise watch.failure from watch.cause
        raise
    if watch.failure is not None:
        raise watch.failure from watch.cause


class _ServerWatch(BaseCallback):
    """Keeps the first LM call that failed because of its model's server."""

    def __init__(self):
        self.failure, self.cause = None, None

    def on_lm_end(self, call_id, outputs, exception=None):
        if exception is not None and self.failure is None:
            self.failure, self.cause = server_failure(exception), exception
