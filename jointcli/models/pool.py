"""One dspy.LM per (model name, adapter): built once, shared by every module that uses it.

An adapter is registered on its base model's engine under `<model>-<digest>` (weights/adapter.py's
adapter_name), a name made from its content, so DSPy's LM cache (keyed by the model id) can never
serve a stale answer from different weights that happen to sit at the same path.
"""

from __future__ import annotations

import threading
from pathlib import Path

import dspy

from ..errors import InputError
from ..inference.model_id import adapter_model_id
from ..recipe import LocalModel, Recipe
from ..weights.adapter import adapter_name
from .build import build_lm


class ModelPool:
    def __init__(self, recipe: Recipe):
        check_shared_engines(recipe.models)
        self.recipe = recipe
        self._lms: dict[tuple[str, str | None], dspy.LM] = {}
        self._lock = threading.RLock()  # _build asks for the base LM of an adapter

    def get(self, name: str, adapter: Path | None = None) -> dspy.LM:
        # keyed by the adapter's content, not its path: a folder trained again holds other weights
        key = (name, adapter_name(name, adapter) if adapter else None)
        with self._lock:
            if key not in self._lms:
                self._lms[key] = self._build(name, adapter, key[1])
            return self._lms[key]

    def _build(self, name: str, adapter: Path | None, tag: str | None) -> dspy.LM:
        spec = self.recipe.models.get(name)
        if spec is None:
            raise InputError(f"models.{name}: no such model in the recipe")
        base = self.get(name) if adapter else build_lm(name, spec)
        if adapter is None:
            return base
        if not isinstance(spec, LocalModel):
            raise InputError(f"models.{name}: adapters need a local model")
        engine_of(base).add_adapter(tag, adapter)
        return base.copy(model=adapter_model_id(base.model, tag))


def engine_of(lm: dspy.LM):
    engine = lm.engine
    if not hasattr(engine, "add_adapter"):
        raise InputError(f"{lm.model}: not a local model; cannot attach an adapter")
    return engine


def check_shared_engines(models: dict) -> None:
    """Local models with the same path, dtype and device run on one engine, and so with one set of
    limits (inference/engine.py's get_engine): InputError when two of them ask for different ones,
    rather than the last one built silently deciding for both."""
    first: dict[tuple[str, str, str], tuple[str, LocalModel]] = {}
    for name, spec in models.items():
        if not isinstance(spec, LocalModel):
            continue
        other, seen = first.setdefault((spec.path, spec.dtype, spec.device), (name, spec))
        if seen.limits != spec.limits:
            raise InputError(
                f"models.{other} and models.{name} run on one engine (same path, dtype and device), "
                "so their `limits` must be the same"
            )
