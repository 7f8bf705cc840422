"""Serves generation jobs on one worker thread: concurrent requests are decoded together as a batch.

Callers put jobs on a queue (BatchDecoder.submit) and wait for their futures; the worker serves the
queue in batches. After the first job it waits a few milliseconds for others (longer, up to
`max_wait_s`, while fewer jobs are there than were waiting at once during the last batch: DSPy's
threads come back a few ms apart, and a batch that leaves half of them behind splits the callers
into two cohorts for good), then runs every job it holds that uses the same weights (base model or
one adapter) as one batch, up to `max_batch` rows (generation.py decodes them; greedy and sampled
rows share a batch). Other calls (BatchDecoder.call: adapter loads) run between batches, never during
one.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future

import torch
from dspy.lm15 import ConfigurationError

from ..recipe.sections import EngineLimits
from .generation import Generation, Job
from .model_id import split_model_id

__all__ = ["BatchDecoder", "Job"]


class BatchDecoder(Generation):
    """The worker thread that owns the model and serves its generation jobs (see the module docstring).

    `select_weights(model_id)` (the engine's) returns a context that selects its weights and the
    prefix-cache key of those weights; `model` is the base model with the LoRA layers (if any)
    injected, so a forward pass runs the weights the context selected.

    Tuning knobs besides Generation's (attributes, may be changed between calls): batch_window_s,
    max_wait_s."""

    def __init__(
        self, model, tokenizer, tokenizer_lock: threading.Lock, device: str, select_weights, limits: EngineLimits
    ):
        super().__init__(model, tokenizer, tokenizer_lock, device, limits)
        self.select_weights = select_weights
        self.batch_window_s = 0.004  # wait after the first job for others that arrive together
        self.max_wait_s = 0.05  # ... and up to this long while fewer than the last batch have come
        self._waiting = 0  # generation jobs submitted and not answered yet
        self._peak = 1  # the most that were waiting at once since the last batch was gathered
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed against concurrent submit/stop
        self._closed = False
        self._pid = os.getpid()  # a forked child has no worker thread
        self._worker = threading.Thread(target=self._serve, name="jointopt-engine", daemon=True)
        self._worker.start()

    # ---- callers' side
    def submit(self, job: Job) -> Future:
        """Queue a generation job; its future gets the Response."""
        self._put(job)
        job.future.add_done_callback(self._answered)  # answered, failed or cancelled
        return job.future

    def call(self, fn, *args) -> Future:
        """Queue a call for the worker (adapter loads): it runs between batches."""
        future: Future = Future()
        self._put((fn, args, future))
        return future

    def stop(self) -> bool:
        """End the worker after the jobs queued so far; later submits raise. False if it was stopped before."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._jobs.put(None)
        return True

    def join(self) -> None:
        """Wait for the stopped worker (unless called from it), then let go of the model and the prefixes."""
        if threading.current_thread() is not self._worker:
            self._worker.join()
        self.model = None
        self.prefixes.clear()

    def _answered(self, _future) -> None:
        with self._lock:
            self._waiting -= 1

    def _put(self, job) -> None:
        with self._lock:
            if self._closed:
                raise ConfigurationError("the local engine is closed")
            if os.getpid() != self._pid:
                raise ConfigurationError(
                    "the local engine was created in another process (fork); build the LM again in this one"
                )
            self._jobs.put(job)
            if isinstance(job, Job):
                self._waiting += 1
                self._peak = max(self._peak, self._waiting)

    # ---- the worker
    def _serve(self) -> None:
        held: list = []  # jobs taken off the queue but not run yet (they came after a batch was closed)
        with torch.inference_mode():
            while True:
                job = held.pop(0) if held else self._jobs.get()
                if job is None:
                    return
                if not isinstance(job, Job):
                    self._run_call(*job)
                else:
                    batch = self._gather(job, held)
                    self._run_batch(batch)

    def _gather(self, first: Job, held: list) -> list[Job]:
        """Jobs that arrive together with `first`; a call is held back for later, in order."""
        batch = [first]
        start = time.perf_counter()
        with self._lock:
            expected, self._peak = self._peak, self._waiting
        while len(batch) < self.max_batch and not held:
            # wait at least the window; longer while fewer jobs than were waiting at once during the
            # last batch have come (callers come back a few ms apart), never longer than max_wait_s
            limit = self.batch_window_s if len(batch) >= expected else self.max_wait_s
            remaining = start + limit - time.perf_counter()
            try:
                job = self._jobs.get_nowait() if remaining <= 0 else self._jobs.get(timeout=remaining)
            except queue.Empty:
                break
            if isinstance(job, Job):
                batch.append(job)
            else:
                held.append(job)  # a barrier (adapter load, close): after this batch
        return batch

    def _run_call(self, fn, args, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the caller, the worker lives on
            future.set_exception(exc)

    def _run_batch(self, jobs: list[Job]) -> None:
        """Run the jobs, one group per weights; every job's future gets its result or the error."""
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drop cancelled async calls
        groups: dict[str | None, list[Job]] = {}
        for job in jobs:
            groups.setdefault(split_model_id(job.request.model)[1], []).append(job)  # adapter name or None
        for group in groups.values():
            try:
                self._run_group(group)
            except (torch.OutOfMemoryError, MemoryError):
                # a new error without the traceback, whose frames would keep the batch's tensors alive
                _fail(group, self.out_of_memory(group))
            except BaseException as exc:  # handed to the callers, the worker lives on
                _fail(group, exc)

    def _run_group(self, group: list[Job]) -> None:
        """Run jobs of one weights as a batch."""
        weights, key = self.select_weights(group[0].request.model)
        with weights:
            self.decode(group, key)


def _fail(jobs: list[Job], error: BaseException) -> None:
    """Every job not answered yet gets `error`."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)
