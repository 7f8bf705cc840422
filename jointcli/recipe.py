"""The recipe: a YAML file validated by pydantic, the single source of truth of a run.

    recipe = load_recipe("recipes/sst2.yaml", ["data.split.train=16"])

Every default lives in the models below (`extra="forbid"`: a typo is an error, never ignored).
Overrides are dotted `key=value` pairs applied to the YAML before validation, torchtune-style;
values are parsed as YAML scalars (`16` is an int, `true` a bool, `[a, b]` a list).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError

EMBEDDED_MODEL = "builtin:smollm2-135m-instruct"
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # package.module:name
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELDS = re.compile(r"^\s*([\w\s,:\[\]\.]+?)\s*->\s*([\w\s,:\[\]\.]+?)\s*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ---------------------------------------------------------------- data
class Split(Strict):
    train: int = Field(120, ge=0, description="training examples (optimizers, traces)")
    dev: int = Field(50, ge=1, description="examples that score each step")
    test: int = Field(100, ge=1, description="held-out examples, scored at the end")
    seed: int = Field(0, description="shuffle seed of the split; independent of the run seed "
                      "so that runs with different seeds share their test examples")


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
        return v


# ---------------------------------------------------------------- metric
class Metric(Strict):
    name: str = Field("exact_match", description="a built-in metric (exact_match, ...; the list is in metrics.py) "
                      "or package.module:function")
    field: str | None = Field(None, description="label field compared (default: the first label)")

    @field_validator("name")
    @classmethod
    def _metric_form(cls, v: str) -> str:
        # which built-ins exist is metrics.py's to say (metrics.check_metric_name, run by `validate`)
        if not re.fullmatch(r"\w+", v) and not _REF.match(v):
            raise ValueError(f"metric {v!r} must be a built-in metric's name or package.module:function")
        return v


# ---------------------------------------------------------------- models
class LocalModel(Strict):
    type: Literal["local"] = "local"
    path: str = Field(EMBEDDED_MODEL, description=f"{EMBEDDED_MODEL} or a Hugging Face checkpoint folder")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="inference dtype; auto: bf16 on CUDA and on CPUs with native bf16, else fp32 "
                            "(models/device.py)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_tokens: int = Field(64, ge=1, description="new tokens per completion")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")


class LiteLLMModel(Strict):
    type: Literal["litellm"]
    model: str = Field(description="a LiteLLM model string, e.g. openai/gpt-4o-mini")
    api_base: str | None = None
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the key")
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0.0)

    @field_validator("api_key_env")
    @classmethod
    def _env_name_not_key(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError("must be the NAME of an environment variable (like OPENAI_API_KEY), "
                             "never the key itself")
        return v


ModelSpec = Annotated[Union[LocalModel, LiteLLMModel], Field(discriminator="type")]


# ---------------------------------------------------------------- program
class Module(Strict):
    name: str = Field(pattern=r"^[A-Za-z_]\w*$")
    signature: str = Field(description="DSPy signature string, e.g. 'sentence -> sentiment'")
    type: Literal["predict", "chain_of_thought"] = "predict"
    instructions: str | None = None
    model: str = Field(description="name of an entry under `models`")

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
    models: dict[str, str] = Field(default_factory=dict,
                                   description="with `class`: predictor name -> model name")
    default_model: str | None = Field(None, description="with `class`: model of unmapped predictors")

    @model_validator(mode="after")
    def _one_kind(self) -> "Program":
        if bool(self.modules) == bool(self.class_):
            raise ValueError("give either `modules` or `class`, exactly one")
        if self.class_ and not _REF.match(self.class_):
            raise ValueError(f"class {self.class_!r} must look like package.module:Class")
        names = [m.name for m in self.modules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate module names: {', '.join(sorted(dup))}")
        return self


# ---------------------------------------------------------------- optimizers and schedule
class PromptOptimizer(Strict):
    type: Literal["prompt"]
    optimizer: str = Field("BootstrapFewShot", description="a DSPy prompt optimizer, by class name")
    args: dict[str, Any] = Field(default_factory=dict, description="passed to the optimizer's constructor")
    compile_args: dict[str, Any] = Field(default_factory=dict, description="passed to compile()")
    modules: list[str] | Literal["all"] = "all"
    reflection_model: str | None = Field(None, description="GEPA: name of the model that reflects")


class TraceSettings(Strict):
    """Where a weight step's training rows come from (the rows themselves: steps.traces.Traces)."""

    source: Literal["program+labels", "program", "teacher", "labels"] = Field(
        "program+labels", description="program+labels: the program's passing traces, and for each failed "
        "example the gold labels inside the current prompt of the modules that output them; program: passing "
        "traces only (BetterTogether); teacher: another model's passing traces; labels: the gold labels only "
        "(single-module programs)")
    teacher: str | None = Field(None, description="with source=teacher: a model name")
    threshold: float = Field(1.0, description="keep traces whose metric score is >= threshold")


class Lora(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1, description="usually 2x r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class Train(Strict):
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16, description="tokens per training row; longer rows are left out (counted)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="training dtype; auto: bf16 on bf16 GPUs, fp32 on every CPU (models/device.py)")


class WeightOptimizer(Strict):
    type: Literal["weight"]
    modules: list[str] | Literal["all"] = Field("all", description="modules on local models to fine-tune")
    traces: TraceSettings = TraceSettings()
    lora: Lora = Lora()
    train: Train = Train()
    adapters: Literal["per_module", "shared"] = Field(
        "per_module", description="one adapter per module, or one multitask adapter per base model")


OptimizerSpec = Annotated[Union[PromptOptimizer, WeightOptimizer], Field(discriminator="type")]


class Schedule(Strict):
    strategy: str = Field("p -> w -> p", description="step letters (keys of `optimizers`) joined by ->")
    patience: int | None = Field(None, ge=1, description="stop after this many steps without a better dev score")


class Runtime(Strict):
    num_threads: int = Field(16, ge=1, description="DSPy threads for evaluation and optimizers; the local engine "
                             "decodes their concurrent calls as one batch (up to 16 rows), so more threads give "
                             "bigger batches")
    cache: bool = Field(True, description="DSPy's LM cache")


# ---------------------------------------------------------------- the recipe
class Recipe(Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    seed: int = 0
    data: Data
    metric: Metric = Metric()
    program: Program
    models: dict[str, ModelSpec]
    optimizers: dict[str, OptimizerSpec] = Field(default_factory=dict)
    schedule: Schedule = Schedule()
    runtime: Runtime = Runtime()

    @model_validator(mode="after")
    def _references(self) -> "Recipe":
        for m in self.program.modules:
            if m.model not in self.models:
                raise ValueError(f"program.modules.{m.name}.model: unknown model {m.model!r}; "
                                 f"models are {', '.join(self.models) or 'none'}")
        for pred, model in self.program.models.items():
            if model not in self.models:
                raise ValueError(f"program.models.{pred}: unknown model {model!r}")
        if self.program.default_model and self.program.default_model not in self.models:
            raise ValueError(f"program.default_model: unknown model {self.program.default_model!r}")
        self._check_dataflow()
        self._check_optimizers()
        return self

    def _check_dataflow(self) -> None:
        if not self.program.modules:
            return
        known = set(self.data.inputs)
        for m in self.program.modules:
            ins, outs = m.fields()
            missing = [f for f in ins if f not in known]
            if missing:
                raise ValueError(f"program.modules.{m.name}.signature: inputs {missing} are neither "
                                 "data inputs nor outputs of an earlier module")
            known.update(outs)
        missing = [f for f in self.data.labels if f not in known]
        if missing:
            raise ValueError(f"data.labels: {missing} produced by no module of the program")
        if self.metric.field and self.metric.field not in self.data.labels:
            raise ValueError(f"metric.field: {self.metric.field!r} is not one of data.labels")

    def _check_optimizers(self) -> None:
        names = {m.name for m in self.program.modules}
        for key, opt in self.optimizers.items():
            if not re.fullmatch(r"[A-Za-z]\w*", key):
                raise ValueError(f"optimizers.{key}: names must be letters/words usable in a strategy")
            if opt.modules != "all" and names:
                unknown = [m for m in opt.modules if m not in names]
                if unknown:
                    raise ValueError(f"optimizers.{key}.modules: unknown modules {unknown}")
            for ref in (getattr(opt, "reflection_model", None),
                        getattr(getattr(opt, "traces", None), "teacher", None)):
                if ref and ref not in self.models:
                    raise ValueError(f"optimizers.{key}: unknown model {ref!r}")

    @property
    def label_field(self) -> str:
        return self.metric.field or self.data.labels[0]


# ---------------------------------------------------------------- loading
def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b.c=value` -> (['a','b','c'], parsed value)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise InputError(f"override {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.split("."), value))
    return out


def apply_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    """Set `path` in the raw YAML tree. Lists are indexed by number or by an item's `name`."""
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, text)
            if last:
                node[idx] = value
                return
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            node = node.setdefault(part, {})
        else:
            raise InputError(f"override {text}: {'.'.join(path[:i])} is a value, not a section")


def _list_index(items: list, part: str, text: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for idx, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return idx
    raise InputError(f"override {text}: no list item {part!r}")


def _format_error(source: str, err: ValidationError, overrides: dict[str, str]) -> str:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        origin = next((f" (override {t})" for k, t in overrides.items() if loc.startswith(k)), "")
        problems.append(f"{loc}: {msg}{origin}" if loc else msg)
    more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
    return f"{source}: {problems[0]}{more}"


def validate_recipe(tree: Any, source: str = "recipe", overrides: dict[str, str] | None = None) -> Recipe:
    if not isinstance(tree, dict):
        raise InputError(f"{source}: the recipe must be a YAML mapping of keys to values")
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise InputError(_format_error(source, err, overrides or {})) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is an InputError of one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}:{where} malformed YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(tree, dict):
        raise InputError(f"{path}: the recipe must be a YAML mapping of keys to values")
    texts = {}
    try:
        for keys, value in parse_overrides(overrides or []):
            text = f"{'.'.join(keys)}={value}"
            apply_override(tree, keys, value, text)
            texts[".".join(keys)] = text
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return validate_recipe(tree, str(path), texts)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
