"""All human output goes through one rich console on stderr; stdout carries results (--json). A
message is one line, however long: the console never breaks it, in a terminal or in a pipe.

Libraries print to stdout too (DSPy's BootstrapFewShot: "Bootstrapped 4 full traces...", a user's
metric). `prints_to_stderr()` sends all that to stderr while a run is open (context.open_run holds
it), and a command prints its result after the block:

>>> with prints_to_stderr():
...     print("Bootstrapped 4 full traces")  # to stderr, with the progress lines
>>> print('{"score": 0.81}')  # the result, on stdout
{"score": 0.81}

Long phases report progress with `phase(...)`: a rich bar in a terminal; in a log or a pipe (CI,
`tee`), where a bar shows nothing, a plain line every LOG_EVERY_S seconds and one at the end
("dev eval: 3/3 done in 0.4 s"), on stderr:

>>> with phase("dev eval", total=3) as tick:
...     for example in range(3):
...         tick()
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# soft_wrap: a message is one line, however long, in a terminal (which folds it) and in a pipe or a log
# (where rich would otherwise break it at 80 columns); tables fit the width themselves (tables.wide).
console = Console(stderr=True, soft_wrap=True)
LOG_EVERY_S = 30.0


def _bar() -> Progress:
    """A progress bar for long work; hidden automatically when stderr is not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _seconds(s: float) -> str:
    """'19.5 s', or '2.3 min' from two minutes on: to a tenth, as the tables show seconds."""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


class _LogLines:
    """Plain progress lines for a log: what, done/total, elapsed, estimate left; at most one every
    `every` seconds (checked when work advances, and by a timer so a slow item still shows life)."""

    def __init__(self, label: str, total: int | None, every: float):
        self.label, self.total, self.every = label, total, every
        self.done, self.note, self.start = 0, "", time.monotonic()
        self.last = self.start
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._timer = threading.Thread(target=self._beat, daemon=True, name="jointopt-progress")

    def _line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        note = f", {self.note}" if self.note else ""
        if self.total is None:
            return (
                f"{self.label}: " + (f"done in {_seconds(elapsed)}" if final else f"{_seconds(elapsed)} elapsed") + note
            )
        if final:
            return f"{self.label}: {self.done}/{self.total} done in {_seconds(elapsed)}{note}"
        left = f", ~{_seconds(elapsed / self.done * (self.total - self.done))} left" if self.done else ""
        return f"{self.label}: {self.done}/{self.total}, {_seconds(elapsed)} elapsed{left}{note}"

    def _emit(self, final: bool = False) -> None:
        with self._lock:
            self.last = time.monotonic()
            console.print(self._line(final), highlight=False)

    def _beat(self) -> None:
        while not self._stop.wait(self.every / 3):
            if time.monotonic() - self.last >= self.every:
                self._emit()

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.note = note or self.note
        if time.monotonic() - self.last >= self.every and self.done < (self.total or 0):
            self._emit()

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, exc_type, *_):
        self._stop.set()
        self._timer.join()
        if exc_type is None and self.total != 0:
            self._emit(final=True)


@contextmanager
def phase(label: str, total: int | None, every: float | None = None) -> Iterator[Callable[..., None]]:
    """Report progress of `total` units of work; yields `tick(n=1, note="")` to call as units finish
    (`note`, e.g. "loss 0.41", is shown in log lines). total=None: work of unknown size (a DSPy
    optimizer, which shows its own progress in a terminal); a log gets "elapsed" lines."""
    if console.is_terminal and total is None:
        yield lambda n=1, note="": None
        return
    if console.is_terminal:
        with _bar() as bar:
            task = bar.add_task(label, total=total)
            yield lambda n=1, note="": bar.update(task, advance=n)
        return
    with _LogLines(label, total, LOG_EVERY_S if every is None else every) as lines:
        yield lines.advance


@contextmanager
def prints_to_stderr() -> Iterator[None]:
    """Whatever writes to sys.stdout inside the block (from any thread) goes to stderr, with the
    rest of the human output: stdout is left to what a command promises (--json)."""
    with redirect_stdout(sys.stderr):
        yield


class _StepLog(logging.FileHandler):
    """DSPy's log records of one step, into a file of the step folder, counted; the first kept."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)  # no file when nothing is logged
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.count, self.first = 0, ""

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.first = self.first or record.getMessage().strip().splitlines()[0][:200]
        super().emit(record)


@contextmanager
def step_log(path: Path) -> Iterator[None]:
    """While a step runs, DSPy's per-example messages (an answer it could not parse, an example its
    optimizer failed on: dozens of multi-line records) go to `path`, and the console gets one line:
    how many, the first, and where the rest are."""
    dspy_logger = logging.getLogger("dspy")
    handler, saved = _StepLog(path), dspy_logger.handlers[:]
    for h in saved:
        dspy_logger.removeHandler(h)
    dspy_logger.addHandler(handler)
    try:
        yield
    finally:
        dspy_logger.removeHandler(handler)
        handler.close()
        for h in saved:
            dspy_logger.addHandler(h)
        if handler.count:
            console.print(
                f"{handler.count} message(s) from DSPy in {path.parent.name}/{path.name}; the first: {handler.first}",
                highlight=False,
            )


def quiet_libraries() -> None:
    """The CLI (cli.main) shows its own progress: DSPy's per-call warnings (a truncated answer is a
    parse failure, counted in eval.json) and transformers' loading bars would bury it."""
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    logging.getLogger("dspy.teleprompt").setLevel(logging.WARNING)
    if "transformers" not in sys.modules:  # read when it loads; importing it here costs ~2 s a command
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    from transformers.utils import logging as hf_logging  # loaded already: costs nothing here

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
