"""DSPy's LM cache with the local engine: an unchanged program costs no generation the second
time, and new adapter weights, even in the same folder, never get the old weights' answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jointcli.models.pool import ModelPool
from jointcli.recipe import load_recipe
from jointcli.weights.checkpoint import resolve_checkpoint

from .conftest import RECIPES, cli, tiny

pytestmark = pytest.mark.model  # every test here runs the embedded model

TINY = tiny(train=4)


def test_reevaluating_an_unchanged_program_generates_nothing(runs):
    for name in ("first", "again"):
        assert cli("eval", RECIPES / "sst2.yaml", *TINY, "--name", name, "--runs-dir", runs) == 0
    first, again = (json.loads((runs / n / "00-baseline" / "eval.json").read_text()) for n in ("first", "again"))
    assert again["cached_calls"] == again["n"] == 4  # every call answered from the cache
    assert again["scores"] == first["scores"]
    # the cost of the program does not change with caching: cached responses keep their token counts
    assert (again["tokens_in"], again["tokens_out"]) == (first["tokens_in"], first["tokens_out"]) != (0, 0)


def _random_lora(folder: Path, seed: int) -> Path:
    """A LoRA with random (not zero) weights: it changes the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve_checkpoint("builtin:smollm2-135m-instruct"))
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(folder)
    return folder


def test_new_adapter_weights_in_the_same_folder_miss_the_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPES / "sst2.yaml", TINY)  # runtime.cache is on: DSPy's cache answers repeats
    from jointcli.context import configure_dspy

    configure_dspy(recipe)
    folder = tmp_path / "adapter"
    _random_lora(folder, seed=1)
    first = ModelPool(recipe).get("small", folder)
    answer_first = first("Name a colour.")[0]
    assert first("Name a colour.")[0] == answer_first

    _random_lora(folder, seed=2)  # trained again: same path, other weights
    second = ModelPool(recipe).get("small", folder)
    assert second.model != first.model  # the model id (part of the cache key) names the weights
    assert second("Name a colour.")[0] != answer_first
    # and the same weights under another path share the first's id, and its cache entries
    copy = tmp_path / "copy"
    _random_lora(copy, seed=2)
    assert ModelPool(recipe).get("small", copy).model == second.model
