"""The rules of local model ids, written once.

A recipe's local model `<name>` is served under the id "local/<name>"; that id names the base
weights and may be followed by '@' and the name of a LoRA adapter registered on their engine:
"local/smollm2" runs the base weights, "local/smollm2@classify-03" the adapter "classify-03" on
them. So '@' may appear in neither a model name nor an adapter name, and an id splits at its first
'@'. Adapter names have no '.' either (PEFT keeps adapters in ModuleDicts) and no spaces.

>>> local_model_id("smollm2")
'local/smollm2'
>>> adapter_model_id("local/smollm2", "classify-03")
'local/smollm2@classify-03'
>>> split_model_id("local/smollm2@classify-03")
('local/smollm2', 'classify-03')
>>> model_name("local/smollm2@classify-03")
'smollm2'
"""

from __future__ import annotations

import re

from ..errors import InputError

PREFIX = "local/"
SEPARATOR = "@"
_ADAPTER_NAME = re.compile(r"^[^.@\s]+$")


def local_model_id(name: str) -> str:
    """The id of the recipe's local model `name` (checked: see check_model_name).

    >>> local_model_id("a@b")
    Traceback (most recent call last):
    ...
    jointcli.errors.InputError: model name 'a@b': '@' is reserved in local model ids (it selects an adapter)
    """
    check_model_name(name)
    return f"{PREFIX}{name}"


def is_local_model_id(model_id: str) -> bool:
    """Whether `model_id` names a local model (served by the in-process engine).

    >>> is_local_model_id("local/smollm2@ft-3f2a9c01d4e7"), is_local_model_id("openai/gpt-4o-mini")
    (True, False)
    """
    return model_id.startswith(PREFIX)


def model_name(model_id: str) -> str:
    """The recipe's model name in a local model id, adapter left out; other ids stay whole.

    >>> model_name("local/smollm2"), model_name("openai/gpt-4o-mini")
    ('smollm2', 'openai/gpt-4o-mini')
    """
    return split_model_id(model_id)[0].removeprefix(PREFIX)


def adapter_model_id(model_id: str, adapter: str) -> str:
    """The model id that selects a LoRA adapter of the engine behind `model_id`.

    >>> adapter_model_id("local/smollm2@old", "classify-03")
    'local/smollm2@classify-03'
    """
    return f"{split_model_id(model_id)[0]}{SEPARATOR}{adapter}"


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """(base id, adapter name); an id without '@' -> (id, None), the base weights. An id that ends
    in '@' gives the adapter name '' (callers decide if that is an error).

    >>> split_model_id("local/smollm2"), split_model_id("local/smollm2@")
    (('local/smollm2', None), ('local/smollm2', ''))
    """
    base, at, adapter = model_id.partition(SEPARATOR)
    return base, (adapter if at else None)


def check_model_name(name: str) -> None:
    """A recipe's local model name becomes the id 'local/<name>': non-empty and without '@'."""
    if SEPARATOR in name or not name:
        raise InputError(f"model name {name!r}: '@' is reserved in local model ids (it selects an adapter)")


def check_adapter_name(name: str) -> None:
    """An adapter name goes after the '@' of a model id and into PEFT's ModuleDicts.

    >>> check_adapter_name("ft-3f2a9c01d4e7")
    >>> check_adapter_name("v1.2")
    Traceback (most recent call last):
    ...
    jointcli.errors.InputError: adapter name 'v1.2': must be non-empty, without '.', '@' or spaces
    """
    if not _ADAPTER_NAME.match(name):
        raise InputError(f"adapter name {name!r}: must be non-empty, without '.', '@' or spaces")
