"""Soft prompts: N trainable embeddings put before a module's prompt (PEFT prompt tuning), as the `s`
step trains them together with a LoRA adapter and the engine serves them.

    soft = init_soft_prompt(model, tokenizer, n=8, text="Classify the sentiment ...", seed=0)  # [8, hidden]
    ids = virtual_ids(8) + prompt_ids                                     # the virtual tokens come first
    model(**model_inputs(model, torch.tensor([ids]), soft))               # inputs_embeds
    save_soft_prompt(soft, Path("runs/x/02-s/adapters/classify/prompt_tuning"), checkpoint, model.config)

    >>> virtual_ids(3)  # a virtual token is a negative id: -1 stands for the soft prompt's first row
    [-1, -2, -3]

A virtual token is a negative id (-1 is the soft prompt's first row): the rows, micro-batches, prefix
caches and position ids of the trainer and the engine then treat the soft prompt as N more prompt
tokens (every prompt of the module starts with the same N, so they are always part of the shared
prefix), and only the embedding lookup (`model_inputs`) knows better. Positions run 0..N-1 over the
virtual tokens and on from N over the prompt, as PEFT's prompt tuning places them.

On disk a soft prompt is a standard PEFT prompt-tuning folder (adapter_config.json with
peft_type PROMPT_TUNING, adapter_model.safetensors with `prompt_embeddings`), kept in the
`prompt_tuning/` subfolder of the module's LoRA adapter folder. Plain PEFT serves both: merge the
LoRA adapter into the base (`merge_and_unload`), then `PeftModel.from_pretrained(merged,
"<adapter>/prompt_tuning")` (tested against the engine).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import InputError
from .adapter import ADAPTER_FILES, SOFT_PROMPT_SUBFOLDER

CONFIG_FILE, WEIGHTS_FILE = ADAPTER_FILES  # a PEFT prompt-tuning folder is a PEFT adapter folder


def virtual_ids(n: int) -> list[int]:
    """The token ids that stand for the n rows of a soft prompt: -1 .. -n."""
    return list(range(-1, -n - 1, -1))


def model_inputs(model, ids, soft) -> dict:
    """The forward keyword for token ids that may hold virtual tokens: {"input_ids": ids} without a soft
    prompt, else {"inputs_embeds": ...} with the soft prompt's rows where the ids are negative (the
    gradient reaches `soft` through them)."""
    if soft is None:
        return {"input_ids": ids}
    import torch

    virtual = ids < 0
    embeds = model.get_input_embeddings()(ids.clamp(min=0))
    rows = soft.to(embeds.dtype)[(-ids - 1).clamp(min=0, max=soft.shape[0] - 1)]
    return {"inputs_embeds": torch.where(virtual[..., None], rows, embeds)}


def init_soft_prompt(model, tokenizer, n: int, text: str | None, seed: int):
    """An fp32 [n, hidden] soft prompt: the embeddings of `text`'s tokens, repeated or cut to n (PEFT's
    TEXT init), or, without text, of n vocabulary tokens drawn with `seed` (at the scale of real
    embeddings, unlike a normal(0, 1) draw)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if not ids:
        ids = random.Random(seed).sample(range(model.get_input_embeddings().num_embeddings), n)
    ids = (ids * (n // len(ids) + 1))[:n]
    with torch.no_grad():
        weight = model.get_input_embeddings()(torch.tensor(ids, device=model.device))
    return weight.detach().float().clone()


def save_soft_prompt(soft, folder: Path, checkpoint: Path, config) -> None:
    """Write `soft` [n, hidden] as a PEFT prompt-tuning folder for the model of `config` (its
    transformers config); `folder` is created, its files replaced."""
    from peft import PromptTuningConfig
    from safetensors.torch import save_file

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=int(soft.shape[0]),
        token_dim=int(soft.shape[1]),
        num_transformer_submodules=1,
        num_attention_heads=text.num_attention_heads,
        num_layers=text.num_hidden_layers,
        base_model_name_or_path=str(checkpoint),
    ).save_pretrained(str(folder))
    save_file({"prompt_embeddings": soft.detach().float().cpu().contiguous()}, str(folder / WEIGHTS_FILE))


def load_soft_prompt(adapter_dir: Path):
    """The soft prompt [n, hidden] (fp32, CPU) saved with a LoRA adapter folder, or None if it has none."""
    folder = Path(adapter_dir) / SOFT_PROMPT_SUBFOLDER
    if not folder.is_dir():
        return None
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        soft = load_file(str(folder / WEIGHTS_FILE))["prompt_embeddings"]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{folder}: not a PEFT prompt-tuning folder ({err}); the run directory is damaged") from None
    if config.get("peft_type") != "PROMPT_TUNING" or soft.dim() != 2:
        raise InputError(f"{folder}: not a PEFT prompt-tuning folder (peft_type {config.get('peft_type')!r})")
    return soft.float()
