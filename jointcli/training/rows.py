"""Training rows: DSPy fine-tune rows turned into prompt/completion pairs, tokenized as TRL does.

    >>> row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    >>> to_prompt_completion([row])
    [{'prompt': [{'role': 'user', 'content': '2+2?'}], 'completion': [{'role': 'assistant', 'content': '4'}]}]

A row is `{"messages": [system, user, (assistant, user)*, assistant]}`, as
`dspy.ChatAdapter().format_finetune_data(...)` builds it; the prompt is every message but the last,
the completion the last (the assistant's). Tokenized (`tokenize_pair`), the loss is on the final
completion only, end-of-turn token included. Rows longer than `train.max_length` tokens are dropped
(`prepare_data`, counted), never cut: cutting from the right would cut the completion, and from the
left the system message that tells the model its fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StepError
from ..weights.chat import chat_ids
from ..weights.checkpoint import load_tokenizer
from ..weights.soft_prompt import virtual_ids
from .microbatch import Row


def to_prompt_completion(rows: list[dict]) -> list[dict]:
    """DSPy chat rows -> TRL conversational prompt/completion rows. Raises StepError on a bad row."""
    out = []
    for i, row in enumerate(rows):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or len(messages) < 2:
            raise StepError(f"training row {i}: expected {{'messages': [..., assistant]}} with at least 2 messages")
        if not all(_is_message(m) for m in messages):
            raise StepError(f"training row {i}: every message needs a role (system/user/assistant) and a text content")
        if messages[-1]["role"] != "assistant":
            raise StepError(
                f"training row {i}: the last message must be the assistant's completion, not {messages[-1]['role']!r}"
            )
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        out.append({"prompt": clean[:-1], "completion": clean[-1:]})
    return out


def _is_message(m: Any) -> bool:
    return (
        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
    )


def tokenize_pair(tokenizer, pair: dict) -> tuple[list[int], int]:
    """(input ids of prompt + completion, index of the first completion token), as TRL tokenizes a
    conversational prompt/completion row: the completion starts where the tokenized prompt (with the
    generation prompt) and the tokenized prompt + completion diverge. The checkpoint's chat template
    is applied as the engine applies it to prompts (weights/chat.py)."""
    prompt = chat_ids(tokenizer, pair["prompt"], add_generation_prompt=True)
    full = chat_ids(tokenizer, pair["prompt"] + pair["completion"], add_generation_prompt=False)
    start = 0
    for a, b in zip(prompt, full):
        if a != b:
            break
        start += 1
    return full, start


@dataclass
class TrainData:
    """The rows a training trains on: those within train.max_length, tokenized."""

    pairs: list[dict]  # the prompt/completion rows kept
    rows: list[Row]  # their token ids and first completion token
    lengths: list[int]  # their token counts
    dropped: int  # rows left out for being longer than train.max_length
    pad_id: int
    tokenizer: Any = None  # the checkpoint's (a soft prompt's text init tokenizes with it)

    def answers(self) -> list[str]:
        """Each row's completion text."""
        return [pair["completion"][-1]["content"] for pair in self.pairs]


def prepare_data(checkpoint: Path, pairs: list[dict], max_length: int, virtual: int = 0) -> TrainData:
    """Tokenize the prompt/completion rows with the checkpoint's tokenizer (after `virtual` soft-prompt
    tokens, if any) and drop those longer than max_length tokens; StepError when none is left."""
    tokenizer = load_tokenizer(checkpoint)  # its chat template formats the rows, as the engine's prompts
    encoded = [
        (virtual_ids(virtual) + ids, start + virtual) for ids, start in (tokenize_pair(tokenizer, p) for p in pairs)
    ]
    keep = [i for i, (ids, _) in enumerate(encoded) if len(ids) <= max_length]
    if not keep:
        raise StepError(
            f"no training rows: all {len(pairs)} rows are longer than train.max_length="
            f"{max_length} tokens (shortest {min(len(ids) for ids, _ in encoded)}); "
            "raise train.max_length"
        )
    rows = [encoded[i] for i in keep]
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)  # masked out
    return TrainData(
        pairs=[pairs[i] for i in keep],
        rows=rows,
        lengths=[len(ids) for ids, _ in rows],
        dropped=len(pairs) - len(keep),
        pad_id=pad_id,
        tokenizer=tokenizer,
    )
