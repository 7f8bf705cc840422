"""Models behind an API, through DSPy's LiteLLM/lm15 routing: `type: litellm` in a recipe.

The API key is read from the environment variable the recipe names (`api_key_env`) when the LM is
built, and handed only to dspy.LM, whose saved state leaves it out; it is never written anywhere.
"""

from __future__ import annotations

import os

from ..errors import InputError
from ..recipe import LiteLLMModel


def build_litellm_lm(spec: LiteLLMModel, **lm_kwargs):
    """A dspy.LM for a LiteLLM model string (openai/gpt-4o-mini, ollama_chat/llama3, ...)."""
    import dspy
    from dspy.utils.exceptions import LMConfigurationError

    client = {}
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise InputError(f"model {spec.model}: the environment variable {spec.api_key_env} "
                             "is not set; it must hold the API key")
        client["api_key"] = key
    if spec.api_base:
        client["api_base"] = spec.api_base
    try:
        return dspy.LM(spec.model, max_tokens=spec.max_tokens, temperature=spec.temperature,
                       **client, **lm_kwargs)
    except (ValueError, LMConfigurationError) as exc:
        raise InputError(f"model {spec.model}: {exc}") from None
