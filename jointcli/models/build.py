"""The language models of a recipe, as dspy.LM objects.

    lm = build_lm("smollm2", recipe.models["smollm2"])          # local: model id "local/smollm2"
    tuned = lm.copy(model=adapter_model_id(lm.model, "classify-03"))   # "local/smollm2@classify-03"

Local models run in this process (inference/engine.py, one shared engine per checkpoint, dtype and
device, serving with the model's `limits`) and fine-tune through LocalProvider; LiteLLM models run
behind an API (models/remote.py).
"""

from __future__ import annotations

from ..recipe import LiteLLMModel, LocalModel
from .local import engine_lm
from .provider import LocalProvider
from .remote import build_litellm_lm


def build_lm(name: str, spec, **lm_kwargs):
    """A dspy.LM for the recipe's model `name` (LocalModel or LiteLLMModel). Extra keywords go to
    dspy.LM (cache=..., provider=... for fine-tuning)."""
    if isinstance(spec, LiteLLMModel):
        return build_litellm_lm(spec, **lm_kwargs)
    if not isinstance(spec, LocalModel):
        raise TypeError(f"model {name!r}: expected a LocalModel or LiteLLMModel, got {type(spec).__name__}")
    from ..inference.engine import get_engine  # torch and transformers: only once a local model is built

    engine = get_engine(spec.path, spec.dtype, spec.device, spec.limits)
    # stock dspy.BootstrapFinetune / BetterTogether fine-tune through the provider
    lm_kwargs.setdefault("provider", LocalProvider(engine))
    return engine_lm(name, spec, engine, **lm_kwargs)
