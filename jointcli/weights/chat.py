"""A checkpoint's chat template, applied the same way to the engine's prompts and to training rows.

    ids = chat_ids(tokenizer, [{"role": "system", ...}, {"role": "user", ...}], add_generation_prompt=True)

The template is the checkpoint's own (its tokenizer's chat_template: ChatML for SmolLM2 and Qwen,
headers for Llama 3, `<start_of_turn>` for Gemma, ...). DSPy's ChatAdapter always sends a system
message; some templates refuse one (Gemma 2's raises "System role not supported", Mistral's wants
strictly alternating user/assistant turns). For those, and only after the template has refused the
messages as they are, the system message goes at the top of the first user message (what Gemma 3's
own template does), in the engine and in training alike.
"""

from __future__ import annotations

from ..errors import InputError


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template (as apply_chat_template(tokenize=True)
    gives them: the template writes any special tokens, the tokenizer adds none)."""
    text = chat_text(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        if not (messages and messages[0]["role"] == "system"):
            raise InputError(f"the checkpoint's chat template refused the messages: {err}") from None
        refused = err
    try:
        return tokenizer.apply_chat_template(
            fold_system(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as err:
        raise InputError(
            f"the checkpoint's chat template refused the messages: {refused}; with the system "
            f"message folded into the first user message: {err}"
        ) from None


def fold_system(messages: list[dict]) -> list[dict]:
    """The system message at the top of the first user message (a blank line between them)."""
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    first = next((m for m in rest if m["role"] == "user"), None)
    if first is None:
        return [{"role": "user", "content": system["content"]}, *rest]
    first["content"] = f"{system['content']}\n\n{first['content']}"
    return rest
