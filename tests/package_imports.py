"""The import statements of a package's modules, read with ast: every form (`import a.b`, `from a import b`,
relative imports, `importlib.import_module("a.b")`), at module level, under `if TYPE_CHECKING:` or inside
functions. The layout tests (test_layout.py, test_house.py) read the package's structure from here.

    modules = package_modules(ROOT / "jointcli")     # {"jointcli.steps.base": Path(...), ...}
    for found in package_imports(ROOT / "jointcli"):  # Import(module, path, line, names, targets, in_function)
        ...
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    module: str  # the importing module: "jointcli.steps.base"
    path: Path
    line: int
    end_line: int
    names: tuple[str, ...]  # every absolute name the statement mentions: "jointcli.steps", "jointcli.steps.traces"
    targets: tuple[str, ...]  # the package's modules whose code it needs run: the edges of the import graph
    in_function: bool  # runs when a function is called, not when its module is imported


def in_the_cli(module: str, package: str = "jointcli") -> bool:
    """Whether `module` is part of the command line: `PACKAGE.cli`, a module or a package of its own."""
    return module == f"{package}.cli" or module.startswith(f"{package}.cli.")


def package_modules(package: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file under `package` (a package's own name for its __init__)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _base(module: str, path: Path, level: int) -> str:
    """The package a relative import of `level` dots starts from: `.` is the module's own package."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    return ".".join(package[: len(package) - level + 1])


def _from_names(node: ast.ImportFrom, module: str, path: Path) -> tuple[str, list[str]]:
    """(the module a `from` import reads, the absolute names of what it imports from it)."""
    source = node.module or ""
    if node.level:
        base = _base(module, path, node.level)
        source = f"{base}.{source}" if source else base
    return source, [f"{source}.{alias.name}" for alias in node.names if alias.name != "*"]


def _string_import(node: ast.Call) -> str | None:
    """The module named by `importlib.import_module("x.y")` or `__import__("x.y")`, when it is a literal."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def _statement(node: ast.AST, module: str, path: Path, modules: dict) -> tuple[list[str], list[str]] | None:
    """(names, targets) of an import statement or a literal import_module call; None for other nodes.
    `from p import m` needs module p.m when m is one (p's __init__ runs first, but a package may
    re-export its children), else p itself; `import a.b` needs a.b."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return names, [name for name in names if name in modules]
    if isinstance(node, ast.ImportFrom):
        source, imported = _from_names(node, module, path)
        targets = [name for name in imported if name in modules]
        if len(targets) < len(node.names) and source in modules:  # a name defined in `source` itself
            targets.append(source)
        return [source, *imported], targets
    if isinstance(node, ast.Call) and (named := _string_import(node)):
        return [named], [named] if named in modules else []
    return None


def _function_parents(tree: ast.AST) -> set[ast.AST]:
    """Every node that sits inside a function (or a lambda) of the tree."""
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(child for child in ast.walk(node) if child is not node)
    return inside


def _module_imports(module: str, path: Path, modules: dict) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    in_functions = _function_parents(tree)
    found = []
    for node in ast.walk(tree):
        statement = _statement(node, module, path, modules)
        if statement is None:
            continue
        names, targets = statement
        targets = [t for t in dict.fromkeys(targets) if t != module]
        found.append(
            Import(module, path, node.lineno, node.end_lineno, tuple(names), tuple(targets), node in in_functions)
        )
    return sorted(found, key=lambda i: i.line)


def package_imports(package: Path) -> list[Import]:
    """Every import in every module of `package`, in file and line order."""
    modules = package_modules(package)
    return [found for module, path in modules.items() for found in _module_imports(module, path, modules)]


def comment_lines(path: Path) -> set[int]:
    """Line numbers of `path` that hold a comment (a `#` in a string is not one)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {token.start[0] for token in tokens if token.type == tokenize.COMMENT}


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (any import statement, anywhere in the module)."""
    graph: dict[str, set[str]] = {module: set() for module in package_modules(package)}
    for found in package_imports(package):
        graph[found.module].update(found.targets)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted; [] when the
    graph has no cycle. A module importing itself is not counted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def cycle_path(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """One cycle through a strongly connected group, as a path that ends where it starts: [a, b, a]."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first from start, within the group, until an edge leads back to it
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                frontier.append(nxt)
    raise ValueError(f"{group} is not strongly connected")
