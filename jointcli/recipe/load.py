"""Reading a recipe: YAML (duplicate keys refused), dotted `key=value` overrides applied before
validation (torchtune-style; values parsed as YAML scalars: `16` is an int, `true` a bool, `[a, b]` a
list), and every validation problem turned into one line that names the key.

    recipe = load_recipe("recipes/sst2.yaml", ["data.split.train=16"])
"""

from __future__ import annotations

import types
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import InputError
from .schema import Recipe
from .sections import did_you_mean


def _members(tp: Any) -> list:
    """The alternatives of a type: its members for a Union (None aside), else the type itself."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        return [m for arg in get_args(tp) if arg is not type(None) for m in _members(arg)]
    return [tp]


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _below(tp: Any, key: str) -> Any:
    """The type one key below `tp`: a section's field, a list's item, a mapping's value; None if unknown."""
    if _is_section(tp):
        return next((f.annotation for name, f in tp.model_fields.items() if key in (name, f.alias)), None)
    if get_origin(tp) in (list, dict):
        return get_args(tp)[-1]
    return None


def _tag(tp: Any) -> str | None:
    """The `type` value that selects a section in a union (PromptOptimizer: 'prompt')."""
    field = tp.model_fields.get("type") if _is_section(tp) else None
    return get_args(field.annotation)[0] if field and get_origin(field.annotation) is Literal else None


def _recipe_keys(loc: tuple) -> tuple[list[str], list[str]]:
    """(the recipe key path of a pydantic error location, without the union alternatives pydantic
    names in it, like 'prompt' or 'list[str]'; the keys the section holding its last key may have)."""
    tp: Any = Recipe
    path, keys = [], []
    for part in (str(p) for p in loc if not str(p).startswith(("function-", "tagged-union"))):
        options = _members(tp)
        if len(options) > 1:  # the part names the alternative pydantic tried, not a key
            tp = next((m for m in options if _tag(m) == part), None)
            continue
        keys = [f.alias or name for name, f in options[0].model_fields.items()] if _is_section(options[0]) else []
        path.append(part)
        tp = _below(options[0], part)
    return path, keys


def _problems(err: ValidationError) -> dict[str, list[str]]:
    """Recipe key path -> what is wrong there; a union's alternatives report at the same key."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        path, keys = _recipe_keys(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(path[-1], keys)
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # models.*.type, optimizers.*.type
            path.append("type")
            msg = _tag_message(e["ctx"]) if e["type"] == "union_tag_invalid" else "Field required"
        problems.setdefault(".".join(path), []).append(msg)
    return problems


def _tag_message(ctx: dict) -> str:
    tags = [t.strip(" '") for t in ctx["expected_tags"].split(",")]
    return f"{ctx['tag']!r} is not one of {ctx['expected_tags']}{did_you_mean(ctx['tag'], tags)}"


def _one_of(messages: list[str]) -> str:
    """'Input should be a valid list' + "Input should be 'all'" -> "Input should be a valid list or 'all'"."""
    lead = "Input should be "
    if len(messages) > 1 and all(m.startswith(lead) for m in messages):
        return lead + " or ".join(m.removeprefix(lead) for m in messages)
    return "; ".join(messages)


def _override_of(loc: str, overrides: dict[str, str]) -> str:
    """' (override a.b=1)' when an override set `loc`, a section above it or a key below it."""
    for key, text in overrides.items():
        if loc and (loc == key or loc.startswith(key + ".") or key.startswith(loc + ".")):
            return f" (override {text})"
    return ""


def _format_error(source: str, err: ValidationError, overrides: dict[str, str]) -> str:
    lines = [
        f"{loc}: {_one_of(msgs)}{_override_of(loc, overrides)}" if loc else _one_of(msgs)
        for loc, msgs in _problems(err).items()
    ]
    more = f" (and {len(lines) - 1} more: {'; '.join(lines[1:])})" if len(lines) > 1 else ""
    return f"{source}: {lines[0]}{more}"


# ---------------------------------------------------------------- loading
def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b.c=value` -> (['a','b','c'], parsed value)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise InputError(f"override {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # 'sentence: str -> label' is a string; a section or list needs {...} or [...]
        out.append((key.split("."), value))
    return out


def apply_override(tree: dict, path: list[str], value: Any, text: str) -> list[str]:
    """Set `path` in the raw YAML tree. Lists are indexed by number or by an item's `name`. Returns
    the path with list items as indexes (`program.modules.0.model`), as validation errors name it."""
    node: Any = tree
    resolved = []
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, text)
            resolved.append(str(idx))
            if last:
                node[idx] = value
            node = node[idx]
        elif isinstance(node, dict):
            resolved.append(part)
            if last:
                node[part] = value
            node = node.setdefault(part, {})
        else:
            raise InputError(f"override {text}: {'.'.join(path[:i])} is a value, not a section")
    return resolved


def _list_index(items: list, part: str, text: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    names = [str(item["name"]) for item in items if isinstance(item, dict) and "name" in item]
    if part in names:
        return names.index(part)
    if not items:
        raise InputError(f"override {text}: no list item {part!r}; the list is empty")
    by_name = f", or by name: {', '.join(names)}" if names else ""
    raise InputError(f"override {text}: no list item {part!r}; its items are 0 to {len(items) - 1}{by_name}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error (PyYAML
    would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports an unhashable key itself
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def validate_recipe(tree: Any, source: str = "recipe", overrides: dict[str, str] | None = None) -> Recipe:
    if not isinstance(tree, dict):
        raise InputError(f"{source}: the recipe must be a YAML mapping of keys to values")
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise InputError(_format_error(source, err, overrides or {})) from None


def _read_yaml(path: Path) -> Any:
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a recipe file")
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}:{where} malformed YAML: {getattr(err, 'problem', err)}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is an InputError of one line."""
    path = Path(path)
    tree = _read_yaml(path)
    if not isinstance(tree, dict):
        raise InputError(f"{path}: the recipe must be a YAML mapping of keys to values")
    texts = {}
    try:
        for keys, value in parse_overrides(overrides or []):
            text = f"{'.'.join(keys)}={value}"
            texts[".".join(apply_override(tree, keys, value, text))] = text
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return validate_recipe(tree, str(path), texts)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
