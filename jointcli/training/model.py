"""The model in training: the frozen base model with a trainable LoRA adapter (and an s step's soft
prompt), and AdamW over them (`TrainState`).

    model = load_for_training(checkpoint, Lora(r=2, alpha=4), "cpu", "float32", seed=0)
    state = start_optimizer(model, job, soft_prompt_param(model, data.tokenizer, job.soft, job.init_adapter, 0))

The frozen base weights are the in-process engine's own tensors where it holds them in the training
dtype (weights/memory.py): fp32 on a CPU without native bf16. On CPU, attention runs on the grouped
key/value heads as they are (`_grouped_attention`), rather than on a copy repeated for every query
head that autograd would keep for the backward pass.

Precision: on bf16 (dtype bfloat16) the frozen base weights are stored in bf16 and the forward pass
runs under autocast, while the LoRA weights and AdamW stay fp32; PEFT's cast of each LoRA input to
fp32 is turned off (under autocast it only kept an fp32 copy of every linear input alive).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StepError
from ..recipe import Lora
from ..weights.adapter import load_adapter, lora_config
from ..weights.checkpoint import load_causal_lm
from ..weights.memory import share_frozen
from ..weights.soft_prompt import init_soft_prompt, load_soft_prompt
from .job import SoftTraining, TrainJob


@dataclass
class TrainState:
    """The model in training and its optimizer; `step` optimizer steps are done."""

    model: Any
    optimizer: Any
    names: list[str]  # of the trainable parameters (LoRA, then the soft prompt), as checkpoints store them
    params: list
    soft: Any = None  # the soft prompt [virtual tokens, hidden] (a Parameter), with SoftTraining
    penalties: list = field(default_factory=list)  # (l2, params) of the groups with an L2 penalty
    step: int = 0
    tokens_before: int = 0  # tokens trained before a resume (from the checkpoint)
    resumed_from_step: int | None = None


def load_for_training(
    checkpoint: Path, lora: Lora, device: str, dtype: str, seed: int, init_adapter: Path | None = None
):
    """The base model (frozen; bf16 weights when training in bf16) with a trainable fp32 LoRA adapter:
    a new one as `lora` says, or `init_adapter`'s (its r, alpha and target modules; `lora` is ignored)."""
    import torch
    import transformers
    from peft import get_peft_model

    transformers.set_seed(seed)  # before the LoRA A matrices are initialized
    model = load_causal_lm(checkpoint, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    model.config.use_cache = False
    if device == "cuda":
        model.to("cuda")
    share_frozen(checkpoint, model)  # the engine's copy, when it holds the same dtype: one copy, not two
    if init_adapter is not None:
        model = load_adapter(model, init_adapter, trainable=True)
    else:
        config = lora_config(lora)
        model = get_peft_model(model, config)
    for p in model.parameters():  # the adapter trains in fp32 whatever the base weights are
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if dtype == "bfloat16":
        _no_fp32_input_casts(model)
    if device == "cpu":  # measured there (docs/performance.md, Memory); GPUs keep transformers' attention
        _grouped_attention(model)
    model.train()
    return model


GQA_SDPA = "jointopt_gqa_sdpa"  # the attention the trainer registers with transformers


def _grouped_attention(model) -> None:
    """With grouped key/value heads (SmolLM2: 3 for 9 query heads) and transformers' SDPA attention,
    train with SDPA's own grouped-query attention: transformers repeats every key and value for each
    query head first (repeat_kv), and on CPU autograd keeps those copies for the backward pass."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = model.config.get_text_config()
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if model.config._attn_implementation != "sdpa" or kv == heads:
        return
    AttentionInterface.register(GQA_SDPA, _gqa_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)
    model.set_attn_implementation(GQA_SDPA)


def _gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa_attention_forward, the key/value heads given to SDPA as they are (enable_gqa);
    the cases this does not cover (a position bias, a causal pass without a mask over a longer cache)
    go to transformers' own."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if kwargs.get("position_bias") is not None or (attention_mask is None and q_len != kv_len):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    causal = (
        q_len > 1
        and attention_mask is None
        and (getattr(module, "is_causal", True) if is_causal is None else is_causal)
    )
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _no_fp32_input_casts(model) -> None:
    """Turn off PEFT's cast of each LoRA input to the adapter's fp32 (a saved fp32 copy of every linear
    input: most of the activation memory); under autocast the bf16 input can go in as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def soft_prompt_param(model, tokenizer, soft: SoftTraining | None, init_adapter: Path | None, seed: int):
    """The trainable soft prompt of an s step (None without one): the init adapter's if it has one, else
    initialized as soft.prompt.init says."""
    import torch

    if soft is None:
        return None
    base = model.get_base_model()
    start = load_soft_prompt(init_adapter) if init_adapter is not None else None
    if start is None:
        text = soft.init_text if soft.prompt.init == "instructions" else None
        start = init_soft_prompt(base, tokenizer, soft.prompt.virtual_tokens, text, seed)
    if start.shape != (soft.prompt.virtual_tokens, base.get_input_embeddings().embedding_dim):
        raise StepError(
            f"{init_adapter}: its soft prompt is {tuple(start.shape)}, the recipe asks for "
            f"{soft.prompt.virtual_tokens} virtual tokens"
        )
    return torch.nn.Parameter(start.to(base.device))


def start_optimizer(model, job: TrainJob, soft_param=None) -> TrainState:
    """AdamW on the model's trainable (LoRA) parameters, with TRL's settings (no weight decay); with an s
    step's soft prompt, two parameter groups (LoRA, soft prompt), each with its own settings."""
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    names = [n for n, _ in trainable]
    groups = [{"params": params, "lr": job.train.learning_rate, "weight_decay": 0.0}]
    penalties = []
    if soft_param is not None:
        lora, prompt = job.soft.groups.lora, job.soft.groups.soft_prompt
        groups = [
            {"params": params, "lr": job.soft.lora_rate, "weight_decay": lora.weight_decay},
            {"params": [soft_param], "lr": prompt.learning_rate, "weight_decay": prompt.weight_decay},
        ]
        penalties = [(g.l2, ps) for g, ps in ((lora, params), (prompt, [soft_param])) if g.l2 > 0]
        params, names = params + [soft_param], names + ["soft_prompt"]
    for group in groups:
        group["peak_lr"] = group["lr"]  # each group decays linearly from its own
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, **_fused(job.device))
    return TrainState(
        model=model, optimizer=optimizer, names=names, params=params, soft=soft_param, penalties=penalties
    )


def _fused(device: str) -> dict:
    import torch

    try:  # fused AdamW: one kernel for all the adapter's tensors (CPU since torch 2.4)
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError):  # pragma: no cover
        return {}
