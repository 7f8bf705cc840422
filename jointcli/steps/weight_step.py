"""The weight step: LoRA fine-tuning (w), or a soft prompt trained with the LoRA adapter (s).

    WeightStep("w").run(ctx)                              # `jointopt finetune` and a strategy's `w`: NN-w
    WeightStep("w", traces=Path("runs/a/01-bootstrap/traces.jsonl")).run(ctx)   # `finetune --traces`

The step trains on the traces of a bootstrap made since the program last changed, or on `traces`,
or collects its own (bootstrap_step.py), copied into its folder either way; then one adapter per
module (or per base model, with `adapters: shared`, weights.py), which the new program state names.
An optimizer of type `simultaneous` makes an s step.
"""

from __future__ import annotations

from pathlib import Path

from ..checks import step_optimizer
from ..errors import InputError
from ..files import copy_file, read_jsonl, remove_path, write_jsonl
from ..program import module_names, predictors_of
from ..recipe import WeightOptimizer
from ..rundir import Step
from ..state import ModuleState, save_state
from ..step_kinds import kind_of_optimizer
from .base import StepContext, prompted, run_step
from .bootstrap_step import collect, fresh_traces, write_traces
from .weights import group_rows, no_traces_error, train_adapters, weight_modules


class WeightStep:
    """Fine-tune the modules that weight optimizer `key` names, on `traces` (a traces.jsonl) if given."""

    def __init__(self, key: str, traces: Path | None = None):
        self.key = key
        self.traces = Path(traces) if traces is not None else None

    def run(self, ctx: StepContext) -> Step:
        spec: WeightOptimizer = step_optimizer(ctx.recipe, self.key, WeightOptimizer)
        if self.traces is not None and not self.traces.is_file():
            raise InputError(f"--traces: {self.traces} is not a file")
        kind = kind_of_optimizer(spec.type)
        return run_step(ctx, kind, lambda step: self._train(ctx, spec, step), {"optimizer": self.key})

    def _train(self, ctx: StepContext, spec: WeightOptimizer, step: Step) -> None:
        folder = ctx.run.step_dir(step)
        rows, step.info["traces"] = self._rows(ctx, spec, step)
        program, state = ctx.current_program()
        modules = weight_modules(ctx.recipe, spec, module_names(ctx.recipe, program), state.modules)
        groups = group_rows(rows, modules, state.modules, shared=spec.adapters == "shared")
        if not groups:
            raise no_traces_error(step.info["traces"], spec, prompted(ctx.run))
        instructions = {m: predictors_of(program, m)[0].signature.instructions for m in modules}
        step.info["training"] = train_adapters(
            ctx.recipe, spec, groups, folder, ctx.recipe.seed + step.index, instructions
        )
        _merge_logs(folder, list(groups))
        new = state.with_modules(state.modules)
        for module in modules:
            name = state.modules[module].model if spec.adapters == "shared" else module
            if name in groups:
                adapter = str((folder / "adapters" / name).relative_to(ctx.run.path))
                new.modules[module] = ModuleState(state.modules[module].model, adapter)
        tuned = ctx.program_for(new)
        save_state(ctx.run, folder, tuned, new)
        ctx.record_eval(step, ctx.evaluate(tuned, "dev"), "dev")

    def _rows(self, ctx: StepContext, spec: WeightOptimizer, step: Step) -> tuple[list[dict], dict]:
        """The traces to train on, copied into the step's folder, and their counts."""
        folder = ctx.run.step_dir(step)
        source = self.traces or fresh_traces(ctx.run)
        if source is None:
            traces = collect(ctx, spec, step.index)
            return traces.rows, write_traces(folder, traces, ctx.recipe.runtime.max_error_rate)
        rows = read_jsonl(source)
        copy_file(source, folder / "traces.jsonl")
        return rows, {"rows": len(rows), "from": str(source)}


def weight_step(ctx: StepContext, key: str, traces_path: Path | None = None) -> Step:
    """`WeightStep(key, traces_path).run(ctx)`: what `jointopt finetune` runs."""
    return WeightStep(key, traces_path).run(ctx)


def _merge_logs(folder: Path, names: list[str]) -> None:
    """The adapters' train_log-NAME.jsonl as one train_log.jsonl, each row naming its adapter."""
    rows = []
    for name in names:
        path = folder / f"train_log-{name}.jsonl"
        if path.exists():
            rows += [{"adapter": name, **r} for r in read_jsonl(path)]
            remove_path(path)
    write_jsonl(folder / "train_log.jsonl", rows)
