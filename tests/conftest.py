"""Shared fixtures. Tests run the real embedded model; it is converted once per machine into
$JOINTOPT_HOME (default ~/.cache/jointopt) and loaded once per test session.

Two tiers: tests marked `model` load the embedded model or train (make test runs everything);
the rest need no model and run in seconds (make test-fast, i.e. pytest -m "not model", which
fails if anything imported transformers). JOINTOPT_CPU_BF16=0 runs the suite on the fp32 path
of a CPU with native bf16; the checks of the bf16 path then skip and say why.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jointcli.models.device import BF16_SWITCH, cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

requires_native_bf16 = pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason=f"the bf16 path is checked where bf16 is native (avx512_bf16 or AMX); this CPU has none, "
           f"or {BF16_SWITCH}=0 forces the fp32 path")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run `jointopt ...` in a fresh process, as a user's shell script would."""
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jointcli.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def pytest_sessionfinish(session, exitstatus):
    """The fast tier promises no model: make that a check, not a hope."""
    if session.config.getoption("markexpr", "") == "not model" and "transformers" in sys.modules:
        print("\nerror: a test outside the `model` tier imported transformers; mark it "
              "@pytest.mark.model", file=sys.stderr)
        session.exitstatus = 1
