r"""The adapter of a recipe module with `adapter: text`: plain chat, for a module with one free-text
output on a model too small to follow DSPy's `[[ ## field ## ]]` markers.

    >>> import dspy
    >>> signature = dspy.Signature("sentence -> sentiment", "Say whether the review is positive or negative.")
    >>> demo = dspy.Example(sentence="dull", sentiment="negative")
    >>> for message in TextAdapter().format(signature, demos=[demo], inputs={"sentence": "a charming film"}):
    ...     print(message)
    {'role': 'user', 'content': 'Say whether the review is positive or negative.\n\nSentence: dull'}
    {'role': 'assistant', 'content': 'negative'}
    {'role': 'user', 'content': 'Sentence: a charming film'}
    >>> TextAdapter().parse(signature, " positive\n")
    {'sentiment': 'positive'}

No system message: the instructions lead the first user message (on 20 SST-2 sentences, SmolLM2-135M
named the review's polarity more often, and stopped sooner, with them there than in a system
message). Each input is a `Field: value` line; an answer (a demo's, a fine-tune row's) is the output
field's value alone, and the whole completion, stripped, is that field. A ChatAdapter otherwise, so
demos and `format_finetune_data` work as DSPy's do; never the JSON fallback, whose format is not
this one.
"""

from __future__ import annotations

from typing import Any

import dspy
from dspy.adapters.utils import format_field_value


def _answer_field(signature: type[dspy.Signature]) -> str:
    """The one output field (checks.py holds a recipe's text modules to exactly one)."""
    (name,) = signature.output_fields
    return name


def _label(name: str, field) -> str:
    """'Sentence' for `sentence`: the prefix DSPy gives a field, without its colon."""
    return (field.json_schema_extra or {}).get("prefix", name).rstrip(":")


class TextAdapter(dspy.ChatAdapter):
    """Plain chat for a module with one output field (see the module's docstring)."""

    def __init__(self):
        super().__init__(use_json_adapter_fallback=False)

    def format(self, signature, demos, inputs) -> list[dict[str, Any]]:
        system, first, *rest = super().format(signature, demos, inputs)  # the instructions move down
        return [{**first, "content": f"{system['content']}\n\n{first['content']}"}, *rest]

    def format_system_message(self, signature) -> str:
        return signature.instructions

    def format_user_message_content(self, signature, inputs, prefix="", suffix="", main_request=False) -> str:
        lines = [
            f"{_label(name, field)}: {format_field_value(field, inputs[name])}"
            for name, field in signature.input_fields.items()
            if name in inputs
        ]
        return "\n".join(part for part in (prefix, *lines, suffix) if part)

    def format_assistant_message_content(self, signature, outputs, missing_field_message=None) -> str:
        name = _answer_field(signature)
        return format_field_value(signature.output_fields[name], outputs.get(name, missing_field_message))

    def parse(self, signature, completion: str) -> dict[str, Any]:
        return {_answer_field(signature): completion.strip()}
