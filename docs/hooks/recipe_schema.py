"""MkDocs hook: the recipe reference (docs/recipes/schema.md) is written at build time from the recipe's
JSON Schema, the same one `jointopt schema` prints, so the page can never disagree with the code.

The page's source holds the marker below; the build fails if it is missing, rather than publish a
reference without its tables. mkdocs.yml names this file under `hooks:`.
"""

from __future__ import annotations

import json

MARKER = "<!-- recipe-schema -->"
PAGE = "recipes/schema.md"
ROOT = "Recipe"


def recipe_schema() -> dict:
    """The recipe's JSON Schema, made by the call `jointopt schema` makes."""
    from jointcli.recipe import Recipe

    return Recipe.model_json_schema(by_alias=True)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its marker {MARKER}: the generated reference would be missing")
    return markdown.replace(MARKER, render(recipe_schema()))


def render(schema: dict) -> str:
    """One section per object of the schema (the top level first, then in the order the recipe reaches
    them), each a table: key, type, default, description."""
    definitions = schema.get("$defs", {})
    parts = []
    for name in section_order(schema):
        body = schema if name == ROOT else definitions[name]
        title = "The top level" if name == ROOT else name
        parts.append(f"### {title} {{ #{anchor(name)} }}\n")
        if body.get("description") and name != ROOT:
            parts.append(cell(body["description"]) + "\n")
        parts.append(table(body))
    return "\n".join(parts)


def section_order(schema: dict) -> list[str]:
    """The top level, then every definition in the order a depth-first walk of the properties meets it."""
    order, definitions = [ROOT], schema.get("$defs", {})

    def visit(node) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref:
                name = ref.rsplit("/", 1)[-1]
                if name not in order:
                    order.append(name)
                    visit(definitions[name].get("properties", {}))
            for key, value in node.items():
                if key not in ("$ref", "default"):
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(schema.get("properties", {}))
    return order + sorted(set(definitions) - set(order))


def table(body: dict) -> str:
    required = set(body.get("required", []))
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, prop in body.get("properties", {}).items():
        default = "required" if key in required else (code(prop["default"]) if "default" in prop else "")
        rows.append(f"| `{key}` | {type_of(prop)} | {default} | {cell(prop.get('description', ''))} |")
    return "\n".join(rows) + "\n"


def type_of(prop: dict) -> str:
    """A property's type in words: links to other sections, choices, lists, maps and bounds."""
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{anchor(name)})"
    for combined in ("anyOf", "oneOf"):
        if combined in prop:
            return " or ".join(type_of(option) for option in prop[combined])
    if "const" in prop:
        return code(prop["const"])
    if "enum" in prop:
        return " \\| ".join(code(value) for value in prop["enum"])
    kind = prop.get("type", "any")
    if kind == "array":
        return "list of " + type_of(prop.get("items", {}))
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return "map: name &rarr; " + type_of(prop["additionalProperties"])
    return kind + bounds(prop)


def bounds(prop: dict) -> str:
    signs = {"minimum": "&ge;", "exclusiveMinimum": "&gt;", "maximum": "&le;", "exclusiveMaximum": "&lt;"}
    found = [f"{sign} {prop[key]}" for key, sign in signs.items() if key in prop]
    if "pattern" in prop:
        found.append(f"matching {code(prop['pattern'])}")
    return (" " + ", ".join(found)) if found else ""


def code(value) -> str:
    """A value as a code span (a pipe in it stays: Python-Markdown's tables do not split code spans)."""
    return "`" + (value if isinstance(value, str) else json.dumps(value)) + "`"


def cell(text: str) -> str:
    """Prose for a table cell: one line; outside code spans, pipes escaped and `<` too (a bare
    `models.<name>` would otherwise be read as an HTML tag and vanish)."""
    pieces = " ".join(text.split()).split("`")  # the odd pieces are code spans
    return "`".join(piece if index % 2 else escaped(piece) for index, piece in enumerate(pieces))


def escaped(prose: str) -> str:
    return prose.replace("|", "\\|").replace("<", "&lt;")


def anchor(name: str) -> str:
    return "top-level" if name == ROOT else name.lower()
