"""The adapter of a prompt step: an instruction proposer's answer that does not parse keeps the current
instruction, instead of failing the step.

Optimizers such as MIPROv2, COPRO and InferRules ask a prompt model to write instructions in DSPy's
`[[ ## field ## ]]` format; a small model often answers in no format at all, and DSPy then raises
AdapterParseError from deep inside the optimizer. Under this adapter, such an answer becomes the
instruction the module already had, and the step reports how often that happened in one line. The
program's own calls (the task's signatures) parse exactly as under DSPy's ChatAdapter: a task answer
that does not parse is still a failed example.

    adapter = ProposalAdapter(program)
    with dspy.context(adapter=adapter):
        optimized = optimizer.compile(program, trainset=trainset)
    adapter.summary()      # "the prompt model's answer did not parse 3 of 4 times: ..." or None
"""

from __future__ import annotations

import contextvars
import threading

import dspy
from dspy.utils.exceptions import AdapterParseError

_INPUTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jointopt_proposal_inputs", default=None)


class ProposalAdapter(dspy.ChatAdapter):
    """DSPy's ChatAdapter (no JSON fallback), tolerant of proposers' answers only.

    A signature is the task's when its output fields are those of one of the program's predictors;
    any other signature an optimizer runs (proposing instructions, rules, reflections) is a proposer's.
    """

    def __init__(self, program: dspy.Module):
        super().__init__(use_json_adapter_fallback=False)
        predictors = [p for _, p in program.named_predictors()]
        self.task_outputs = [set(p.signature.output_fields) for p in predictors]
        self.instruction = predictors[0].signature.instructions if predictors else ""
        self.proposals = 0
        self.kept = 0
        self._lock = threading.Lock()

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        if self._is_task(signature):
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)
        token = _INPUTS.set(inputs)  # parse() sees the call's inputs: the instruction it may keep
        try:
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)
        except AdapterParseError:  # an empty answer fails before parse(): every completion keeps
            return self._keep_all(signature, inputs, lm_kwargs)
        finally:
            _INPUTS.reset(token)

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        if self._is_task(signature):
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
        token = _INPUTS.set(inputs)
        try:
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
        except AdapterParseError:
            return self._keep_all(signature, inputs, lm_kwargs)
        finally:
            _INPUTS.reset(token)

    def _is_task(self, signature) -> bool:
        return set(signature.output_fields) in self.task_outputs

    def _keep_all(self, signature, inputs: dict, lm_kwargs: dict) -> list[dict]:
        n = lm_kwargs.get("n") or 1
        with self._lock:
            self.proposals += n
            self.kept += n
        return [self._keep(signature, inputs) for _ in range(n)]

    def parse(self, signature, completion: str) -> dict:
        if self._is_task(signature):
            return super().parse(signature, completion)
        with self._lock:
            self.proposals += 1
        try:
            return super().parse(signature, completion)
        except AdapterParseError:
            with self._lock:
                self.kept += 1
            return self._keep(signature, _INPUTS.get() or {})

    def _keep(self, signature, inputs: dict) -> dict:
        """The proposer's outputs when its answer did not parse: the instruction it started from (or the
        module's) for an instruction field, nothing for the others (no rule, no prefix)."""
        current = inputs.get("basic_instruction") or self.instruction
        return {
            name: current if "instruction" in name else ("" if field.annotation is str else None)
            for name, field in signature.output_fields.items()
        }

    def summary(self) -> str | None:
        """One line when some proposer answer did not parse, else None."""
        if not self.kept:
            return None
        return (
            f"the prompt model's answer did not parse {self.kept} of {self.proposals} times; "
            "those proposals kept the current instruction"
        )
