"""What each argument of a DSPy prompt optimizer may be, as far as DSPy itself says: checks.py holds a
recipe's `args` and `compile_args` to it before any step runs.

    >>> argument_types("BootstrapFewShot", "args")["max_errors"]  # its docstring: max_errors (Optional[int])
    [<class 'int'>, <class 'NoneType'>]
    >>> describe(argument_types("LabeledFewShot", "args")["k"]), fits("many", [int, type(None)])
    ('an integer', False)

For each parameter, the first of these that tells:

1. its annotation, when it is made of plain types (bool, int, float, str, dict, list, None) and
   Literal values; an annotation DSPy left as a string is read the same way;
2. the type that its function's docstring gives it in an `Args:` section
   (`metric_threshold (float, optional): ...`);
3. its default, when that is not None (`k=16`: an integer);
4. the type that DSPy's other prompt optimizers give a parameter of the same name, when all that
   give one agree: BootstrapFewShotWithRandomSearch hands `max_errors`, `metric_threshold` and
   `teacher_settings` to BootstrapFewShot, and `num_threads` to DSPy's Evaluate.

Whatever none of them tells is not checked here (`unchecked_arguments()`; docs/commands.md lists
them): the optimizer says what it makes of the value, and a step that fails on one names it.
"""

from __future__ import annotations

import ast
import inspect
import re
import types
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

from ..recipe import PromptOptimizer, Recipe
from .prompts import FORWARDS_TO, PROMPT_OPTIMIZERS, SUPPLIED, init_parameters, optimizer_class, parameters

SIMPLE = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
    list: "a list",
    type(None): "null",
}
_NAMES = {t.__name__: t for t in SIMPLE} | {"None": type(None), "Dict": dict, "List": list, "Mapping": dict}
_DOC_ARG = re.compile(r"^\s+(\w+)\s*\(([^()]+)\)\s*:")  # "    max_errors (Optional[int]): ..."
WHERE = ("args", "compile_args")  # the recipe keys: the constructor's arguments and compile()'s


def fits(value: Any, allowed: list) -> bool:
    """Whether `value` is one of `allowed`: true is not an integer, but an integer is a number."""
    for a in allowed:
        if not isinstance(a, type):
            if type(value) is type(a) and value == a:
                return True
        elif isinstance(value, bool):
            if a is bool:
                return True
        elif isinstance(value, a) or (a is float and isinstance(value, int)):
            return True
    return False


def describe(allowed: list) -> str:
    return " or ".join(SIMPLE[a] if isinstance(a, type) else repr(a) for a in allowed)


def optimizer_parameters(optimizer: str, where: str) -> dict[str, inspect.Parameter]:
    """The named parameters of the constructor (`where` args) or of compile() (compile_args)."""
    return init_parameters(optimizer) if where == "args" else parameters(optimizer_class(optimizer).compile)


def accepted_parameters(optimizer: str, where: str) -> dict[str, inspect.Parameter]:
    """The parameters a recipe may set under `where`: jointopt supplies the others (prompts.SUPPLIED)."""
    return {n: p for n, p in optimizer_parameters(optimizer, where).items() if n not in SUPPLIED}


@cache
def argument_types(optimizer: str, where: str) -> dict[str, list | None]:
    """Each parameter a recipe may set -> the types and literal values it may have; None: DSPy does not say."""
    docs = _documented(optimizer, where)
    shared = _shared_types()
    found = {}
    for name, param in accepted_parameters(optimizer, where).items():
        allowed = _declared(param, docs.get(name))
        # an annotation of a class or Any says the value may be more than its default's type
        annotated = param.annotation is not param.empty and not isinstance(param.annotation, str)
        if allowed is None and not annotated:
            default = param.default
            simple = default is not param.empty and default is not None and type(default) in SIMPLE
            allowed = [type(default)] if simple else shared.get(name)
        found[name] = allowed
    return found


def unchecked_arguments() -> dict[str, list[str]]:
    """Optimizer -> the arguments (`args.x`, `compile_args.y`) whose values DSPy gives no type to check."""
    found = {}
    for optimizer in PROMPT_OPTIMIZERS:
        names = [f"{where}.{n}" for where in WHERE for n, t in argument_types(optimizer, where).items() if t is None]
        if names:
            found[optimizer] = names
    return found


def unchecked_given(recipe: Recipe, key: str | None) -> str:
    """What a failed prompt step's error adds about optimizer `key`: the arguments the recipe gives it
    whose type DSPy does not declare (nothing checked them before the step ran), or ''.

    >>> from jointcli.recipe import load_recipe
    >>> recipe = load_recipe("recipes/sst2.yaml", ["optimizers.p.optimizer=BootstrapFewShotWithRandomSearch",
    ...     "optimizers.p.args={stop_at_score: high, num_candidate_programs: 1}"])
    >>> unchecked_given(recipe, "p")
    " (optimizers.p.args.stop_at_score='high' went unchecked: DSPy declares no type for it)"
    """
    spec = recipe.optimizers.get(key) if key else None
    if not isinstance(spec, PromptOptimizer) or spec.optimizer not in PROMPT_OPTIMIZERS:
        return ""
    unchecked = [
        f"optimizers.{key}.{where}.{name}={value!r}"
        for where, given in (("args", spec.args), ("compile_args", spec.compile_args))
        for name, value in given.items()
        if argument_types(spec.optimizer, where).get(name, []) is None
    ]
    if not unchecked:
        return ""
    it = "it" if len(unchecked) == 1 else "them"
    return f" ({', '.join(unchecked)} went unchecked: DSPy declares no type for {it})"


def _declared(param: inspect.Parameter, documented: str | None) -> list | None:
    """What the annotation says, else what the docstring says; None when neither says."""
    annotation = param.annotation
    if annotation is not param.empty:
        allowed = _from_text(annotation) if isinstance(annotation, str) else _from_annotation(annotation)
        if allowed is not None:
            return allowed
    return _from_text(documented) if documented else None


def _from_annotation(annotation: Any) -> list | None:
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    allowed: list = []
    for member in members:
        origin = get_origin(member) or member
        if origin is Literal:
            allowed += get_args(member)
        elif origin in SIMPLE:
            allowed.append(origin)
        else:
            return None
    return allowed


def _from_text(text: str) -> list | None:
    """'Optional[int]', 'float, optional', 'dict | None', "Literal['a', 'b']" -> what they allow;
    None for anything else (a class, Callable, Any)."""
    parts = [p.strip() for p in text.split(",")] if "[" not in text else [text.strip()]
    if "optional" in parts:
        parts = [p for p in parts if p != "optional"] + ["None"]
    allowed: list = []
    for part in parts:
        try:
            found = _from_node(ast.parse(part, mode="eval").body)
        except SyntaxError:
            return None
        if found is None:
            return None
        allowed += [a for a in found if a not in allowed]
    return allowed


def _from_node(node: ast.expr) -> list | None:
    if isinstance(node, ast.Constant) and node.value is None:
        return [type(None)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _from_node(node.left), _from_node(node.right)
        return None if left is None or right is None else left + right
    name = node.value if isinstance(node, ast.Subscript) else node
    name = name.attr if isinstance(name, ast.Attribute) else getattr(name, "id", None)
    if not isinstance(node, ast.Subscript):
        return [_NAMES[name]] if name in _NAMES else None
    inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    if name == "Literal":
        return [e.value for e in inner] if all(isinstance(e, ast.Constant) for e in inner) else None
    if name in ("Optional", "Union"):
        members = [_from_node(e) for e in inner] + ([[type(None)]] if name == "Optional" else [])
        return None if None in members else [a for m in members for a in m]
    return [_NAMES[name]] if name in _NAMES and _NAMES[name] in (dict, list) else None


def _documented(optimizer: str, where: str) -> dict[str, str]:
    """Parameter -> its type as written in the `Args:` section of the function's own docstring (an
    inherited one may describe another signature), and of the optimizer its **kwargs go to."""
    cls = optimizer_class(optimizer)
    functions = [cls.compile] if where == "compile_args" else [cls.__init__]
    if where == "args" and optimizer in FORWARDS_TO:
        functions.insert(0, optimizer_class(FORWARDS_TO[optimizer]).__init__)
    found: dict[str, str] = {}
    for fn in functions:
        inside = False
        for line in inspect.cleandoc(fn.__doc__ or "").splitlines():
            if line.strip() in ("Args:", "Arguments:"):
                inside = True
            elif inside and line and not line[0].isspace():
                break  # the next section: Returns, Raises
            elif inside and (match := _DOC_ARG.match(line)):
                found[match[1]] = match[2]
    return found


@cache
def _shared_types() -> dict[str, list]:
    """Parameter name -> the types every prompt optimizer that declares one (annotation or docstring)
    gives it, where they all agree."""
    seen: dict[str, set[frozenset]] = {}
    first: dict[str, list] = {}
    for optimizer in PROMPT_OPTIMIZERS:
        for where in WHERE:
            docs = _documented(optimizer, where)
            for name, param in accepted_parameters(optimizer, where).items():
                if (allowed := _declared(param, docs.get(name))) is not None:
                    seen.setdefault(name, set()).add(frozenset(allowed))
                    first.setdefault(name, allowed)
    return {name: first[name] for name, kinds in seen.items() if len(kinds) == 1}
