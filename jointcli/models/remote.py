"""Models behind an API, through DSPy's LiteLLM/lm15 routing: `type: litellm` in a recipe.

The API key is read from the environment variable the recipe names (`api_key_env`) when the LM is
built, and handed only to dspy.LM, whose saved state leaves it out; it is never written anywhere.

A call that fails because of the server (unreachable, too slow, a refused key, an HTTP 5xx or 429
once DSPy's retries are spent) is not one bad example: `server_failure` turns it into the StepError
that ends the step (steps/parallel.py, under evaluations and bootstraps), one line naming the model
and the cause. So does a local engine that ran out of memory.
"""

from __future__ import annotations

import os

from ..errors import InputError, StepError
from ..recipe import LiteLLMModel


def build_litellm_lm(spec: LiteLLMModel, **lm_kwargs):
    """A dspy.LM for a LiteLLM model string (openai/gpt-4o-mini, ollama_chat/llama3, ...)."""
    import dspy
    from dspy.utils.exceptions import LMConfigurationError

    client = {}
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise InputError(
                f"model {spec.model}: the environment variable {spec.api_key_env} is not set; it must hold the API key"
            )
        client["api_key"] = key
    if spec.api_base:
        client["api_base"] = spec.api_base
    if spec.timeout is not None:
        client["timeout"] = spec.timeout
    try:
        return dspy.LM(
            spec.model,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            num_retries=spec.num_retries,
            **client,
            **lm_kwargs,
        )
    except (ValueError, LMConfigurationError) as exc:
        raise InputError(f"model {spec.model}: {exc}") from None


def server_failure(err: BaseException) -> StepError | None:
    """The StepError for a call that failed because of the server rather than of its example (DSPy's
    retries already spent): one line naming the model and the cause, never the server's words about
    a key. The local engine's own StepError (out of memory: inference/generation.py), which DSPy
    wraps, is returned as it is. None for anything else (an answer that does not parse, a request
    refused as malformed, such as a prompt too long for the model): those are one example's errors."""
    from dspy.utils import exceptions as lm

    if isinstance(err, StepError) or isinstance(err.__cause__, StepError):
        return err if isinstance(err, StepError) else err.__cause__

    causes = (
        (lm.LMTransportError, "the server did not answer"),
        (lm.LMTimeoutError, "the server timed out"),
        (lm.LMAuthError, "the server refused the API key"),
        (lm.LMBillingError, "the account's quota is spent"),
        (lm.LMRateLimitError, "rate-limited by the server"),
        (lm.LMServerError, "the server failed"),
        (lm.LMUnsupportedModelError, "the server does not serve this model"),
        (lm.LMNotConfiguredError, "not configured"),
    )
    cause = next((text for kind, text in causes if isinstance(err, kind)), None)
    if cause is None:
        return None
    status = f"HTTP {err.status}" if err.status else ""
    # what a server says about a refused key may quote the key: only its status is kept
    said = "" if isinstance(err, (lm.LMAuthError, lm.LMBillingError)) else _first_line(err.message)
    if isinstance(err, lm.LMTransportError):  # "failed to connect to HOST:PORT: ...", "read timed out ...;
        said = said.split("; ")[0]  # this is lm15's read timeout": the rest names lm15's settings
    detail = "; ".join(part for part in (status, said) if part)
    return StepError(f"model {err.model}: {cause}" + (f" ({detail})" if detail else ""))


def _first_line(text: str) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0][:200] if lines else ""
