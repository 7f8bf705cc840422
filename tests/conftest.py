"""Shared fixtures. Tests run the real embedded model; it is converted once per machine into
$JOINTOPT_HOME (default ~/.cache/jointopt) and loaded once per test session.

Two tiers: tests marked `model` load the embedded model or train (make test runs everything);
the rest need no model and run in seconds (make test-fast, i.e. pytest -m "not model", which
fails if anything imported transformers). JOINTOPT_CPU_BF16=0 runs the suite on the fp32 path
of a CPU with native bf16; the checks of the bf16 path then skip and say why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jointcli.weights.device import BF16_SWITCH, cpu_has_native_bf16, set_process_defaults


def _one_share_of_the_cpus_per_worker() -> None:
    """Under pytest-xdist (`make test` runs `-n 2`), each worker gets its own share of this process's
    CPUs, so that torch's threads (sized from the affinity, device.cpu_budget) never oversubscribe the
    cores; the processes a test starts inherit the share."""
    import os

    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and count.isdigit() and hasattr(os, "sched_setaffinity")):
        return
    cpus, count = sorted(os.sched_getaffinity(0)), int(count)
    share = len(cpus) // count
    if share >= 1:
        index = int(worker[2:]) % count
        os.sched_setaffinity(0, cpus[index * share : (index + 1) * share])


_one_share_of_the_cpus_per_worker()
set_process_defaults()  # the suite is an entry point, like the CLI: before any test loads torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

requires_native_bf16 = pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason=f"the bf16 path is checked where bf16 is native (avx512_bf16 or AMX); this CPU has none, "
    f"or {BF16_SWITCH}=0 forces the fp32 path",
)


def tiny(train: int = 6, dev: int = 4, test: int = 4, *extra: str) -> list[str]:
    """Overrides that make recipes/sst2.yaml run in seconds: a few examples, short answers."""
    return [
        f"data.split.train={train}",
        f"data.split.dev={dev}",
        f"data.split.test={test}",
        "models.small.max_tokens=24",
        *extra,
    ]


def manifest(run: Path) -> dict:
    """A run directory's manifest.json, as the file says (not through RunDir)."""
    return json.loads((run / "manifest.json").read_text())


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run `jointopt ...` in a fresh process, as a user's shell script would."""
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "jointcli.cli", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli(*args) -> int:
    """Run `jointopt ARGS` in this process, as the console script does (the model stays loaded
    between calls); returns the exit code. run_cli is for where the process boundary matters."""
    from jointcli.cli import main

    old = sys.argv
    sys.argv = ["jointopt", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exit:
        return exit.code or 0
    finally:
        sys.argv = old


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


# Every test in these files runs the model, and importing them imports transformers (seconds):
# the fast tier does not collect them at all.
MODEL_ONLY_FILES = {"test_engine.py", "test_cache.py"}


def _fast_tier(config) -> bool:
    return config.getoption("markexpr", "") == "not model"


def pytest_ignore_collect(collection_path, config):
    if _fast_tier(config) and collection_path.name in MODEL_ONLY_FILES:
        return True
    return None


def pytest_sessionfinish(session, exitstatus):
    """The fast tier promises no model: make that a check, not a hope."""
    if _fast_tier(session.config) and "transformers" in sys.modules:
        print(
            "\nerror: a test outside the `model` tier imported transformers; mark it @pytest.mark.model",
            file=sys.stderr,
        )
        session.exitstatus = 1
