"""What the models weigh and what training them needs, from each checkpoint's config.json alone:
the model built on PyTorch's `meta` device has every shape and no weights, so no weights are read.
Memory: what this process could still use, an estimate of what LoRA and full fine-tuning need, and of
the peak of the whole process that serves and trains one local model."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from ..program import model_of
from ..recipe import LocalModel, Recipe, WeightOptimizer
from ..weights.adapter import lora_config
from ..weights.checkpoint import resolve_checkpoint

GB = 2**30
# Activation bytes per token per layer, Korthikanti et al. 2022 ("Reducing activation recomputation"):
# 34 h + 5 a s in 16-bit (h hidden size, a heads, s row length); x2 in fp32. An estimate.
ACT_HIDDEN, ACT_ATTENTION = 34, 5
# What a CPU process that runs a schedule holds besides the weights and the training: Python, torch,
# transformers, DSPy, the data, the engine's working memory. From bench/joint_run.py's breakdown on
# sst2 (libraries 0.26 GB; the engine's RSS beyond its weights and what its calls keep, ~0.25 GB);
# with it the sst2 estimate is within 10% of `make run`'s measured peaks (docs/performance.md, Memory).
PROCESS_BASE = int(0.5 * GB)


def _meta_model(checkpoint: Path):
    """The checkpoint's model built from its config.json on the meta device: shapes, no weights."""
    import torch  # torch, transformers, peft: loaded when a plan is built, not when the module is imported
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:  # an encoder, a model_type this transformers does not know
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"model {checkpoint}: transformers cannot build a causal LM from its config.json ({reason})"
        ) from None


def model_facts(checkpoint: Path) -> dict:
    """Architecture, parameter count and the sizes the memory estimate needs, read from config.json."""
    model = _meta_model(checkpoint)
    config = model.config.get_text_config()
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
    }


def lora_parameters(checkpoint: Path, lora) -> int:
    """The parameters PEFT trains for the recipe's LoRA settings (weights.adapter.lora_config, as the trainer)."""
    import torch  # see _meta_model
    from peft import get_peft_model

    config = lora_config(lora)
    with torch.device("meta"):
        model = get_peft_model(_meta_model(checkpoint), config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def module_models(recipe: Recipe, names: list[str]) -> dict[str, dict]:
    """Per module: its model's key, type and path; for a local model its checkpoint folder and facts."""
    facts: dict[str, dict] = {}
    for key, spec in recipe.models.items():
        if isinstance(spec, LocalModel):
            checkpoint = resolve_checkpoint(spec.path)
            facts[key] = {"type": "local", "path": spec.path, "checkpoint": str(checkpoint), **model_facts(checkpoint)}
        else:
            facts[key] = {"type": "remote", "path": spec.model, "architecture": None, "parameters": None}
    return {m: {"model": model_of(recipe, m), **facts[model_of(recipe, m)]} for m in names}


def available_memory(device: str) -> tuple[int, str]:
    """(bytes this process could still use, what was read): the GPU's free memory, or MemAvailable
    capped by the cgroup's limit."""
    if device == "cuda":
        import torch  # see _meta_model

        return torch.cuda.mem_get_info()[0], "cuda free"
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, KeyError, ValueError):
        pass
    return free, "MemAvailable"


def training_memory(
    facts: dict,
    trainable: int,
    rows_per_step: int,
    row_tokens: int,
    token_budget: int,
    dtype: str,
    engine_width: int | None = None,
) -> dict:
    """Bytes to train, LoRA against full fine-tuning: weights, gradients, AdamW's two moments (fp32),
    activations of one micro-batch (`token_budget` computed tokens, train.micro_batch_tokens; one row
    when longer). With `engine_width` (bytes a weight of the in-process engine, 2 or 4), also the peak
    of the whole process ("process", on CPU): PROCESS_BASE, the engine's weights and LoRA training,
    whose frozen weights are the engine's own when their widths match (weights/memory.py).

    >>> facts = {"parameters": 100, "hidden_size": 4, "layers": 2, "heads": 2}
    >>> m = training_memory(facts, 10, 8, 50, 100, "float32", engine_width=4)
    >>> m["micro_batch_tokens"], m["activations"] == 100 * 2 * (34 * 4 + 5 * 2 * 50) * 2
    (100, True)
    >>> m["lora"] - m["activations"], m["process"] - m["lora"] == PROCESS_BASE   # shared: 400 B once
    (560, True)
    >>> training_memory(facts, 10, 8, 50, 100, "float32", engine_width=2)["process"] - m["process"]
    200
    """
    width = 2 if dtype == "bfloat16" else 4
    tokens = min(rows_per_step * row_tokens, max(token_budget, row_tokens))
    per_token = ACT_HIDDEN * facts["hidden_size"] + ACT_ATTENTION * facts["heads"] * row_tokens
    activations = tokens * facts["layers"] * per_token * width // 2
    n = facts["parameters"]
    out = {
        "lora": n * width + trainable * 16 + activations,
        "full": n * 16 + activations,
        "activations": activations,
        "micro_batch_tokens": tokens,
    }
    if engine_width is not None:
        out["process"] = PROCESS_BASE + out["lora"] + (0 if engine_width == width else n * engine_width)
    return out


def trained_modules(recipe: Recipe, spec: WeightOptimizer, names: list[str]) -> list[str]:
    """The modules a weight step fine-tunes: those it names (or all) on local models."""
    chosen = names if spec.modules == "all" else spec.modules
    return [m for m in chosen if isinstance(recipe.models[model_of(recipe, m)], LocalModel)]
