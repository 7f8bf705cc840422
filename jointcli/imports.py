"""Importing a user's `package.module:name` (a metric function, a program class), with the current
directory importable as under `python -m`, and every failure a one-line InputError.

    >>> import json
    >>> import_ref("json:dumps", "metric.name") is json.dumps  # as for `metric.name: my_metrics:accuracy`
    True
    >>> import_ref("nosuch:score", "metric.name")
    Traceback (most recent call last):
    jointcli.errors.InputError: metric.name: cannot import 'nosuch:score': ModuleNotFoundError: No module named 'nosuch'
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .errors import InputError


def import_ref(ref: str, where: str) -> Any:
    """The object `name` of module `package.module`; `where` names the recipe key in errors."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    module_name, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise InputError(f"{where}: cannot import {ref!r}: {type(err).__name__}: {err}") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise InputError(f"{where}: cannot import {ref!r}: the module raised {type(err).__name__}: {err}") from None
