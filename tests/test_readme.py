"""README.md tells the truth: its Python snippets run when pasted, and every `jointopt` command it
shows names a real subcommand and real flags."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[list[str]]:
    """`jointopt ...` lines of the README's shell blocks, comments stripped, as argument lists."""
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].split(" > ")[0].strip()
            if line.startswith("jointopt "):
                found.append(line.split()[1:])
    return found


def test_the_readme_shows_snippets_and_commands():
    assert blocks("python") and len(commands()) >= 10


@pytest.mark.model
@pytest.mark.parametrize("snippet", blocks("python"), ids=lambda s: s.splitlines()[1][:40])
def test_python_snippet_runs_as_pasted(snippet, tmp_path):
    """In a fresh process and an empty folder, as a user pasting it into a file would run it."""
    (tmp_path / "snippet.py").write_text(snippet)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


@pytest.mark.parametrize("command", sorted({c[0] for c in commands()}))
def test_commands_and_flags_exist(command):
    shown = {flag.split("=")[0] for args in commands() if args[0] == command for flag in args if flag.startswith("--")}
    result = run_cli(command, "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, f"`jointopt {command}` is shown in README.md but is no command: {result.stderr}"
    missing = [flag for flag in sorted(shown) if flag not in result.stdout]
    assert not missing, f"README.md shows `jointopt {command}` with {missing}, which it does not take"
