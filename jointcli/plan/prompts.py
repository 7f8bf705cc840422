"""The tokens of each predictor's calls: its prompt as its adapter formats it, with the demos the
program holds at that step, counted by its model's tokenizer (characters / 4 without one)."""

from __future__ import annotations

from pathlib import Path

import dspy

from ..program import module_adapter, predictors_of
from ..recipe import Recipe
from ..weights.chat import chat_ids
from ..weights.checkpoint import load_tokenizer

SAMPLE = 20  # examples whose prompts are tokenized; a split's tokens are their mean x its size
FILLER_TOKENS = 32  # tokens assumed for a field no example holds (an earlier module's output, reasoning)


class Prompts:
    """Tokens of each predictor's calls, formatted by its adapter (demos: the first training examples),
    counted by its model's tokenizer; fields no example holds are FILLER_TOKENS words."""

    def __init__(self, recipe: Recipe, program, names: list[str], modules: dict[str, dict], train: list):
        self.recipe, self.train = recipe, train
        self.predictors = [(m, p) for m in names for p in predictors_of(program, m)]
        self.tokenizers = {m: _tokenizer(info.get("checkpoint")) for m, info in modules.items()}
        self.max_tokens = {m: recipe.models[info["model"]].max_tokens for m, info in modules.items()}
        self.approximate = None in self.tokenizers.values()

    def _fill(self, example, names) -> dict:
        """The example's value of each field in `names`; FILLER_TOKENS words where it has none."""
        return {n: example.get(n, " ".join(["good"] * FILLER_TOKENS)) for n in names}

    def demos(self, predictor, k: int) -> list:
        """`k` training examples, spread over the split, as a predictor's demos."""
        fields = list(predictor.signature.input_fields) + list(predictor.signature.output_fields)
        spread = [self.train[i * len(self.train) // k] for i in range(min(k, len(self.train)))]  # as a random draw
        return [dspy.Example(**self._fill(e, fields)) for e in spread]

    def per_example(self, examples: list, demos: dict[str, int], only: list[str] | None = None) -> tuple[float, int]:
        """(prompt tokens, at most completion tokens) of one example through every predictor (of `only`)."""
        sample, tokens_in, tokens_out = examples[:SAMPLE], 0.0, 0
        for module, p in (x for x in self.predictors if only is None or x[0] in only):
            shots = self.demos(p, demos.get(module, 0))
            counts = [
                self._count(
                    module, module_adapter(p).format(p.signature, shots, self._fill(e, p.signature.input_fields))
                )
                for e in sample
            ]
            tokens_in += sum(counts) / max(1, len(counts))
            tokens_out += self.max_tokens[module]
        return tokens_in, tokens_out

    def rows(self, module: str, demos: int, count: int) -> list[dict]:
        """`count` fine-tune rows of `module` as a bootstrap writes them: its prompt, the gold answer."""
        rows = []
        for _, p in (x for x in self.predictors if x[0] == module):
            for e in (self.train[i % len(self.train)] for i in range(count)):
                data = module_adapter(p).format_finetune_data(
                    signature=p.signature,
                    demos=self.demos(p, demos),
                    inputs=self._fill(e, p.signature.input_fields),
                    outputs=self._fill(e, p.signature.output_fields),
                )
                rows.append({"messages": data["messages"]})
        return rows[:count]

    def _count(self, module: str, messages: list[dict]) -> int:
        tokenizer = self.tokenizers[module]
        if tokenizer is None:
            return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)
        return len(chat_ids(tokenizer, messages, add_generation_prompt=True))  # as the engine applies it


def _tokenizer(checkpoint: str | None):
    """The checkpoint's tokenizer, or None (a LiteLLM model; a folder with a config and no tokenizer)."""
    if checkpoint is None or not any(
        (Path(checkpoint) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    return load_tokenizer(Path(checkpoint))
