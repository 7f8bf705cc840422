"""The `@adapter` rule of local model ids, written once.

A local model id names base weights, optionally followed by '@' and the name of a LoRA adapter
registered on their engine: "local/smollm2" runs the base weights, "local/smollm2@classify-03" the
adapter "classify-03" on them. So '@' may appear in neither a model name nor an adapter name, and
an id splits at its first '@'. Adapter names have no '.' either (PEFT keeps adapters in ModuleDicts)
and no spaces.
"""

from __future__ import annotations

import re

from ..errors import InputError

SEPARATOR = "@"
_ADAPTER_NAME = re.compile(r"^[^.@\s]+$")


def adapter_model_id(model_id: str, adapter: str) -> str:
    """The model id that selects a LoRA adapter of the engine behind `model_id`:
    'local/smollm2' (or 'local/smollm2@old') + 'classify-03' -> 'local/smollm2@classify-03'."""
    return f"{split_model_id(model_id)[0]}{SEPARATOR}{adapter}"


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """'local/smollm2@classify-03' -> ('local/smollm2', 'classify-03'); an id without '@' -> (id, None),
    the base weights. An id that ends in '@' gives the adapter name '' (callers decide if that is an error)."""
    base, at, adapter = model_id.partition(SEPARATOR)
    return base, (adapter if at else None)


def check_model_name(name: str) -> None:
    """A recipe's local model name becomes the id 'local/<name>': non-empty and without '@'."""
    if SEPARATOR in name or not name:
        raise InputError(f"model name {name!r}: '@' is reserved in local model ids (it selects an adapter)")


def check_adapter_name(name: str) -> None:
    """An adapter name goes after the '@' of a model id and into PEFT's ModuleDicts."""
    if not _ADAPTER_NAME.match(name):
        raise InputError(f"adapter name {name!r}: must be non-empty, without '.', '@' or spaces")
