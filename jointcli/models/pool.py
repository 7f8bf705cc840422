"""One dspy.LM per (model name, adapter): built once, shared by every module that uses it.

An adapter is registered on its base model's engine under a name derived from its weights'
content, so DSPy's LM cache (keyed by the model id) can never serve a stale answer from
different weights that happen to sit at the same path.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import dspy

from ..errors import InputError
from ..recipe import LocalModel, Recipe
from .model_id import adapter_model_id
from .soft_prompt import soft_prompt_files


def adapter_digest(adapter_dir: Path) -> str:
    weights = sorted(Path(adapter_dir).glob("adapter_model.*"))
    if not weights:
        raise InputError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_model.*); the run directory is damaged")
    h = hashlib.sha256()
    for path in weights + [Path(adapter_dir) / "adapter_config.json"] + soft_prompt_files(adapter_dir):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


class ModelPool:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self._lms: dict[tuple[str, str | None], dspy.LM] = {}
        self._lock = threading.RLock()  # _build asks for the base LM of an adapter

    def get(self, name: str, adapter: Path | None = None) -> dspy.LM:
        # keyed by the adapter's content, not its path: a folder trained again holds other weights
        key = (name, adapter_digest(adapter) if adapter else None)
        with self._lock:
            if key not in self._lms:
                self._lms[key] = self._build(name, adapter, key[1])
            return self._lms[key]

    def _build(self, name: str, adapter: Path | None, digest: str | None) -> dspy.LM:
        from . import build_lm

        spec = self.recipe.models.get(name)
        if spec is None:
            raise InputError(f"models.{name}: no such model in the recipe")
        base = self.get(name) if adapter else build_lm(name, spec)
        if adapter is None:
            return base
        if not isinstance(spec, LocalModel):
            raise InputError(f"models.{name}: adapters need a local model")
        tag = f"{name}-{digest}"
        engine_of(base).add_adapter(tag, adapter)
        return base.copy(model=adapter_model_id(base.model, tag))


def engine_of(lm: dspy.LM):
    engine = lm.engine
    if not hasattr(engine, "add_adapter"):
        raise InputError(f"{lm.model}: not a local model; cannot attach an adapter")
    return engine
