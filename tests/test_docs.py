"""README.md and the pages under docs/ tell the truth: every code block in them is run or checked.

- ```python blocks run as pasted, in a fresh process and an empty folder (they load the model).
- ```bash blocks run as one shell script in an empty folder that holds `recipes/` and the runs
  ($JOINTOPT_RUNS), with this environment's `jointopt` on PATH. A block whose commands need no model
  runs in the fast tier.
- A block that trains, needs a server or needs a finished run is not run: the line above it says why,
  `<!-- not run: REASON -->`, with a REASON from NOT_RUN, and pytest reports the skip with it.
- Every `jointopt` command of every bash block, run or not, names a real command and real flags, and
  a command that takes a recipe passes `jointopt validate`'s checks with its overrides (with each of
  its `--strategies`; its `--optimizer` a key of the recipe).
- ```yaml blocks are recipes: a whole one (with `data:` and `program:`) passes `jointopt validate`'s
  checks; a part of one fits the schema once merged into recipes/sst2.yaml.
- ```text blocks are output and file trees, not code. A fence without a language is an error.

Beyond the blocks: the README's tables of commands and exit codes are the CLI's, its links reach real
pages and headings, it fits in 200 lines, the recipe reference is generated from `jointopt schema`,
and the site builds in MkDocs' strict mode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import RECIPES, ROOT, run_cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = {
    "trains": "trains a model or runs a whole schedule: minutes (its commands are checked, not run)",
    "suite": "runs the test suite",
    "bench": "runs the benchmarks: half an hour",
    "probes": "times the model on this machine: a minute (its commands are checked, not run)",
    "server": "needs a model server, a GPU or a download",
    "needs-run": "needs a finished run with a weight step (its commands are checked, not run)",
}
LANGUAGES = {"python", "bash", "yaml", "text"}
RECIPE_COMMANDS = {"validate", "plan", "eval", "optimize-prompts", "bootstrap", "finetune", "joint", "sweep"}
NO_MODEL_COMMANDS = {"validate", "schema", "status", "compare"}
FENCE = re.compile(r"^\s*```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!-- not run: ([\w-]+) -->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    language: str
    code: str
    not_run: str | None  # the REASON of a `<!-- not run: REASON -->` line right above

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    lines, found, index = page.read_text().splitlines(), [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if lines[j].strip() == "```")
        above = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.match(above)
        code = textwrap.dedent("\n".join(lines[index + 1 : end])) + "\n"
        relative = str(page.relative_to(ROOT))
        found.append(Block(relative, index + 1, opening.group(1), code, marker.group(1) if marker else None))
        index = end + 1
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def of_language(language: str) -> list[Block]:
    return [block for block in BLOCKS if block.language == language]


def shell_lines(block: Block) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments, environment assignments
    in front, and redirections or pipes after a command left out."""
    found = []
    for line in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
            words = words[1:]
        stop = next((i for i, word in enumerate(words) if word in (">", "|", "&&", ";", "2>")), len(words))
        if words[:stop]:
            found.append(words[:stop])
    return found


def jointopt_commands(block: Block) -> list[list[str]]:
    return [words[1:] for words in shell_lines(block) if words[0] == "jointopt" and len(words) > 1]


COMMANDS = [(block, args) for block in of_language("bash") for args in jointopt_commands(block)]


def needs_no_model(block: Block) -> bool:
    lines = shell_lines(block)
    return all(words[0] == "jointopt" and words[1:2] and words[1] in NO_MODEL_COMMANDS for words in lines)


def tiered(blocks: list[Block], fast=lambda block: False) -> list:
    return [pytest.param(block, id=str(block), marks=() if fast(block) else pytest.mark.model) for block in blocks]


# ---------------------------------------------------------------- the blocks themselves
def test_every_block_says_what_it_is():
    bare = [f"{block}: ```{block.language}" for block in BLOCKS if block.language not in LANGUAGES]
    assert not bare, f"code blocks need one of the languages {sorted(LANGUAGES)}: {bare}"
    unknown = [f"{block}: {block.not_run}" for block in BLOCKS if block.not_run and block.not_run not in NOT_RUN]
    assert not unknown, f"`<!-- not run: REASON -->` takes a REASON of {sorted(NOT_RUN)}: {unknown}"
    misplaced = [str(block) for block in BLOCKS if block.not_run and block.language not in ("python", "bash")]
    assert not misplaced, f"only python and bash blocks run, so only they take a `not run` line: {misplaced}"


@pytest.mark.parametrize("block", tiered(of_language("python")))
def test_python_block_runs_as_pasted(block, tmp_path):
    """In a fresh process and an empty folder, as a user pasting it into a file would run it."""
    if block.not_run:
        pytest.skip(NOT_RUN[block.not_run])
    (tmp_path / "snippet.py").write_text(block.code)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{block}:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{block} printed nothing"


@pytest.mark.parametrize("block", tiered(of_language("bash"), fast=needs_no_model))
def test_shell_block_runs(block, tmp_path):
    """As a user would paste it after `source .venv/bin/activate`, in a folder with the recipes."""
    if block.not_run:
        pytest.skip(NOT_RUN[block.not_run])
    (tmp_path / "recipes").symlink_to(RECIPES)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "JOINTOPT_RUNS": str(tmp_path / "runs"),
    }
    script = "set -euo pipefail\n" + block.code
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{block} exited {result.returncode}:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("block", of_language("yaml"), ids=str)
def test_yaml_block_is_a_recipe(block, tmp_path):
    from jointcli.checks import check_recipe
    from jointcli.recipe import load_recipe

    shown = yaml.safe_load(block.code)
    whole = "data" in shown and "program" in shown
    recipe = shown if whole else merged(yaml.safe_load((RECIPES / "sst2.yaml").read_text()), shown)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(tmp_path / "recipe.yaml", [])  # the schema: keys, types, references
    if whole:
        check_recipe(loaded)  # and what `jointopt validate` checks beyond it: data, metric, optimizers


def merged(base: dict, part: dict) -> dict:
    out = dict(base)
    for key, value in part.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------- the jointopt commands shown
def cli_commands() -> dict:
    """The CLI's commands by name, as click sees them: each with its options."""
    import typer

    from jointcli.cli import app

    return typer.main.get_command(app).commands


def options_of(command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}


def flag_takes_no_value(command, flag: str) -> bool:
    return any(flag in (*param.opts, *param.secondary_opts) and param.is_flag for param in command.params)


def split_args(command, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """(positional arguments, {option: value}) of `jointopt NAME ARGS`."""
    positional, options, rest = [], {}, list(args)
    while rest:
        word = rest.pop(0)
        if word.startswith("--"):
            flag, has_value, value = word.partition("=")
            if not has_value and not flag_takes_no_value(command, flag):
                value = rest.pop(0) if rest else ""
            options[flag] = value
        else:
            positional.append(word)
    return positional, options


@pytest.mark.parametrize("block,args", COMMANDS, ids=[f"{b}:{' '.join(a)[:50]}" for b, a in COMMANDS])
def test_jointopt_command_is_real(block, args):
    """Its command and flags exist; a recipe command's recipe and overrides pass validate's checks."""
    from jointcli.checks import check_recipe
    from jointcli.recipe import load_recipe

    commands = cli_commands()
    assert args[0] in commands, f"{block} shows `jointopt {args[0]}`, which is no command"
    command = commands[args[0]]
    unknown = [a.split("=")[0] for a in args[1:] if a.startswith("--") and a.split("=")[0] not in options_of(command)]
    assert not unknown, f"{block} shows `jointopt {args[0]}` with {unknown}, which it does not take"
    if args[0] not in RECIPE_COMMANDS:
        return
    positional, options = split_args(command, args[1:])
    recipe_path, overrides = ROOT / positional[0], positional[1:]
    strategies = options.get("--strategies")
    for strategy in strategies.split(",") if strategies else [None]:
        extra = [f"schedule.strategy={strategy.strip()}"] if strategy else []
        recipe = load_recipe(recipe_path, overrides + extra)
        check_recipe(recipe)
        if "--optimizer" in options:
            assert options["--optimizer"] in recipe.optimizers, f"{block}: no optimizer {options['--optimizer']!r}"


# ---------------------------------------------------------------- the README
README = (ROOT / "README.md").read_text()


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the table whose header row starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


@pytest.mark.parametrize("page", ["README.md", "docs/commands.md"])
def test_the_commands_table_is_the_clis(page):
    """Every command of the CLI has a row, and every row is a command."""
    shown = {row[0].strip("`").split()[0] for row in table_rows((ROOT / page).read_text(), "command")}
    assert shown == set(cli_commands()), f"{page}'s commands table differs from the CLI's commands"


@pytest.mark.parametrize("page", ["README.md", "docs/commands.md"])
def test_the_exit_codes_are_the_errors(page):
    from jointcli.errors import GateError, InputError, JointoptError, StepError

    rows = {int(row[0].strip("`")): row[1] for row in table_rows((ROOT / page).read_text(), "exit code")}
    errors = {cls.exit_code for cls in (JointoptError, *JointoptError.__subclasses__())}
    assert set(rows) == {0, 130} | errors
    assert "step failed" in rows[StepError.exit_code]
    assert "invalid input" in rows[InputError.exit_code]
    assert "gate" in rows[GateError.exit_code]
    assert "interrupted" in rows[130]


def test_the_readme_fits_on_a_screen():
    assert len(README.splitlines()) <= 200, "README.md is a front page: reference material goes to docs/"


def anchors_of(page: Path) -> set[str]:
    """The ids of a page's headings: an explicit `{ #id }`, else Python-Markdown's slug of the text."""
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", page.read_text(), flags=re.M):
        explicit = re.search(r"\{\s*#([\w-]+)\s*\}\s*$", heading)
        text = re.sub(r"[^\w\s-]", "", heading.lower()).strip()
        found.add(explicit.group(1) if explicit else re.sub(r"[-\s]+", "-", text))
    return found


def test_the_readme_links_reach_pages_and_headings():
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([\w-]+))?\)", README)
    assert links, "README.md links into the docs"
    broken = [f"{path}#{anchor}" for path, anchor in links if not (ROOT / path).is_file()]
    broken += [f"{path}#{anchor}" for path, anchor in links if anchor and anchor not in anchors_of(ROOT / path)]
    assert not broken, f"README.md links to missing pages or headings: {broken}"


def defines(module: Path, name: str) -> bool:
    """Whether a module's source defines or imports `name` (read as text: no import, no torch)."""
    return bool(re.search(rf"^\s*(def|class) {name}\b|^{name}\b.*=|\bimport .*\b{name}\b", module.read_text(), re.M))


def named_code_exists(dotted: str) -> bool:
    """`jointcli.a.b.name`: a module (or package) of the longest dotted prefix, defining the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.is_file():
            rest = parts[cut:]
            return not rest or (len(rest) == 1 and defines(module, rest[0]))
    return False


def test_the_code_the_pages_name_exists():
    """Files (`jointcli/weights/soft_prompt.py`, `bench/held_out.py`, `recipes/iris.yaml`) and Python
    names (`jointcli.models.provider.local_lm`, in code spans and snippets) that the pages name are real."""
    missing = []
    for page in PAGES:
        text = page.read_text()
        for path in sorted(set(re.findall(r"\b(?:jointcli|tests|bench|recipes)/[\w/.-]*\.(?:py|yaml)\b", text))):
            missing += [f"{page.relative_to(ROOT)}: {path}"] if not (ROOT / path).is_file() else []
        for dotted in sorted(set(re.findall(r"\bjointcli(?:\.\w+)+", text))):
            missing += [f"{page.relative_to(ROOT)}: {dotted}"] if not named_code_exists(dotted) else []
        for module, name in re.findall(r"from (jointcli[\w.]*) import (\w+)", text):
            missing += (
                [f"{page.relative_to(ROOT)}: {module}.{name}"] if not named_code_exists(f"{module}.{name}") else []
            )
    assert not missing, f"the pages name code that does not exist: {missing}"


# ---------------------------------------------------------------- the site
def load_hook():
    spec = importlib.util.spec_from_file_location("recipe_schema_hook", ROOT / "docs" / "hooks" / "recipe_schema.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    return hook


def test_the_recipe_reference_is_jointopt_schema():
    """The hook renders the schema `jointopt schema` prints, with a row for every key of every section."""
    hook = load_hook()
    printed = run_cli("schema")
    assert printed.returncode == 0, printed.stderr
    schema = json.loads(printed.stdout)
    assert hook.recipe_schema() == schema
    assert hook.MARKER in (ROOT / "docs" / hook.PAGE).read_text()
    page = hook.render(schema)
    for name, body in [(hook.ROOT, schema), *schema["$defs"].items()]:
        section = page.split(f"{{ #{hook.anchor(name)} }}", 1)[1].split("\n### ", 1)[0]
        missing = [key for key in body.get("properties", {}) if f"| `{key}` |" not in section]
        assert not missing, f"the reference's section {name} lacks {missing}"


def test_the_site_builds_in_strict_mode(tmp_path):
    """What `make docs` runs: a broken link, a missing page or an unknown anchor fails."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
