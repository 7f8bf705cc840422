"""The `optimizers:` section of a recipe: prompt, weight and simultaneous (s) optimizers, and their
training settings (lora:, train:, traces:)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .sections import Strict


# ---------------------------------------------------------------- optimizers and schedule
class PromptOptimizer(Strict):
    type: Literal["prompt"]
    optimizer: str = Field("BootstrapFewShot", description="a DSPy prompt optimizer, by class name")
    args: dict[str, Any] = Field(default_factory=dict, description="passed to the optimizer's constructor")
    compile_args: dict[str, Any] = Field(default_factory=dict, description="passed to compile()")
    modules: list[str] | Literal["all"] = "all"
    reflection_model: str | None = Field(None, description="GEPA: name of the model that reflects")
    prompt_model: str | None = Field(
        None, description="MIPROv2, COPRO, SIMBA: name of the model that proposes instructions (default: the module's)"
    )
    task_model: str | None = Field(
        None, description="MIPROv2: name of the model that runs the program while it optimizes (default: the module's)"
    )


class TraceSettings(Strict):
    """Where a weight step's training rows come from (the rows themselves: steps.traces.Traces)."""

    source: Literal["program+labels", "program", "teacher", "labels"] = Field(
        "program+labels",
        description="program+labels: the program's passing traces, and for each failed "
        "example the gold labels inside the current prompt of the modules that output them; program: passing "
        "traces only (BetterTogether); teacher: another model's passing traces; labels: the gold labels only "
        "(single-module programs)",
    )
    teacher: str | None = Field(None, description="with source=teacher: a model name")
    threshold: float = Field(1.0, description="keep traces whose metric score is >= threshold")


class Lora(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1, description="usually 2x r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v: list[str] | str) -> list[str] | str:
        if not v:
            raise ValueError("must name at least one module, or be all-linear")
        return v


class Curriculum(Strict):
    """Easy rows first (training/curriculum.py): the rows ranked by difficulty, the optimizer steps cut into
    `stages` equal parts; stage k draws its rows from the easiest k/stages of them, the last from all."""

    by: Literal["loss", "length"] = Field(
        description="difficulty: the model's loss per completion token on "
        "the row before training, or the row's length in tokens"
    )
    stages: int = Field(3, ge=2, le=20)
    balance: bool = Field(
        True,
        description="rank rows within each answer (when answers repeat, as labels do) "
        "and interleave them, so that every stage keeps the answers' shares; false: one "
        "ranking, which on a biased model can sort the rows by label",
    )


# Computed tokens per micro-batch when train.token_budget is null, by device and training dtype: rows x
# the longest row (with a shared prefix: the prefix once + rows x the longest suffix). The CPU budget
# keeps `make run` within 3 GB: on sst2 (a ~370-token shared prefix, ~90-token suffixes) 512 tokens hold
# the prefix and one or two rows: activations ~1.0 GB against ~2.2 GB at 1024, for ~6% more training
# time (docs/performance.md, Memory).
TOKEN_BUDGET = {"cpu": {"bfloat16": 512, "float32": 512}, "cuda": {"bfloat16": 8192, "float32": 4096}}

# Train's settings of how a step is computed and how often it is saved, not of what is trained: a
# fingerprint that must tell them apart (a resume's: the micro-batches fix the order of float additions)
# adds them itself
_HOW_NOT_WHAT = frozenset({"token_budget", "save_steps", "share_prefix"})
_LENGTH = frozenset({"epochs", "steps", "min_steps"})  # the training's length: identity() writes it as resolved

# The training length when a recipe sets neither epochs nor steps: 2 epochs, and at least MIN_STEPS
# optimizer steps, so that a small data set still gets enough updates. Chosen on dev, 60 rows of 8 a step
# (docs/your-own-task.md): 8 steps answered one label on every task; on the task the model can learn,
# 24 steps reached 0.62 and 48 steps 0.85; on RTE and BoolQ no length beat the majority class
DEFAULT_EPOCHS = 2.0
MIN_STEPS = 48


class Train(Strict):
    epochs: float | None = Field(
        None,
        gt=0,
        description="passes over the rows (the last step of an epoch may be short); null, with steps null too: "
        f"{DEFAULT_EPOCHS:g} epochs and at least min_steps optimizer steps",
    )
    steps: int | None = Field(
        None, ge=1, description="optimizer steps, instead of epochs: the rows are reshuffled at each pass"
    )
    min_steps: int = Field(
        MIN_STEPS,
        ge=1,
        description="with neither epochs nor steps set, the fewest optimizer steps: a small data set trains "
        "for more epochs (60 rows of 8 a step: 48 steps, 6 epochs); epochs or steps, once set, are taken as "
        "they are",
    )
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16, description="tokens per training row; longer rows are left out (counted)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="training dtype; auto: bf16 on bf16 GPUs, fp32 on every CPU (weights/device.py)"
    )
    processes: int = Field(
        1,
        ge=1,
        description="data-parallel training processes (one per GPU on CUDA); each "
        "optimizer step's rows are shared out and the gradients summed (training/data_parallel.py)",
    )
    curriculum: Curriculum | None = Field(
        None,
        description="order the rows easy to hard in stages, e.g. "
        "{by: loss, stages: 3}; none: a fresh shuffle every epoch",
    )
    token_budget: int | None = Field(
        None,
        ge=1,
        description="computed tokens per micro-batch: bounds activation memory, never changes the optimizer "
        "step (batch_size x grad_accum rows); lower it when training runs out of memory; null: 512 on CPU, "
        "8192 (bf16) or 4096 (fp32) on a GPU",
    )
    save_steps: int = Field(
        20, ge=1, description="a checkpoint to resume from every this many optimizer steps: the most a killed run loses"
    )
    share_prefix: bool = Field(
        True,
        description="compute the prompt prefix that a step's rows share once per step (same loss and "
        "gradient, fewer tokens computed); false: every row runs whole",
    )

    @model_validator(mode="after")
    def _one_length(self) -> Train:
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"give epochs ({self.epochs:g}) or steps ({self.steps}), not both")
        return self

    def optimizer_steps(self, rows: int) -> int:
        """How many optimizer steps a training on `rows` rows takes: steps, or epochs x the steps of an epoch
        (batch_size x grad_accum rows each), or with neither set the default (DEFAULT_EPOCHS, at least min_steps).

        >>> Train().optimizer_steps(60), Train().optimizer_steps(400), Train(epochs=1).optimizer_steps(60)
        (48, 100, 8)
        >>> Train(steps=40).optimizer_steps(60), Train(min_steps=1).optimizer_steps(60)
        (40, 16)
        """
        per_epoch = math.ceil(rows / (self.batch_size * self.grad_accum))
        if self.steps is not None:
            return self.steps
        by_epochs = max(1, math.ceil((self.epochs or DEFAULT_EPOCHS) * per_epoch - 1e-9))
        return by_epochs if self.epochs is not None else max(by_epochs, self.min_steps)

    def identity(self, *exclude: str, rows: int | None = None) -> dict:
        """The settings that say what is trained, as JSON, for fingerprints: without token_budget,
        save_steps and share_prefix, and without a curriculum key when there is none (so a fingerprint
        names the same training whatever those are set to). The length is written as it resolves: steps
        when set, else epochs (DEFAULT_EPOCHS when null), and with `rows` also the steps that min_steps
        adds, if it adds any: a training that min_steps does not lengthen keeps the identity it had
        before train.steps and train.min_steps existed."""
        skip = set(exclude) | _HOW_NOT_WHAT | _LENGTH | ({"curriculum"} if self.curriculum is None else set())
        out = self.model_dump(mode="json", exclude=skip)
        if self.steps is not None:
            return {**out, "steps": self.steps}
        out["epochs"] = self.epochs if self.epochs is not None else DEFAULT_EPOCHS
        if self.epochs is None and rows is not None:
            floored = self.optimizer_steps(rows)
            if floored > Train(
                epochs=out["epochs"], batch_size=self.batch_size, grad_accum=self.grad_accum
            ).optimizer_steps(rows):
                out["steps"] = floored
        return out

    def micro_batch_tokens(self, device: str, dtype: str) -> int:
        """token_budget, or when it is null the default for this device ("cpu", "cuda") and training dtype.

        >>> Train().micro_batch_tokens("cpu", "float32"), Train(token_budget=400).micro_batch_tokens("cpu", "float32")
        (512, 400)
        """
        return self.token_budget or TOKEN_BUDGET[device][dtype]


class WeightOptimizer(Strict):
    type: Literal["weight"]
    modules: list[str] | Literal["all"] = Field("all", description="modules on local models to fine-tune")
    traces: TraceSettings = TraceSettings()
    lora: Lora = Lora()
    train: Train = Train()
    adapters: Literal["per_module", "shared"] = Field(
        "per_module", description="one adapter per module, or one multitask adapter per base model"
    )


class SoftPrompt(Strict):
    virtual_tokens: int = Field(8, ge=1, le=256, description="trainable embeddings put before the module's prompt")
    init: Literal["instructions", "random"] = Field(
        "instructions",
        description="instructions: the embeddings of the module's instruction tokens (repeated "
        "or cut to virtual_tokens); random: of vocabulary tokens drawn with the seed",
    )


class ParamGroup(Strict):
    learning_rate: float | None = Field(
        None,
        gt=0,
        description="peak learning rate of the group (linear decay to 0); lora's default: train.learning_rate",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    l2: float = Field(0.0, ge=0, description="L2 penalty in the objective: l2 x the group's sum of squares")


class Groups(Strict):
    lora: ParamGroup = ParamGroup()
    soft_prompt: ParamGroup = ParamGroup(learning_rate=3e-3)


class SimultaneousOptimizer(WeightOptimizer):
    """The `s` step: a soft prompt (PEFT prompt tuning) and a LoRA adapter trained in the same backward
    pass, on the rows a weight step would train on; two parameter groups with their own settings."""

    type: Literal["simultaneous"]
    soft_prompt: SoftPrompt = SoftPrompt()
    groups: Groups = Groups()

    @property
    def lora_rate(self) -> float:
        """The LoRA group's peak learning rate: groups.lora.learning_rate, else train.learning_rate."""
        return self.groups.lora.learning_rate or self.train.learning_rate


class ReinforceOptimizer(WeightOptimizer):
    """The `g` step: GRPO from the metric (training/grpo.py). Each step rolls out train.batch_size x
    train.grad_accum training examples group_size times at `temperature`, scores every rollout with the
    metric and updates each module's adapter `iterations` times on the group-relative advantages;
    train.steps (or train.epochs over the training examples) says how many such steps."""

    type: Literal["reinforce"]
    group_size: int = Field(4, ge=2, description="rollouts of each example: its group")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    iterations: int = Field(1, ge=1, description="optimizer steps on each batch of rollouts (TRL's num_iterations)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="the ratio is clipped to [1 - epsilon, 1 + epsilon]")
    beta: float = Field(0.0, ge=0, description="weight of the KL term to the adapter the step starts from")
    format_failure: float = Field(0.0, description="reward of a rollout whose answer did not parse")

    @model_validator(mode="after")
    def _no_traces(self) -> ReinforceOptimizer:
        if self.traces != TraceSettings():  # the default is written back into a run's recipe.yaml
            raise ValueError("traces does not apply: a reinforce optimizer learns from its own rollouts")
        return self


OptimizerSpec = Annotated[
    PromptOptimizer | WeightOptimizer | SimultaneousOptimizer | ReinforceOptimizer, Field(discriminator="type")
]
