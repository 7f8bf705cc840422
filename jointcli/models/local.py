"""A dspy.LM on the in-process engine of a local checkpoint (models.<name> with `type: local`).

    engine = get_engine("builtin:smollm2-135m-instruct", "auto", "auto")
    lm = engine_lm("smollm2", LocalModel(), engine)      # model id "local/smollm2"

The engine (inference/engine.py) is shared by every LM of one checkpoint, dtype and device; an LM
picks its adapter by its model id ("local/smollm2@classify-03", inference/model_id.py).
"""

from __future__ import annotations

import dspy

from ..inference.model_id import local_model_id
from ..recipe import LocalModel


def engine_lm(name: str, spec: LocalModel, engine, **lm_kwargs) -> dspy.LM:
    """dspy.LM("local/<name>") served by `engine`, with the recipe model's generation settings."""
    # metadata travels in every request, so it is part of DSPy's response-cache key: answers cached
    # for other weights (another checkpoint or dtype under the same model name) are never reused.
    return dspy.LM(
        local_model_id(name),
        engine=engine,
        async_engine=engine.async_engine,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        metadata={"jointopt_weights": engine.weights_id},
        **lm_kwargs,
    )
