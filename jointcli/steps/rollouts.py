"""Rollouts for the reinforce step (g): a group of sampled runs of the program per training example,
each scored by the metric, every module call in it a training row credited with that score.

    rollouts = collect_rollouts(sampling(program, temperature=1.0), examples, metric, group_size=4,
                                format_failure=0.0, modules=["classify"], num_threads=16, seed=(0, 2, 5))
    rollouts[0] == Rollout(example=0, sample=0, reward=1.0, calls=[("classify", {"messages": [...]})])

`sampling` gives every predictor a copy of its LM at the temperature, with DSPy's response cache off:
the samples of a group are the same request, so a cached answer would make the group identical. With
a `seed`, each rollout's LM calls carry a seed of their own (rollout_seed: from the seed, the example
and the sample), so the same seed draws the same rollouts: a resumed step redraws what it drew. A
call's row is the chat its module's adapter sends (system, demos, user) followed by its answer in that
adapter's format; an answer that did not parse ends the run, and its raw text is the row's answer,
the rollout's reward the format-failure score (as DSPy's bootstrap_trace_data does).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import dspy
from dspy.utils.exceptions import AdapterParseError

from ..program import module_adapter, predictors_of
from .evaluate import CallLog
from .parallel import parallel_map


@dataclass
class Rollout:
    example: int  # index in the step's examples
    sample: int  # which of its group
    reward: float
    calls: list[tuple[str, dict]] = field(default_factory=list)  # (module, {"messages": [...]})
    parsed: bool = True  # every call's answer parsed
    answer: str | None = None  # the program's output fields, as text (for rollouts.jsonl)
    error: str | None = None
    tokens: tuple[int, int] = (0, 0)  # input and output tokens of its LM calls


def sampling(program: dspy.Module, temperature: float) -> dspy.Module:
    """`program` with every predictor's LM copied at `temperature`, its response cache off."""
    for predictor in program.predictors():
        predictor.lm = predictor.lm.copy(temperature=temperature, cache=False)
    return program


def rollout_seed(*parts) -> int:
    """A sampling seed from `parts` (the step's seed, the example, the sample), the same in every process.

    >>> rollout_seed(0, 2, 5, 1, 3) == rollout_seed(0, 2, 5, 1, 3) != rollout_seed(0, 2, 5, 1, 2)
    True
    """
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


def collect_rollouts(
    program: dspy.Module,
    examples: list[dspy.Example],
    metric,
    group_size: int,
    format_failure: float,
    modules: list[str],
    num_threads: int,
    seed: tuple | None = None,
) -> list[Rollout]:
    """`group_size` runs of `program` on each example (example-major order), scored by `metric`; the
    calls of `modules` become rows. `seed`: each rollout's calls carry rollout_seed(*seed, example,
    sample); None: the engine draws."""

    def one(item: tuple[int, int]) -> Rollout:
        calls = CallLog()
        runner = program if seed is None else _seeded(program, rollout_seed(*seed, *item))
        with dspy.context(caller_modules=[calls]):
            rollout = run(runner, item)
        rollout.tokens = calls.tokens()[:2]
        return rollout

    def run(program: dspy.Module, item: tuple[int, int]) -> Rollout:
        owner = {id(p): m for m in modules for p in predictors_of(program, m)}
        index, sample = item
        example = examples[index]
        known = example.inputs().toDict()
        with dspy.context(trace=[]):
            try:
                prediction = program(**example.inputs())
            except AdapterParseError as err:
                rollout = Rollout(index, sample, format_failure, parsed=False, error="answer did not parse")
                _add_calls(rollout, dspy.settings.trace, owner, known)
                _add_failed(rollout, program, err, owner, known)
                return rollout
            except Exception as err:  # the program itself failed: no answer to learn from
                return Rollout(index, sample, format_failure, parsed=False, error=f"{type(err).__name__}: {err}"[:500])
            reward = float(metric(example, prediction))
            rollout = Rollout(index, sample, reward, answer=str(dict(prediction.items())))
            _add_calls(rollout, dspy.settings.trace, owner, known)
            return rollout

    items = [(i, j) for i in range(len(examples)) for j in range(group_size)]
    return parallel_map(one, items, num_threads, "rollouts")


def _seeded(program: dspy.Module, seed: int) -> dspy.Module:
    """A copy of `program` whose predictors' LMs sample with `seed` (the engine is shared, not copied)."""
    copy = program.deepcopy()
    for predictor in copy.predictors():
        predictor.lm = predictor.lm.copy(seed=seed)
    return copy


def _add_calls(rollout: Rollout, trace: list, owner: dict[int, str], known: dict) -> None:
    """The parsed calls of the run: rows of the modules trained; every output joins what later
    modules may have been given."""
    for predictor, inputs, outputs in list(trace):
        known.update(outputs.toDict())
        if (module := owner.get(id(predictor))) is not None:
            data = module_adapter(predictor).format_finetune_data(
                signature=predictor.signature, demos=predictor.demos, inputs=dict(inputs), outputs=outputs.toDict()
            )
            rollout.calls.append((module, {"messages": data["messages"]}))


def _add_failed(rollout: Rollout, program: dspy.Module, err: AdapterParseError, owner: dict, known: dict) -> None:
    """The call whose answer did not parse: its prompt (on the inputs it was given: the example's and
    earlier modules' outputs, by name) and its raw answer."""
    predictor = next((p for p in program.predictors() if p.signature == err.signature), None)
    if predictor is None or id(predictor) not in owner:
        return
    wanted = list(predictor.signature.input_fields)
    if not set(wanted) <= set(known):
        return
    inputs = {k: known[k] for k in wanted}
    messages = module_adapter(predictor).format(signature=predictor.signature, demos=predictor.demos, inputs=inputs)
    answer = {"role": "assistant", "content": str(err.lm_response or "")}
    rollout.answer = answer["content"][:500]
    rollout.calls.append((owner[id(predictor)], {"messages": [*messages, answer]}))
