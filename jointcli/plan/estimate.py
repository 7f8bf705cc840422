"""The plan of a recipe's schedule: the phases of each step (LM calls and tokens from the recipe,
seconds from the probe), and build_plan, which puts them together."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from ..data import load_splits
from ..errors import InputError
from ..program import build_program, model_of, module_names
from ..recipe import LocalModel, PromptOptimizer, Recipe, SimultaneousOptimizer, Train, WeightOptimizer
from ..recipe.optimizers import DEFAULT_EPOCHS, ReinforceOptimizer
from ..strategy import parse_strategy
from ..training.microbatch import plan_steps
from ..weights.device import cpu_kind, resolve_device, resolve_dtype, resolve_train_dtype
from .calls import demos_by_step, knn_runs_per_call, optimizer_calls, optimizer_settings
from .probe import Probe, run_probe
from .prompts import Prompts
from .result import Calls, Phase, Plan, StepPlan
from .sizes import GB, available_memory, lora_parameters, module_models, trained_modules, training_memory


def _steps_from(train: Train, rows: int) -> str:
    """Where a weight step's optimizer steps come from, with the arithmetic, as the plan shows it.

    >>> _steps_from(Train(), 60)
    '60 rows / 8 a step = 8 an epoch; 2 epochs = 16, less than train.min_steps: 48'
    >>> _steps_from(Train(epochs=1), 120), _steps_from(Train(steps=30), 60)
    ('120 rows / 8 a step = 15 an epoch; 1 epoch = 15', 'train.steps: 30 (3.8 epochs of 60 rows / 8 a step)')
    """
    per_step = train.batch_size * train.grad_accum
    per_epoch = math.ceil(rows / per_step)
    if train.steps is not None:
        return f"train.steps: {train.steps} ({train.steps / per_epoch:.1f} epochs of {rows} rows / {per_step} a step)"
    epochs = train.epochs if train.epochs is not None else DEFAULT_EPOCHS
    by_epochs = Train(epochs=epochs, batch_size=train.batch_size, grad_accum=train.grad_accum).optimizer_steps(rows)
    line = (
        f"{rows} rows / {per_step} a step = {per_epoch} an epoch; {epochs:g} epoch{'s' * (epochs != 1)} = {by_epochs}"
    )
    if train.optimizer_steps(rows) > by_epochs:
        line += f", less than train.min_steps: {train.min_steps}"
    return line


# A weight step shorter than this is warned of before it runs: 8 optimizer steps learned one constant answer
# on every small task measured, and sst2's 15 learned the task (docs/your-own-task.md)
SHORT_STEPS = 12


def short_training(key: str, name: str, train: Train, rows: int, steps: int) -> str:
    """The warning for a training of fewer than SHORT_STEPS optimizer steps, which only a recipe's own
    epochs or steps can make (the default is never shorter than train.min_steps), with the override that
    lengthens it to the floor."""
    return (
        f"{key} ({name}): {steps} optimizer steps on {rows} rows, fewer than {SHORT_STEPS}: so few steps can "
        f"learn one answer for every input; try optimizers.{key}.train.steps={train.min_steps} "
        "(train.min_steps, instead of train.epochs)"
    )


class Estimator:
    """The phases of each step: calls and tokens from the recipe, seconds from the probe."""

    def __init__(
        self,
        recipe: Recipe,
        splits,
        prompts: Prompts,
        names: list[str],
        modules: dict[str, dict],
        probe: Probe | None,
        memory: tuple[int, str],
    ):
        self.recipe, self.splits, self.prompts, self.names, self.modules = recipe, splits, prompts, names, modules
        self.probe, self.free = probe, memory[0]
        self.predictors = len(prompts.predictors)

    def evaluation(self, split: str, demos: dict[str, int], adapted: bool, knn: PromptOptimizer | None = None) -> Phase:
        """An evaluation of `split` by the program with `demos` (`adapted`: on a LoRA adapter; `knn`: the
        KNNFewShot step whose lookup the program carries)."""
        examples = getattr(self.splits, split)
        return self._program_runs(len(examples), self.prompts.per_example(examples, demos), adapted, knn)

    def _program_runs(
        self, runs: int, tokens: tuple[float, float], adapted: bool, knn: PromptOptimizer | None
    ) -> Phase:
        """`runs` calls of the program, of `tokens` (in, out) each, batched; with a KNNFewShot lookup each
        call first bootstraps its demos from the nearest training examples."""
        each = knn_runs_per_call(knn, self.probe.pass_rate if self.probe else None) if knn else Calls.exact(1)
        n, (tokens_in, tokens_out) = runs * self.predictors, tokens
        seconds = runs * each.expected * self.probe.per_example(tokens_in, adapted) if self.probe else None
        return Phase(
            Calls(n * each.low, n * each.high, n * each.expected, each.approximate),
            round(runs * each.expected * tokens_in),
            round(runs * each.expected * tokens_out),
            seconds,
        )

    def optimizer(self, spec: PromptOptimizer, demos: dict[str, int], adapted: bool) -> Phase:
        """A prompt optimizer's compile() on the training split, from the program with `demos`."""
        train = self.splits.train
        calls = optimizer_calls(spec, len(train), self.predictors, self.probe.pass_rate if self.probe else None)
        teacher = optimizer_settings(spec).get("max_labeled_demos")  # BootstrapFewShot's teacher: labeled demos
        tokens_in, tokens_out = self.prompts.per_example(
            train, demos if teacher is None else {m: min(len(train), teacher) for m in demos}
        )
        runs, seconds = calls.expected / self.predictors, None
        if self.probe and spec.optimizer == "BootstrapFewShot":  # one call at a time
            seconds = runs * self.probe.single * (self.probe.adapter_factor if adapted else 1.0)
        elif self.probe:
            seconds = runs * self.probe.per_example(tokens_in, adapted)
        return Phase(calls, round(runs * tokens_in), round(runs * tokens_out), seconds)

    def rollouts(
        self, spec: ReinforceOptimizer, demos: dict[str, int], adapted: bool, knn: PromptOptimizer | None
    ) -> Phase:
        """A g step's sampled runs: group_size of each example its optimizer steps take, batched as an
        evaluation is."""
        train = self.splits.train
        runs = spec.train.optimizer_steps(len(train)) * spec.train.batch_size * spec.train.grad_accum * spec.group_size
        return self._program_runs(runs, self.prompts.per_example(train, demos), adapted, knn)

    def training(self, key: str, spec: WeightOptimizer, demos: dict[str, int]) -> tuple[Phase, dict, list[str]]:
        """LoRA on at most one row per training example and trained module (a g step: group_size rows,
        trained `iterations` times); adapters per module or per model."""
        groups: dict[str, list[str]] = {}
        for m in trained_modules(self.recipe, spec, self.names):
            groups.setdefault(self.modules[m]["model"] if spec.adapters == "shared" else m, []).append(m)
        per_step, n_train = spec.train.batch_size * spec.train.grad_accum, len(self.splits.train)
        train, warnings, tokens, seconds = {}, [], 0, 0.0
        for name, members in groups.items():
            info = self.modules[members[0]]
            prompt, completion = self.prompts.per_example(self.splits.train, demos, members)
            virtual = spec.soft_prompt.virtual_tokens if isinstance(spec, SimultaneousOptimizer) else 0
            row_tokens, rows = round((prompt + completion) / len(members)) + virtual, n_train * len(members)
            planned = plan_steps(rows, per_step, 0, 0, steps=spec.train.optimizer_steps(rows))
            steps, group = len(planned), spec.group_size if isinstance(spec, ReinforceOptimizer) else 0
            device = resolve_device(self.recipe.models[info["model"]].device)
            dtype = resolve_train_dtype(spec.train.dtype, device)
            trainable = lora_parameters(Path(info["checkpoint"]), spec.lora) + virtual * info["hidden_size"]
            memory = self._memory(info, spec.train, trainable, row_tokens, device, dtype)
            train[name] = {
                "model": info["model"],
                "modules": members,
                "rows": sum(map(len, planned)) * group if group else rows,  # g: its rollouts
                "steps": steps,
                "steps_from": _steps_from(spec.train, rows),
                "row_tokens": row_tokens,
                "parameters": info["parameters"],
                "lora_parameters": trainable,
                "device": device,
                "dtype": dtype,
                "memory_gb": {k: round(v / GB, 2) for k, v in memory.items() if k != "micro_batch_tokens"},
                "micro_batch_tokens": memory["micro_batch_tokens"],
            }
            if memory["lora"] > self.free:
                warnings.append(
                    f"{key} ({name}): LoRA training needs about {memory['lora'] / GB:.1f} GB, more than "
                    f"the {self.free / GB:.1f} GB of {device} memory available; it will not fit"
                )
            if steps < SHORT_STEPS and not group:  # the floor was measured on supervised steps
                warnings.append(short_training(key, name, spec.train, rows, steps))
            grpo = group * spec.iterations if group else 1
            tokens += row_tokens * sum(len(step) for step in planned) * grpo
            if self.probe and self.probe.step_seconds:
                seconds += steps * grpo * self.probe.step_seconds * row_tokens / self.probe.row_tokens
        probed = self.probe is not None and self.probe.step_seconds is not None
        return Phase(Calls.exact(0), tokens, 0, seconds if probed else None), train, warnings

    def _memory(self, info: dict, train: Train, trainable: int, row_tokens: int, device: str, dtype: str) -> dict:
        """training_memory of one adapter, with the peak of the whole process on CPU (the engine serves
        the model in the same process)."""
        per_step, budget = train.batch_size * train.grad_accum, train.micro_batch_tokens(device, dtype)
        engine = resolve_dtype(self.recipe.models[info["model"]].dtype, device).itemsize if device == "cpu" else None
        return training_memory(info, trainable, per_step, row_tokens, budget, dtype, engine_width=engine)

    def _first_phase(
        self, spec: WeightOptimizer, demos: dict[str, int], adapted: bool, knn: PromptOptimizer | None
    ) -> dict[str, Phase]:
        """What a weight step runs before it trains: the g step's rollouts, else the bootstrap of traces
        (nothing when it trains on labels alone)."""
        if isinstance(spec, ReinforceOptimizer):
            return {"rollouts": self.rollouts(spec, demos, adapted, knn)}
        if spec.traces.source == "labels":
            return {"bootstrap": Phase(Calls.exact(0), 0, 0, 0.0 if self.probe else None)}
        return {"bootstrap": self.evaluation("train", demos, adapted, knn)}

    def steps(self, keys: list[str]) -> list[StepPlan]:
        """The baseline, a step per optimizer key of the strategy, then the test evaluation."""
        walk = demos_by_step(self.recipe, keys, self.names, len(self.splits.train))
        baseline = self.evaluation("dev", walk[0], False)
        out = [StepPlan("00-baseline", "baseline", demos=walk[0], phases={"dev": baseline})]
        adapted, knn = False, None  # knn: the KNNFewShot step whose lookup the program carries
        for i, key in enumerate(keys, 1):
            spec = self.recipe.optimizers[key]
            if isinstance(spec, PromptOptimizer):
                knn = spec if spec.optimizer == "KNNFewShot" else None  # a later prompt step drops the lookup
                step = StepPlan(
                    f"{i:02d}-p",
                    "p",
                    key,
                    spec.optimizer,
                    walk[i],
                    {"optimizer": self.optimizer(spec, walk[i - 1], adapted)},
                )
            else:
                first = self._first_phase(spec, walk[i], adapted, knn)
                train, info, warnings = self.training(key, spec, walk[i])
                kind = {"simultaneous": "s", "reinforce": "g"}.get(spec.type, "w")
                step = StepPlan(
                    f"{i:02d}-{kind}",
                    kind,
                    key,
                    {"s": "LoRA + soft prompt", "g": "GRPO on LoRA"}.get(kind, "LoRA"),
                    walk[i],
                    {**first, "train": train},
                    info,
                    warnings,
                )
                adapted = True
            step.phases["dev"] = self.evaluation("dev", walk[i], adapted, knn)
            out.append(step)
        test = self.evaluation("test", walk[-1], adapted, knn)  # the best step by dev, and the last if another
        test.calls = Calls(test.calls.low, test.calls.high * (2 if keys else 1), test.calls.expected)
        return out + [StepPlan("test", "test", demos=walk[-1], phases={"test": test})]


def build_plan(recipe: Recipe, probe: bool | None = None) -> Plan:
    """The plan of the recipe's schedule (checks.check_recipe first). `probe`: time it on this machine;
    None: when every module runs on a local model."""
    program = build_program(recipe)
    names = module_names(recipe, program)
    remote = [m for m in names if not isinstance(recipe.models[model_of(recipe, m)], LocalModel)]
    if probe and remote:
        raise InputError(
            f"--probe: it times local models, and {', '.join(remote)} run(s) on a LiteLLM model; use --no-probe"
        )
    splits = load_splits(recipe.data)
    modules = module_models(recipe, names)
    keys = parse_strategy(recipe.schedule.strategy, recipe.optimizers)
    local = [spec for spec in recipe.models.values() if isinstance(spec, LocalModel)]
    device = resolve_device(local[0].device if local else "cpu")
    memory = available_memory(device)  # before the probe loads anything
    prompts = Prompts(recipe, program, names, modules, splits.train)
    measured = None
    if probe or (probe is None and not remote):
        walk = demos_by_step(recipe, keys, names, len(splits.train))
        weights = [
            (recipe.optimizers[k], walk[i])
            for i, k in enumerate(keys, 1)
            if isinstance(recipe.optimizers[k], WeightOptimizer)
        ]
        first = weights[0] if weights else None
        measured = run_probe(recipe, splits, prompts, names, max(max(d.values()) for d in walk), first)
    steps = Estimator(recipe, splits, prompts, names, modules, measured, memory).steps(keys)
    machine = {
        "cpu": cpu_kind(),
        "device": device,
        "memory_available_gb": round(memory[0] / GB, 1),
        "memory_source": memory[1],
        "tokens_approximate": prompts.approximate,
    }
    return Plan(recipe.name, recipe.schedule.strategy, machine, modules, steps, asdict(measured) if measured else None)
