"""What the code's layout promises: steps see only StepContext, importing the package changes
nothing in the process, and no library module reaches up into the command line."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys

from jointcli.context import Context
from jointcli.steps.kinds import StepContext

from .conftest import ROOT


def test_context_provides_what_a_step_may_touch():
    members = set(StepContext.__annotations__) | {
        n for n, v in vars(StepContext).items() if inspect.isfunction(v) and not n.startswith("_")
    }
    fields = {f.name for f in dataclasses.fields(Context)}
    assert members, "StepContext lists nothing"
    assert members <= fields | set(dir(Context)), members - fields - set(dir(Context))


def test_importing_the_package_sets_no_process_state():
    watched = (
        "OMP_WAIT_POLICY",
        "HF_HUB_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY",
        "TRANSFORMERS_VERBOSITY",
        "TQDM_DISABLE",
    )
    env = {k: v for k, v in os.environ.items() if k not in watched}
    code = (
        "import os, jointcli, jointcli.context, jointcli.schedule, jointcli.models.provider\n"
        f"print(sorted(k for k in {watched!r} if k in os.environ))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_library_module_imports_the_cli():
    for path in (ROOT / "jointcli").rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any(n == "cli" or n.endswith(".cli") for n in names), f"{path} imports the CLI"
