"""Run a function over examples on a thread pool, the way DSPy's own Evaluate does, with progress
(a bar in a terminal, plain lines in a log).

    rows = parallel_map(score_one, list(enumerate(devset)), num_threads=4, label="dev eval")

DSPy keeps `dspy.context(...)` settings in thread-local overrides; the workers start from the
caller's, so an LM or adapter chosen with `dspy.context` holds inside them too. The local engine
batches the calls that the threads make at the same time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from dspy.dsp.utils.settings import thread_local_overrides

from ..console import phase
from ..failpoints import failpoint

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: list[T], num_threads: int, label: str) -> list[R]:
    """[fn(item) for item in items], computed by `num_threads` threads, in order. On Ctrl-C the
    items not yet started are cancelled: only the calls in flight are waited for."""
    overrides = thread_local_overrides.get().copy()

    def work(item: T) -> R:
        token = thread_local_overrides.set({**thread_local_overrides.get(), **overrides})
        try:
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
