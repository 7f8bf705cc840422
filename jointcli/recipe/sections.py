"""The sections of a recipe other than its optimizers: data, metric, models, program, schedule, runtime.

Every default lives here (`extra="forbid"`: a typo is an error, never ignored).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODEL = "builtin:smollm2-135m-instruct"
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # package.module:name
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELDS = re.compile(r"^\s*([\w\s,:\[\]\.]+?)\s*->\s*([\w\s,:\[\]\.]+?)\s*$")


class Strict(BaseModel):
    # nan and inf are never meant (a threshold of nan keeps no trace)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


# ---------------------------------------------------------------- data
class Split(Strict):
    train: int = Field(120, ge=0, description="training examples (optimizers, traces)")
    dev: int = Field(50, ge=1, description="examples that score each step")
    test: int = Field(100, ge=1, description="held-out examples, scored at the end")
    seed: int = Field(
        0,
        ge=0,
        description="shuffle seed of the split; independent of the run seed "
        "so that runs with different seeds share their test examples",
    )


class Data(Strict):
    source: str = Field(description="a built-in data set (builtin:NAME; the list is in data.py) or a .jsonl/.csv path")
    inputs: list[str] = Field(description="fields given to the program")
    labels: list[str] = Field(description="fields the program must produce")
    split: Split = Split()

    @field_validator("source")
    @classmethod
    def _source_form(cls, v: str) -> str:
        # which built-ins exist is data.py's to say (data.check_source, run by `validate`)
        if not v.startswith("builtin:") and Path(v).suffix.lower() not in (".jsonl", ".csv"):
            raise ValueError(f"data file {v!r} must end in .jsonl or .csv")
        return v

    @field_validator("inputs", "labels")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one field")
        if len(set(v)) < len(v):
            raise ValueError(f"names a field twice: {v}")
        return v

    @model_validator(mode="after")
    def _inputs_are_not_labels(self) -> Data:
        both = [f for f in self.labels if f in self.inputs]
        if both:
            raise ValueError(f"{both} are both inputs and labels: the program would be given the answer")
        return self


# ---------------------------------------------------------------- metric
class Metric(Strict):
    name: str = Field(
        "exact_match",
        description="a built-in metric (exact_match, ...; the list is in metrics.py) or package.module:function",
    )
    field: str | None = Field(None, description="label field compared (default: the first label)")

    @field_validator("name")
    @classmethod
    def _metric_form(cls, v: str) -> str:
        # which built-ins exist is metrics.py's to say (metrics.check_metric_name, run by `validate`)
        if not re.fullmatch(r"\w+", v) and not _REF.match(v):
            raise ValueError(f"metric {v!r} must be a built-in metric's name or package.module:function")
        return v


# ---------------------------------------------------------------- models
class EngineLimits(Strict):
    """How much the in-process engine of a local model takes on at once: memory against speed
    (inference/). Models on one checkpoint, dtype and device share one engine, and so its limits."""

    max_batch: int = Field(
        16,
        ge=1,
        description="concurrent greedy requests decoded together as one batch; 1 turns batching off. "
        "Fewer rows: less memory for the key/value cache, fewer answers per second",
    )
    prefill_tokens: int = Field(
        8192,
        ge=1,
        description="rows x padded prompt length fed in one forward pass: bounds the activation memory "
        "of a batch's first pass (a batch over it is decoded as several smaller ones)",
    )
    prefix_cache_tokens: int = Field(
        8192,
        ge=0,
        description="prompt-prefix tokens whose key/value tensors are kept for later calls "
        "(~190 MB in bf16 for SmolLM2-135M); 0 keeps only the newest prefix",
    )


class LocalModel(Strict):
    type: Literal["local"] = "local"
    path: str = Field(EMBEDDED_MODEL, description=f"{EMBEDDED_MODEL} or a Hugging Face checkpoint folder")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="inference dtype; auto: bf16 on CUDA and on CPUs with native bf16, else fp32 (weights/device.py)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_tokens: int = Field(64, ge=1, description="new tokens per completion")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    limits: EngineLimits = Field(
        EngineLimits(), description="the engine's batch limits: lower them when it runs out of memory"
    )


class LiteLLMModel(Strict):
    type: Literal["litellm"]
    model: str = Field(description="a LiteLLM model string, e.g. openai/gpt-4o-mini")
    api_base: str | None = None
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the key")
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    timeout: float | None = Field(None, gt=0, description="seconds to wait for one answer (default: the client's)")
    num_retries: int = Field(
        3,
        ge=0,
        description="retries of a call that failed for a passing reason (no "
        "connection, timeout, HTTP 429 or 5xx), 1, 2, 4, ... s apart: DSPy's default",
    )

    @field_validator("api_key_env")
    @classmethod
    def _env_name_not_key(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError("must be the NAME of an environment variable (like OPENAI_API_KEY), never the key itself")
        return v


ModelSpec = Annotated[LocalModel | LiteLLMModel, Field(discriminator="type")]


# ---------------------------------------------------------------- program
class Module(Strict):
    name: str = Field(pattern=r"^[A-Za-z_]\w*$")
    signature: str = Field(description="DSPy signature string, e.g. 'sentence -> sentiment'")
    type: Literal["predict", "chain_of_thought"] = "predict"
    instructions: str | None = None
    model: str = Field(description="name of an entry under `models`")
    adapter: Literal["chat", "text"] = Field(
        "chat",
        description="how the module talks to its model: chat = DSPy's ChatAdapter ([[ ## field ## ]] "
        "markers); text = plain chat, the instructions and `Field: value` lines in, the whole answer out as the "
        "one output field (a `predict` module with one free-text output, on a model too small to follow the "
        "markers); its demos and fine-tune rows are in the same plain format",
    )

    @field_validator("signature")
    @classmethod
    def _arrow(cls, v: str) -> str:
        if not _FIELDS.match(v):
            raise ValueError(f"signature {v!r} must look like 'input1, input2 -> output'")
        return v

    def fields(self) -> tuple[list[str], list[str]]:
        """(input names, output names) of the signature string."""
        left, right = _FIELDS.match(self.signature).groups()
        names = lambda side: [p.split(":")[0].strip() for p in side.split(",") if p.strip()]  # noqa: E731
        return names(left), names(right)


class Program(Strict):
    modules: list[Module] = Field(default_factory=list, description="run in order")
    class_: str | None = Field(None, alias="class", description="package.module:Class of your own dspy.Module")
    models: dict[str, str] = Field(default_factory=dict, description="with `class`: predictor name -> model name")
    default_model: str | None = Field(None, description="with `class`: model of unmapped predictors")

    @model_validator(mode="after")
    def _one_kind(self) -> Program:
        if bool(self.modules) == bool(self.class_):
            raise ValueError("give either `modules` or `class`, exactly one")
        if self.class_ and not _REF.match(self.class_):
            raise ValueError(f"class {self.class_!r} must look like package.module:Class")
        names = [m.name for m in self.modules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate module names: {', '.join(sorted(dup))}")
        return self


class Select(Strict):
    """How to choose the step to ship among the dev-scored ones (selection.py); the names are checked
    in checks.py. Costs are per dev example: tokens (prompt + completion), seconds (uncached calls);
    parameters: the trainable LoRA parameters of the program as of the step."""

    maximize: str | None = Field(
        None,
        description="one objective: score, -tokens, -seconds or -parameters (default: score, unless weights are given)",
    )
    weights: dict[str, float] | None = Field(
        None, description="instead of maximize: the weighted sum to maximize, e.g. {score: 1.0, tokens: -0.001}"
    )
    constraints: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="upper bounds on costs, e.g. {tokens: 300}; a step over one is no "
        "candidate (none left: the best dev score, with a warning)",
    )

    @model_validator(mode="after")
    def _one_objective(self) -> Select:
        if self.maximize is not None and self.weights is not None:
            raise ValueError("give maximize or weights, not both")
        return self


class Schedule(Strict):
    strategy: str = Field("p -> w -> p", description="step letters (keys of `optimizers`) joined by ->")
    patience: int | None = Field(None, ge=1, description="stop after this many steps without a better dev score")
    select: Select | None = Field(None, description="how to choose the step to ship (default: the best dev score)")


class Runtime(Strict):
    num_threads: int = Field(
        16,
        ge=1,
        description="DSPy threads for evaluation and optimizers; the local engine "
        "decodes their concurrent calls as one batch (up to models.<name>.limits.max_batch rows), "
        "so more threads give bigger batches",
    )
    cache: bool = Field(True, description="DSPy's LM cache")
    max_errors: int = Field(
        1000,
        ge=1,
        description="failed examples (a small model's unparsable answers among them) a DSPy optimizer "
        "tolerates before it stops, where its args set no max_errors (DSPy's own default is 10)",
    )
    max_error_rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="the share of an evaluation's examples whose program or metric may raise (an error, not "
        "an answer that did not parse) before its step fails: a bug in a metric stops the run at its first "
        "evaluation instead of scoring 0 on those examples",
    )


# ---------------------------------------------------------------- tracking
class MlflowTracking(Strict):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://HOST:PORT, sqlite:///PATH, ...); "
        "default $MLFLOW_TRACKING_URI, else sqlite:///<runs root>/mlflow.db",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment; default $MLFLOW_EXPERIMENT_NAME, else the recipe's name"
    )


class Tracking(Strict):
    """Where runs are reported (jointcli/tracking/); not part of what a run computes, so not frozen with it."""

    mlflow: MlflowTracking | None = Field(
        None, description="log runs, their steps and sweeps to MLflow (pip install 'jointopt[mlflow]'); also --track"
    )
    adapters: bool = Field(False, description="also log the LoRA adapters of weight steps as artifacts")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean 'args'?' for the choice closest to a mistyped `word` (case aside), else ''."""
    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(word).lower(), by_lower, n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""
