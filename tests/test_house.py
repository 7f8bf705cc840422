"""The house rules of jointcli's code, read from its source with ast (no model, no import of it):

- no import cycle among its modules, counting every import statement (module level, under
  `if TYPE_CHECKING:`, inside functions); a package's __init__ may re-export its children, as long
  as no child imports the package itself;
- at most 15 imports of the package's own modules inside functions outside the CLI, each with a
  comment on its line or the line above saying why it is late (a heavy dependency, the fast --help);
- no module over 400 lines, no function over 50.

Each rule is also run on a small package written for the test, so that each check is seen to fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT
from .package_imports import (
    Import,
    comment_lines,
    cycle_path,
    cycles,
    import_graph,
    in_the_cli,
    package_imports,
    package_modules,
)

PACKAGE = ROOT / "jointcli"
MAX_LATE_IMPORTS = 15
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50


def _import_cycles(package: Path) -> list[str]:
    """One line per group of modules that import each other: 'a, b, c: a -> b -> a' (one cycle of it)."""
    graph = import_graph(package)
    return [f"{', '.join(group)}: {' -> '.join(cycle_path(graph, group))}" for group in cycles(graph)]


def _late_own_imports(package: Path) -> list[Import]:
    """Imports of the package's own modules that sit inside functions, outside the CLI."""
    name = package.name
    return [
        found
        for found in package_imports(package)
        if found.in_function
        and not in_the_cli(found.module, name)
        and any(n == name or n.startswith(f"{name}.") for n in found.names)
    ]


def _without_a_reason(imports: list[Import], package: Path) -> list[str]:
    """'FILE:LINE' of each import with no comment on its lines and no comment line just above it."""
    missing = []
    for found in imports:
        comments = comment_lines(found.path)
        above = found.path.read_text().splitlines()[found.line - 2].strip() if found.line > 1 else ""
        if not comments & set(range(found.line, found.end_line + 1)) and not above.startswith("#"):
            missing.append(f"{found.path.relative_to(package.parent)}:{found.line}")
    return missing


def _long_modules(package: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    lengths = {path: len(path.read_text().splitlines()) for path in package_modules(package).values()}
    return [f"{path.relative_to(package.parent)} {n}" for path, n in sorted(lengths.items()) if n > limit]


def _long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'FILE:LINE NAME LINES' of every function (or method) longer than `limit` lines, def to end."""
    found = []
    for path in package_modules(package).values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.name} {lines}")
    return sorted(found)


def _describe(imports: list[Import]) -> str:
    return "\n".join(f"{found.path.relative_to(ROOT)}:{found.line} -> {', '.join(found.targets)}" for found in imports)


# ---------------------------------------------------------------- jointcli
def test_no_import_cycle():
    found = _import_cycles(PACKAGE)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_few_own_imports_inside_functions_and_each_says_why():
    late = _late_own_imports(PACKAGE)
    assert len(late) <= MAX_LATE_IMPORTS, f"{len(late)} imports inside functions:\n{_describe(late)}"
    missing = _without_a_reason(late, PACKAGE)
    assert not missing, "no comment says why these imports are inside functions:\n" + "\n".join(missing)


def test_no_module_is_over_400_lines():
    found = _long_modules(PACKAGE)
    assert not found, "modules over 400 lines:\n" + "\n".join(found)


def test_no_function_is_over_50_lines():
    found = _long_functions(PACKAGE)
    assert not found, "functions over 50 lines:\n" + "\n".join(found)


# ---------------------------------------------------------------- the checks themselves, on a small package
def _package(root: Path, files: dict[str, str]) -> Path:
    """A package `pkg` under `root` with the given files (relative path -> source)."""
    for name, source in files.items():
        (root / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "pkg" / name).write_text(source)
    return root / "pkg"


@pytest.mark.parametrize(
    "files, expected",
    [
        # a cycle kept apart only by an import inside a function is a cycle
        (
            {"a.py": "from .b import f\n", "b.py": "def f():\n    from . import a\n"},
            ["pkg.a, pkg.b: pkg.a -> pkg.b -> pkg.a"],
        ),
        # absolute `import x.y`, a relative import two levels up, under TYPE_CHECKING
        (
            {
                "a.py": "import pkg.sub.c\n",
                "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b import B\n",
                "b.py": "import importlib\nA = importlib.import_module('pkg.a')\n",
            },
            ["pkg.a, pkg.b, pkg.sub.c: pkg.a -> pkg.sub.c -> pkg.b -> pkg.a"],
        ),
        # a child that imports a name from its own package, which re-exports that child
        (
            {
                "sub/__init__.py": "from .c import C\nfrom .d import D\n",
                "sub/c.py": "C = 1\n",
                "sub/d.py": "from . import C\n",
            },
            ["pkg.sub, pkg.sub.d: pkg.sub -> pkg.sub.d -> pkg.sub"],
        ),
        # re-exporting children, which import their siblings as modules: no cycle
        (
            {
                "sub/__init__.py": "from .c import C\nfrom .d import D\n",
                "sub/c.py": "C = 1\n",
                "sub/d.py": "from . import c\nfrom .c import C\nfrom pkg.sub import c as again\nD = c.C\n",
                "top.py": "from .sub import D\n",
            },
            [],
        ),
    ],
)
def test_cycles_are_found_in_every_form_of_import(tmp_path: Path, files: dict, expected: list):
    package = _package(tmp_path, {"__init__.py": "", "sub/__init__.py": "", **files})
    assert _import_cycles(package) == expected


def test_late_imports_are_counted_outside_the_cli_and_need_a_comment(tmp_path: Path):
    package = _package(
        tmp_path,
        {
            "__init__.py": "",
            "heavy.py": "import json\n",
            "cli.py": "def main():\n    from .heavy import json\n",
            "cli_helpers.py": "def f():\n    from . import heavy  # json: only when f runs\n",
            "user.py": (
                "def g():\n"
                "    import json  # not the package's own\n"
                "\n"
                "    # json: only when g runs\n"
                "    from .heavy import json\n"
                "    from pkg import heavy\n"
                "    from .heavy import (  # reason on the first line of a long import\n"
                "        json,\n"
                "    )\n"
                "    text = 'from . import heavy'  # a string is no import\n"
                "    return text\n"
            ),
        },
    )
    late = _late_own_imports(package)
    assert [(found.module, found.line) for found in late] == [
        ("pkg.cli_helpers", 2),
        ("pkg.user", 5),
        ("pkg.user", 6),
        ("pkg.user", 7),
    ]
    assert _without_a_reason(late, package) == ["pkg/user.py:6"]


def test_long_modules_and_functions_are_named(tmp_path: Path):
    body = "".join(f"x{i} = {i}\n" for i in range(49))
    fits = "def fits():\n" + body.replace("x", "    x")  # 50 lines
    method = "    def long(self):\n" + body.replace("x", "        x") + "        return 1\n"  # 51 lines
    package = _package(
        tmp_path,
        {
            "__init__.py": "",
            "short.py": f"{fits}\n\nclass C:\n{method}",
            "long.py": "x = 1\n" * 401,
        },
    )
    assert _long_modules(package) == ["pkg/long.py 401"]
    assert _long_functions(package) == ["pkg/short.py:54 long 51"]
