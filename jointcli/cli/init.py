"""The command that writes a recipe for a data file: init."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import console
from .app import app


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


@app.command()
def init(
    data: Annotated[str, typer.Argument(help="a .jsonl or .csv file, or builtin:NAME", show_default=False)],
    inputs: Annotated[str | None, typer.Option("--inputs", help="the fields the program reads, e.g. a,b")] = None,
    labels: Annotated[str | None, typer.Option("--labels", help="the field(s) the program answers")] = None,
    name: Annotated[str | None, typer.Option("--name", help="the recipe's name (default: the data's)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="the recipe file (default: NAME.yaml)")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite --out if it exists")] = False,
) -> None:
    """Write a commented recipe for your data that runs as written: fields, labels, split, metric, steps.

    jointopt init reviews.jsonl --inputs review --labels label
    jointopt init builtin:rte --out rte.yaml
    """
    from ..init_recipe import make_recipe, write_recipe  # the checks load DSPy: not for --help

    path = out or Path(f"{name or _default_name(data)}.yaml")
    made = make_recipe(data, _names(inputs), _names(labels), name, str(path))
    write_recipe(made, path, force)
    f, (train, dev, test) = made.fields, made.split
    answers = f"{', '.join(f'{v} {n}' for v, n in f.values.items())}" if f.values else f.kind
    console.print(
        f"[green]wrote[/] {path}: {', '.join(f.inputs)} -> {', '.join(f.labels)} ({answers}); "
        f"split {train} / {dev} / {test} of {made.rows} rows",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"next: jointopt joint {path}", highlight=False, soft_wrap=True)


def _default_name(data: str) -> str:
    from ..init_recipe import name_of

    return name_of(data)
