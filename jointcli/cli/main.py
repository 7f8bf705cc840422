"""The entry point (`jointopt`, pyproject's [project.scripts]): process-wide settings first, then the
command; the one place that maps every error to an exit code and a one-line message."""

from __future__ import annotations

import os
import signal
import sys

import typer
from rich.markup import escape

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from ..console import console, quiet_libraries
from ..errors import JointoptError
from .app import app

# The libraries whose deprecation notices main() hides (by the module a warning is attributed to):
# jointcli's own and a user's module (a metric, a program class) still show theirs.
LIBRARIES_NOTICES = (
    r"(dspy|litellm|openai|httpx|httpcore|aiohttp|pydantic|transformers|peft|accelerate|torch"
    r"|huggingface_hub|tokenizers|safetensors|gguf|numpy|scipy|sklearn|pandas|pyarrow|datasets"
    r"|matplotlib|optuna|tqdm|jinja2|diskcache|gepa)(\.|$)"
)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _app() -> int | None:
    """The command; a full disk or a read-only file system, wherever met, is bad input (files.disk_error).
    Writes into a run directory say so themselves, permissions included."""
    try:
        return app(standalone_mode=False)  # typer turns Ctrl-C into a returned 130
    except OSError as err:
        from ..files import WRITE_ERRNOS, disk_error

        if err.errno not in WRITE_ERRNOS:
            raise
        raise disk_error(err) from err


def _set_up_process(debug: bool) -> None:
    """What holds for the whole process, before any command imports a library."""
    from ..weights.device import set_process_defaults

    set_process_defaults()  # OMP_WAIT_POLICY, offline hub: before any command imports torch
    quiet_libraries()
    signal.signal(signal.SIGTERM, _interrupt)  # a CI runner's stop: as clean as Ctrl-C
    if not sys.stderr.isatty():
        # In a log, DSPy's tqdm bars are a flood of carriage returns; jointopt prints plain progress
        # lines instead (console.phase). tqdm reads this when it is first imported, which is later.
        os.environ.setdefault("TQDM_DISABLE", "1")
    if not debug:  # libraries' deprecation notices are for their callers' authors, not our users
        import warnings

        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARIES_NOTICES)


def main() -> None:
    """Entry point: one place maps every error to an exit code and a one-line message."""
    debug = os.environ.get("JOINTOPT_DEBUG") == "1"
    _set_up_process(debug)
    try:
        code = _app()
        if isinstance(code, int) and code:
            if code == 130:
                console.print("interrupted")
            sys.exit(code)
    except JointoptError as err:
        if debug:
            console.print_exception()
        console.print(f"[red]error[/]: {escape(str(err))}", highlight=False)  # [brackets] are text
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted")
        sys.exit(130)
    except ClickException as err:  # bad flags: click's usage message, exit code 2
        err.show()
        sys.exit(err.exit_code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except Exception as err:
        if debug:
            raise
        console.print(
            f"[red]error[/]: {type(err).__name__}: {escape(str(err))} (JOINTOPT_DEBUG=1 for a traceback)",
            highlight=False,
        )
        sys.exit(1)
