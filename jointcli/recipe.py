"""The recipe: a YAML file validated by pydantic, the single source of truth of a run.

    recipe = load_recipe("recipes/sst2.yaml", ["data.split.train=16"])

Every default lives in the models below (`extra="forbid"`: a typo is an error, never ignored).
Overrides are dotted `key=value` pairs applied to the YAML before validation, torchtune-style;
values are parsed as YAML scalars (`16` is an int, `true` a bool, `[a, b]` a list).
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError

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


class Train(Strict):
    epochs: float = Field(2.0, gt=0)
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

    def identity(self, *exclude: str) -> dict:
        """The settings as JSON, for fingerprints; without a curriculum there is no such key, so the
        fingerprints of trainings made before it existed stay what they were."""
        skip = set(exclude) | ({"curriculum"} if self.curriculum is None else set())
        return self.model_dump(mode="json", exclude=skip)


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


OptimizerSpec = Annotated[PromptOptimizer | WeightOptimizer | SimultaneousOptimizer, Field(discriminator="type")]


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
        "decodes their concurrent calls as one batch (up to 16 rows), so more threads give "
        "bigger batches",
    )
    cache: bool = Field(True, description="DSPy's LM cache")


# ---------------------------------------------------------------- the recipe
class Recipe(Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    seed: int = Field(0, ge=0)
    data: Data
    metric: Metric = Metric()
    program: Program
    models: dict[str, ModelSpec]
    optimizers: dict[str, OptimizerSpec] = Field(default_factory=dict)
    schedule: Schedule = Schedule()
    runtime: Runtime = Runtime()

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        for m in self.program.modules:
            self._model_ref(f"program.modules.{m.name}.model", m.model)
        for pred, model in self.program.models.items():
            self._model_ref(f"program.models.{pred}", model)
        self._model_ref("program.default_model", self.program.default_model)
        self._check_dataflow()
        self._check_optimizers()
        return self

    def _model_ref(self, where: str, name: str | None) -> None:
        if name is not None and name not in self.models:
            raise ValueError(
                f"{where}: unknown model {name!r}; models are {', '.join(self.models) or 'none'}"
                f"{did_you_mean(name, self.models)}"
            )

    def _check_dataflow(self) -> None:
        if not self.program.modules:
            return
        known = set(self.data.inputs)
        for m in self.program.modules:
            ins, outs = m.fields()
            missing = [f for f in ins if f not in known]
            if missing:
                raise ValueError(
                    f"program.modules.{m.name}.signature: inputs {missing} are neither "
                    "data inputs nor outputs of an earlier module"
                )
            known.update(outs)
        missing = [f for f in self.data.labels if f not in known]
        if missing:
            raise ValueError(f"data.labels: {missing} produced by no module of the program")
        if self.metric.field and self.metric.field not in self.data.labels:
            raise ValueError(f"metric.field: {self.metric.field!r} is not one of data.labels")

    def _check_optimizers(self) -> None:
        # which modules an optimizer names is checks.py's (a `class` program's are known once imported)
        for key, opt in self.optimizers.items():
            if not re.fullmatch(r"[A-Za-z]\w*", key):
                raise ValueError(f"optimizers.{key}: names must be letters/words usable in a strategy")
            if key.lower() == "none":
                raise ValueError(f"optimizers.{key}: the name means zero-shot in a strategy; choose another")
            if isinstance(opt, PromptOptimizer):
                self._model_ref(f"optimizers.{key}.reflection_model", opt.reflection_model)
            else:
                self._model_ref(f"optimizers.{key}.traces.teacher", opt.traces.teacher)

    @property
    def label_field(self) -> str:
        return self.metric.field or self.data.labels[0]


# ---------------------------------------------------------------- one-line errors
def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean 'args'?' for the choice closest to a mistyped `word` (case aside), else ''."""
    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(word).lower(), by_lower, n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def _members(tp: Any) -> list:
    """The alternatives of a type: its members for a Union (None aside), else the type itself."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        return [m for arg in get_args(tp) if arg is not type(None) for m in _members(arg)]
    return [tp]


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _below(tp: Any, key: str) -> Any:
    """The type one key below `tp`: a section's field, a list's item, a mapping's value; None if unknown."""
    if _is_section(tp):
        return next((f.annotation for name, f in tp.model_fields.items() if key in (name, f.alias)), None)
    if get_origin(tp) in (list, dict):
        return get_args(tp)[-1]
    return None


def _tag(tp: Any) -> str | None:
    """The `type` value that selects a section in a union (PromptOptimizer: 'prompt')."""
    field = tp.model_fields.get("type") if _is_section(tp) else None
    return get_args(field.annotation)[0] if field and get_origin(field.annotation) is Literal else None


def _recipe_keys(loc: tuple) -> tuple[list[str], list[str]]:
    """(the recipe key path of a pydantic error location, without the union alternatives pydantic
    names in it, like 'prompt' or 'list[str]'; the keys the section holding its last key may have)."""
    tp: Any = Recipe
    path, keys = [], []
    for part in (str(p) for p in loc if not str(p).startswith(("function-", "tagged-union"))):
        options = _members(tp)
        if len(options) > 1:  # the part names the alternative pydantic tried, not a key
            tp = next((m for m in options if _tag(m) == part), None)
            continue
        keys = [f.alias or name for name, f in options[0].model_fields.items()] if _is_section(options[0]) else []
        path.append(part)
        tp = _below(options[0], part)
    return path, keys


def _problems(err: ValidationError) -> dict[str, list[str]]:
    """Recipe key path -> what is wrong there; a union's alternatives report at the same key."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        path, keys = _recipe_keys(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(path[-1], keys)
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # models.*.type, optimizers.*.type
            path.append("type")
            msg = _tag_message(e["ctx"]) if e["type"] == "union_tag_invalid" else "Field required"
        problems.setdefault(".".join(path), []).append(msg)
    return problems


def _tag_message(ctx: dict) -> str:
    tags = [t.strip(" '") for t in ctx["expected_tags"].split(",")]
    return f"{ctx['tag']!r} is not one of {ctx['expected_tags']}{did_you_mean(ctx['tag'], tags)}"


def _one_of(messages: list[str]) -> str:
    """'Input should be a valid list' + "Input should be 'all'" -> "Input should be a valid list or 'all'"."""
    lead = "Input should be "
    if len(messages) > 1 and all(m.startswith(lead) for m in messages):
        return lead + " or ".join(m.removeprefix(lead) for m in messages)
    return "; ".join(messages)


def _override_of(loc: str, overrides: dict[str, str]) -> str:
    """' (override a.b=1)' when an override set `loc`, a section above it or a key below it."""
    for key, text in overrides.items():
        if loc and (loc == key or loc.startswith(key + ".") or key.startswith(loc + ".")):
            return f" (override {text})"
    return ""


def _format_error(source: str, err: ValidationError, overrides: dict[str, str]) -> str:
    lines = [
        f"{loc}: {_one_of(msgs)}{_override_of(loc, overrides)}" if loc else _one_of(msgs)
        for loc, msgs in _problems(err).items()
    ]
    more = f" (and {len(lines) - 1} more: {'; '.join(lines[1:])})" if len(lines) > 1 else ""
    return f"{source}: {lines[0]}{more}"


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
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # 'sentence: str -> label' is a string; a section or list needs {...} or [...]
        out.append((key.split("."), value))
    return out


def apply_override(tree: dict, path: list[str], value: Any, text: str) -> list[str]:
    """Set `path` in the raw YAML tree. Lists are indexed by number or by an item's `name`. Returns
    the path with list items as indexes (`program.modules.0.model`), as validation errors name it."""
    node: Any = tree
    resolved = []
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, text)
            resolved.append(str(idx))
            if last:
                node[idx] = value
            node = node[idx]
        elif isinstance(node, dict):
            resolved.append(part)
            if last:
                node[part] = value
            node = node.setdefault(part, {})
        else:
            raise InputError(f"override {text}: {'.'.join(path[:i])} is a value, not a section")
    return resolved


def _list_index(items: list, part: str, text: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    names = [str(item["name"]) for item in items if isinstance(item, dict) and "name" in item]
    if part in names:
        return names.index(part)
    if not items:
        raise InputError(f"override {text}: no list item {part!r}; the list is empty")
    by_name = f", or by name: {', '.join(names)}" if names else ""
    raise InputError(f"override {text}: no list item {part!r}; its items are 0 to {len(items) - 1}{by_name}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error (PyYAML
    would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports an unhashable key itself
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def validate_recipe(tree: Any, source: str = "recipe", overrides: dict[str, str] | None = None) -> Recipe:
    if not isinstance(tree, dict):
        raise InputError(f"{source}: the recipe must be a YAML mapping of keys to values")
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise InputError(_format_error(source, err, overrides or {})) from None


def _read_yaml(path: Path) -> Any:
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a recipe file")
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}:{where} malformed YAML: {getattr(err, 'problem', err)}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is an InputError of one line."""
    path = Path(path)
    tree = _read_yaml(path)
    if not isinstance(tree, dict):
        raise InputError(f"{path}: the recipe must be a YAML mapping of keys to values")
    texts = {}
    try:
        for keys, value in parse_overrides(overrides or []):
            text = f"{'.'.join(keys)}={value}"
            texts[".".join(apply_override(tree, keys, value, text))] = text
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return validate_recipe(tree, str(path), texts)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
