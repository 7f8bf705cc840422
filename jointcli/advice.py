"""What to try, after a step of a schedule: the lines the schedule adds to a step's dev warnings.

    lines = advise(ctx, step)      # [] when the step needs none; else recorded and shown

Two kinds of step get them:
- a prompt step that stopped early (steps/prompts.py: no demo could be bootstrapped): what would work,
  a weight step first or labeled demos, as overrides of this recipe;
- a step whose dev score warns (answers.py: one answer to everything, or the majority class's score):
  the likely causes the run shows (answers.likely_causes), each with the override that tests it.
"""

from __future__ import annotations

import re

import dspy

from .answers import StepFacts, likely_causes, normalize_exact
from .console import console
from .context import Context
from .files import read_jsonl
from .program import build_program, model_of, module_names, predictors_of
from .recipe import PromptOptimizer, Recipe, WeightOptimizer
from .rundir import Step
from .state import current_state, load_program
from .step_kinds import StepKind

_MARKED = re.compile(r"\[\[ ## (\w+) ## \]\]\s*\n(.*?)\s*(?=\n\[\[ ## |\Z)", re.DOTALL)


def advise(ctx: Context, step: Step) -> list[str]:
    """The lines for `step` (see the module's docstring), appended to its dev warnings in the manifest
    (`jointopt status` shows them) and printed now."""
    lines = []
    if step.info.get("stopped_early"):
        lines.append(f"{step.info['stopped_early']}; {early_stop_advice(ctx.recipe, step.info['optimizer'])}")
    if step.info.get("dev_warnings"):
        lines += likely_causes(step_facts(ctx, step))
    if lines:
        step.info["dev_warnings"] = [*step.info.get("dev_warnings", []), *lines]
        ctx.run.update(step)
        for line in lines:
            console.print(f"[yellow]warning[/]: {step.folder} dev: {line}", highlight=False, soft_wrap=True)
    return lines


def early_stop_advice(recipe: Recipe, key: str) -> str:
    """What would work instead of bootstrapping on a model that does not follow the output format: a
    weight step first (it learns the format from the gold answers), or labeled demos (no bootstrap).

    >>> from jointcli.recipe import load_recipe
    >>> print(early_stop_advice(load_recipe("recipes/sst2.yaml"), "p"))  # doctest: +NORMALIZE_WHITESPACE
    try a weight step first ('schedule.strategy=w -> p')
        or labeled demos (optimizers.p.optimizer=LabeledFewShot 'optimizers.p.args={k: 4}')
    """
    spec = recipe.optimizers[key]
    k = spec.args.get("max_labeled_demos", 4) if isinstance(spec, PromptOptimizer) else 4
    labeled = f"labeled demos (optimizers.{key}.optimizer=LabeledFewShot 'optimizers.{key}.args={{k: {k or 4}}}')"
    weight = next((w for w, s in recipe.optimizers.items() if isinstance(s, WeightOptimizer)), None)
    if weight is None:
        return f"try {labeled}, or a weight optimizer under optimizers and a weight step first"
    return f"try a weight step first ('schedule.strategy={weight} -> {key}') or {labeled}"


def step_facts(ctx: Context, step: Step) -> StepFacts:
    """What answers.likely_causes reads, from the run: the training split's labels, a weight step's
    length and trained rows, the instructions of the modules that answer the label."""
    label = ctx.recipe.label_field
    facts = StepFacts(step.info.get("optimizer"), [ex.get(label) for ex in ctx.splits.train], label)
    spec = ctx.recipe.optimizers.get(facts.key) if facts.key else None
    if step.kind in (StepKind.WEIGHT, StepKind.SIMULTANEOUS) and isinstance(spec, WeightOptimizer):
        first = next(iter(step.info.get("training", {}).values()), {})
        facts.steps, facts.rows, facts.floor = first.get("steps"), first.get("rows"), spec.train.min_steps
        traces = ctx.run.step_dir(step) / "traces.jsonl"
        if traces.is_file():
            facts.trained = [a for row in read_jsonl(traces) if (a := trained_answer(row, label)) is not None]
    state = current_state(ctx.run, ctx.recipe, build_program(ctx.recipe), step.index)
    program = load_program(ctx.run, ctx.recipe, state)
    facts.tuned = any(m.adapter for m in state.modules.values())
    facts.instructions = _instructions(ctx.recipe, program, label)
    answering = [m for m in module_names(ctx.recipe, program) if _outputs(program, m, label)]
    facts.model = model_of(ctx.recipe, answering[-1]) if answering else None
    return facts


def trained_answer(row: dict, label: str) -> str | None:
    """The label answered in a training row (traces.jsonl): the `label` field of its last message, or the
    whole message for a module without field markers (the text adapter).

    >>> row = {"messages": [{"role": "assistant", "content": "[[ ## label ## ]]\\nPos\\n\\n[[ ## completed ## ]]"}]}
    >>> trained_answer(row, "label")
    'pos'
    """
    messages = row.get("messages") or []
    text = messages[-1].get("content", "") if messages else ""
    marked = dict(_MARKED.findall(text))
    if marked:
        return normalize_exact(marked[label]) if label in marked else None
    return normalize_exact(text) or None


def _outputs(program: dspy.Module, module: str, label: str) -> bool:
    return any(label in p.signature.output_fields for p in predictors_of(program, module))


def _instructions(recipe: Recipe, program: dspy.Module, label: str) -> dict[str, str]:
    """Where each module that outputs `label` takes its instructions (an override key for a recipe module;
    words for a program class's predictor) -> its current instructions."""
    out = {}
    for i, module in enumerate(module_names(recipe, program)):
        for predictor in predictors_of(program, module):
            if label in predictor.signature.output_fields:
                where = (
                    f"program.modules.{i}.instructions"
                    if recipe.program.modules
                    else f"the docstring of {module}'s signature in your program class"
                )
                out[where] = predictor.signature.instructions
    return out
