"""Shared fixtures. Tests run the real embedded model; it is converted once per machine into
$JOINTOPT_HOME (default ~/.cache/jointopt) and loaded once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run `jointopt ...` in a fresh process, as a user's shell script would."""
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jointcli.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"
