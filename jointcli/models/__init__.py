"""The language models of a recipe, as dspy.LM objects.

    lm = build_lm("smollm2", recipe.models["smollm2"])          # local: model id "local/smollm2"
    tuned = lm.copy(model=adapter_model_id(lm.model, "classify-03"))   # "local/smollm2@classify-03"

Local models run in this process (models/engine.py, one shared engine per checkpoint, dtype and
device); LiteLLM models run behind an API (models/remote.py). The '@adapter' rule of local model ids
is models/model_id.py's. torch, transformers and peft are imported only when a local model is built.
"""

from __future__ import annotations

from .embedded import jointopt_home, resolve_checkpoint
from .model_id import adapter_model_id, check_model_name

__all__ = ["build_lm", "adapter_model_id", "jointopt_home", "resolve_checkpoint"]


def build_lm(name: str, spec, **lm_kwargs):
    """A dspy.LM for the recipe's model `name` (LocalModel or LiteLLMModel). Extra keywords go to
    dspy.LM (cache=..., provider=... for fine-tuning)."""
    from ..recipe import LiteLLMModel, LocalModel

    if isinstance(spec, LiteLLMModel):
        from .remote import build_litellm_lm

        return build_litellm_lm(spec, **lm_kwargs)
    if not isinstance(spec, LocalModel):
        raise TypeError(f"model {name!r}: expected a LocalModel or LiteLLMModel, got {type(spec).__name__}")
    check_model_name(name)
    import dspy

    from .engine import get_engine

    engine = get_engine(spec.path, spec.dtype, spec.device)
    if "provider" not in lm_kwargs:  # stock dspy.BootstrapFinetune / BetterTogether fine-tune through it
        from .provider import LocalProvider

        lm_kwargs["provider"] = LocalProvider(engine)
    # metadata travels in every request, so it is part of DSPy's response-cache key: answers cached
    # for other weights (another checkpoint or dtype under the same model name) are never reused.
    return dspy.LM(f"local/{name}", engine=engine, async_engine=engine.async_engine,
                   max_tokens=spec.max_tokens, temperature=spec.temperature,
                   metadata={"jointopt_weights": engine.weights_id}, **lm_kwargs)

