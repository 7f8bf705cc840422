"""The weight step (w): LoRA fine-tuning of the modules on local models, from passing traces.

Each fine-tune trains a fresh adapter on the base model (not on the previous adapter), from the
traces of the current program: the weights adapt to the current prompts, as in BetterTogether.
With `adapters: shared`, modules on the same base model share one multitask adapter.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..errors import StepError
from ..recipe import LocalModel, Recipe, SimultaneousOptimizer, WeightOptimizer
from ..training.lora import SoftTraining, train_lora
from ..weights.checkpoint import resolve_checkpoint
from .traces import blocking_module


def weight_modules(recipe: Recipe, spec: WeightOptimizer, all_modules: list[str], states: dict) -> list[str]:
    """The modules this weight step fine-tunes: those it names (or all) that run on a local model;
    checks.py made sure with the recipe that there is one, and that each one it names is local."""
    chosen = all_modules if spec.modules == "all" else list(spec.modules)
    return [m for m in chosen if isinstance(recipe.models[states[m].model], LocalModel)]


def group_rows(rows: list[dict], modules: list[str], states: dict, shared: bool) -> dict[str, tuple[str, list[dict]]]:
    """adapter name -> (model name, training rows). Per module, or one per base model when shared.

    >>> from jointcli.state import ModuleState
    >>> rows = [{"module": "classify", "messages": ["..."]}, {"module": "note", "messages": ["..."]}]
    >>> group_rows(rows, ["classify"], {"classify": ModuleState("small")}, shared=False)
    {'classify': ('small', [{'messages': ['...']}])}
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    model_of = {}
    for row in rows:
        module = row["module"]
        if module not in modules:
            continue
        name = states[module].model if shared else module
        groups[name].append({"messages": row["messages"]})
        model_of[name] = states[module].model
    return {name: (model_of[name], group) for name, group in groups.items()}


def no_traces_error(counts: dict, spec: WeightOptimizer, prompted: bool) -> StepError:
    """No rows to train on, with the hints that apply to this run as it is."""
    what = f"{counts.get('run', 0)} examples run, {counts.get('passed', 0)} passed the metric"
    if blocked := blocking_module(counts):
        ran = counts["modules"][blocked]["ran"]
        return StepError(
            f"no traces to fine-tune on ({what}): module {blocked!r} answered none of its {ran} "
            "examples in a form DSPy could parse, so the modules after it never ran (its answers: "
            "failures.jsonl in the step folder); give it a larger model, a prompt it can follow, "
            "or a teacher for the traces (traces.source=teacher)"
        )
    source, hints = spec.traces.source, []
    if source != "program+labels":
        hints.append("the gold answers for failed examples (traces.source=program+labels)")
    if source != "teacher":
        hints.append("a teacher (traces.source=teacher with traces.teacher=<model>)")
    if spec.traces.threshold > 0 and not counts.get("passed"):
        hints.append("a lower traces.threshold")
    if not prompted:
        hints.append("a prompt step first (p -> w)")
    return StepError(f"no traces to fine-tune on ({what}); try {', or '.join(hints) or 'more training examples'}")


def train_adapters(
    recipe: Recipe,
    spec: WeightOptimizer,
    groups: dict,
    folder: Path,
    seed: int,
    instructions: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Train one adapter per group into `folder/adapters/<name>`; returns the training figures. An s step
    (SimultaneousOptimizer) trains a soft prompt with each, initialized from its module's `instructions`
    (a shared adapter: from those of the first module on its model)."""

    results = {}
    for name, (model, rows) in groups.items():
        local = recipe.models[model]
        soft = None
        if isinstance(spec, SimultaneousOptimizer):
            text = (instructions or {}).get(name) or next(iter((instructions or {}).values()), None)
            soft = SoftTraining(spec.soft_prompt, spec.groups, spec.lora_rate, text)
        result = train_lora(
            resolve_checkpoint(local.path),
            rows,
            folder / "adapters" / name,
            spec.lora,
            spec.train,
            seed=seed,
            log_path=folder / f"train_log-{name}.jsonl",
            device=local.device,
            dtype=spec.train.dtype,
            soft=soft,
        )
        results[name] = {
            "rows": result.rows,
            "dropped_rows": result.dropped_rows,
            "steps": result.steps,
            "train_tokens": result.train_tokens,
            "tokens_per_second": round(result.tokens_per_second, 1),
            "seconds": round(result.seconds, 2),
            "peak_rss_mb": round(result.peak_rss_mb),
            "peak_cuda_mb": result.peak_cuda_mb,
            "final_loss": result.final_loss,
            "device": result.device,
            "dtype": result.dtype,
            **({"virtual_tokens": result.virtual_tokens} if result.virtual_tokens else {}),
        }
    return results
