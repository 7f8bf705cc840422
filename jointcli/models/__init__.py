"""DSPy's face of jointopt: the dspy.LM objects a recipe's modules run on, and the fine-tuning provider.

    from jointcli.models import build_lm
    lm = build_lm("smollm2", recipe.models["smollm2"])          # local: model id "local/smollm2"

    from jointcli.models.provider import local_lm               # from your own DSPy code
    lm = local_lm(max_tokens=32)

build.py builds an LM from a recipe's model; pool.py keeps one per (model, adapter); provider.py is
DSPy's fine-tuning interface on the local engine; remote.py is models behind an API (LiteLLM).
"""

from .build import build_lm

__all__ = ["build_lm"]
