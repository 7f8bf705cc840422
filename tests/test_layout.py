"""What the code's layout promises: steps see only StepContext, importing the package changes
nothing in the process, and no library module reaches up into the command line (by any form of
import: `import a.b`, `from a import b`, relative, inside a function, `importlib.import_module`)."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jointcli.context import Context
from jointcli.steps.base import StepContext

from .conftest import ROOT
from .package_imports import in_the_cli, package_imports


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


def _imports_of_the_cli(package: Path) -> list[str]:
    """'FILE:LINE' of every import of the CLI outside it, in any form and at any depth."""
    return [
        f"{found.path}:{found.line}"
        for found in package_imports(package)
        if not in_the_cli(found.module, package.name) and any(in_the_cli(name, package.name) for name in found.names)
    ]


def test_no_library_module_imports_the_cli():
    assert _imports_of_the_cli(ROOT / "jointcli") == []


@pytest.mark.parametrize(
    "statement",
    [
        "import pkg.cli",
        "import pkg.cli as entry",
        "from pkg import cli",
        "from pkg.cli import main",
        "from .. import cli",
        "from ..cli import main",
        "from ..cli.commands import run",
        "def later():\n    from ..cli import main",
        "import importlib\nimportlib.import_module('pkg.cli')",
    ],
)
def test_every_form_of_import_of_the_cli_is_seen(tmp_path: Path, statement: str):
    package = tmp_path / "pkg"
    (package / "cli").mkdir(parents=True)
    (package / "sub").mkdir()
    for name in ("__init__.py", "cli/__init__.py", "cli/commands.py", "sub/__init__.py"):
        (package / name).write_text("from pkg.sub import lower\n" if name.startswith("cli/") else "")
    (package / "sub" / "lower.py").write_text(statement + "\n")
    assert _imports_of_the_cli(package) == [f"{package / 'sub' / 'lower.py'}:{statement.count(chr(10)) + 1}"]


def test_the_cli_importing_the_library_or_a_name_like_cli_is_not_flagged(tmp_path: Path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("from .lower import x\n")
    (package / "lower.py").write_text("import pkg.client\nfrom . import cli_helpers\nx = 'from .cli import main'\n")
    assert _imports_of_the_cli(package) == []
