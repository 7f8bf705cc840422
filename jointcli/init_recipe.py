"""`jointopt init`: a commented recipe for a data file or a built-in data set, which runs as written.

    made = make_recipe("reviews.jsonl", inputs=None, labels=None, name=None)
    made.text            # the recipe's YAML, with comments; write_recipe(made, Path("reviews.yaml"), force=False)

    >>> rows = [{"id": str(i), "review": f"text {i}", "label": "pos" if i % 3 else "neg"} for i in range(40)]
    >>> choose_fields("reviews.jsonl", rows, inputs=None, labels=None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    jointcli.errors.InputError: reviews.jsonl: field 'id' looks like an identifier ...: --inputs review ...
    >>> fields = choose_fields("reviews.jsonl", rows, inputs=["review"], labels=None)
    >>> fields.inputs, fields.labels, fields.kind, fields.values
    (['review'], ['label'], 'labels', {'pos': 26, 'neg': 14})
    >>> split_sizes(300), split_sizes(872), split_sizes(60)
    ((120, 75, 75), (120, 100, 100), (30, 15, 15))

What it decides, and from what:
- the fields: a built-in's own (data.BUILTIN_FIELDS); in a file, the label is the one field whose
  values are label-like (2 to answers.MAX_LABELS distinct values, repeated), the inputs every other
  field. `--labels` and `--inputs` choose others; when the choice is not clear (no label-like field or
  several, a field that looks like an identifier), it asks for them: one line, exit code 2, no file;
- the split: dev and test a quarter of the rows each (at most 100), train the rest (at most 120);
- the instructions: they name the label values when the labels are a small set (a small model
  answers the words its prompt names);
- the metric: exact_match for labels, numeric when every answer is a number, f1 for free text;
- the optimizers: the quickstart's (recipes/sst2.yaml), the weight steps' length in optimizer steps:
  one epoch, at least train.min_steps.
The recipe is checked as `jointopt validate` checks it before it is written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .answers import MAX_LABELS
from .checks import check_recipe
from .data import BUILTIN_FIELDS, check_source, load_rows
from .errors import InputError
from .files import write_atomic
from .metrics import last_number, normalize_exact
from .recipe import EMBEDDED_MODEL, validate_recipe
from .recipe.optimizers import MIN_STEPS
from .recipe.schema import NAME_MAX, check_run_name

MAX_TRAIN, MAX_HELD_OUT = 120, 100  # the quickstart's split: enough to tell steps apart, minutes per step
BATCH = 8  # rows an optimizer step, as the quickstart
DEMOS = 4  # labeled demos of the prompt step, as the quickstart: a training row holds them and its example
# A training row in DSPy's ChatAdapter format, in characters: the system message (fields, format,
# instructions) ~700, and per example its values and ~30 of markers a field; ~3.5 characters a token
ROW_OVERHEAD, FIELD_MARKERS, CHARS_PER_TOKEN = 700, 30, 3.5
MAX_LENGTH = 1024  # train.max_length's default: longer rows are left out of the training
_ID_NAME = re.compile(r"(?i)^(id|idx|index|key|uid|uuid|guid|row|.*_id)$")


@dataclass
class Fields:
    """What `jointopt init` made of the data's fields."""

    inputs: list[str]
    labels: list[str]
    kind: str  # of the first label: "labels" (a small set), "numeric" or "text"
    values: dict[str, int] | None  # labels: each value (as written in the data) and its rows, most first
    longest: str  # the longest answer of the first label, for max_tokens


@dataclass
class Made:
    """A recipe made by make_recipe: its YAML text and what it was made from."""

    text: str
    name: str
    fields: Fields
    split: tuple[int, int, int]
    rows: int
    row_tokens: int = 0  # a training row with DEMOS demos, at the 90th percentile of the examples' lengths


# ---------------------------------------------------------------- the fields
def _label_values(rows: list[dict], field: str) -> dict[str, int] | None:
    """The values of `field` and their counts when they are label-like (answers.py's rule: at most
    MAX_LABELS distinct values, fewer than the rows), the first spelling of each; else None."""
    counts: dict[str, int] = {}
    spelling: dict[str, str] = {}
    for row in rows:
        value = row.get(field)
        if value is None or isinstance(value, (dict, list)):
            return None
        key = normalize_exact(value)
        spelling.setdefault(key, str(value))
        counts[spelling[key]] = counts.get(spelling[key], 0) + 1
    if not 2 <= len(counts) <= MAX_LABELS or len(counts) * 2 > len(rows):
        return None
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _looks_like_id(rows: list[dict], field: str) -> str | None:
    """Why `field` looks like an identifier (its name, or a different whole number in every row), or None."""
    if _ID_NAME.match(field):
        return "by its name"
    values = [row.get(field) for row in rows]
    if (
        len(rows) > 2
        and all(re.fullmatch(r"-?\d+", str(v)) for v in values)
        and len(set(map(str, values))) == len(rows)
    ):
        return "every value a different number"
    return None


def _known(source: str, fields: list[str], names: list[str], flag: str) -> list[str]:
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise InputError(
            f"{flag}: {source} has no field {', '.join(map(repr, unknown))} (its fields: {', '.join(fields)})"
        )
    return names


def _pick_labels(source: str, rows: list[dict], fields: list[str], inputs: list[str] | None) -> list[str]:
    """The one label-like field among those that are not inputs; InputError asking for --labels otherwise."""
    candidates = [f for f in fields if f not in (inputs or []) and _label_values(rows, f) is not None]
    if len(candidates) == 1:
        return candidates
    which = f"several fields are label-like ({', '.join(candidates)})" if candidates else "no field is label-like"
    raise InputError(
        f"{source}: which field is the answer? {which}; name it: --labels FIELD (fields: {', '.join(fields)})"
    )


def _pick_inputs(source: str, rows: list[dict], fields: list[str], labels: list[str]) -> list[str]:
    """Every field that is not a label, unless one looks like an identifier: then InputError asking for --inputs."""
    rest = [f for f in fields if f not in labels]
    if not rest:
        raise InputError(f"{source}: no field is left for the inputs (fields: {', '.join(fields)})")
    for field in rest:
        if why := _looks_like_id(rows, field):
            others = [f for f in rest if f != field]
            hint = f"--inputs {','.join(others)} (or --inputs {','.join(rest)})" if others else f"--inputs {field}"
            raise InputError(f"{source}: field {field!r} looks like an identifier ({why}); name the inputs: {hint}")
    return rest


def choose_fields(source: str, rows: list[dict], inputs: list[str] | None, labels: list[str] | None) -> Fields:
    """The inputs and labels (the flags', a built-in's, or what the data makes clear; see the module's
    docstring) and the kind of the first label."""
    if not rows:
        raise InputError(f"{source}: no rows")
    fields = list(rows[0])
    builtin = BUILTIN_FIELDS.get(source)
    if labels is None and builtin and inputs is None:
        inputs, labels = list(builtin[0]), list(builtin[1])
    labels = _known(source, fields, labels, "--labels") if labels else _pick_labels(source, rows, fields, inputs)
    inputs = _known(source, fields, inputs, "--inputs") if inputs else _pick_inputs(source, rows, fields, labels)
    if both := [f for f in labels if f in inputs]:
        raise InputError(
            f"--inputs, --labels: {', '.join(both)} cannot be both (the program would be given the answer)"
        )
    first = labels[0]
    answers = [str(row.get(first, "")) for row in rows]
    values = _label_values(rows, first)
    if values is not None:
        kind = "labels"
    elif all(last_number(a) is not None and re.fullmatch(r"\s*-?[\d.,]+\s*", a) for a in answers):
        kind = "numeric"
    else:
        kind = "text"
    return Fields(inputs, labels, kind, values, max(answers, key=len))


# ---------------------------------------------------------------- the numbers
def split_sizes(rows: int) -> tuple[int, int, int]:
    """(train, dev, test): dev and test a quarter of the rows each, at most MAX_HELD_OUT; train the rest,
    at most MAX_TRAIN (more rows: longer steps, and the quickstart learns from 120)."""
    if rows < 4:
        raise InputError(f"{rows} rows: a train, dev and test split needs at least 4")
    held_out = min(MAX_HELD_OUT, rows // 4)
    return min(MAX_TRAIN, rows - 2 * held_out), held_out, held_out


def max_tokens(label: str, longest: str) -> tuple[int, str]:
    """(new tokens an answer needs, the answer it was sized on): DSPy's markers around the longest answer,
    about 2.5 characters a token, and room for the end."""
    text = f"[[ ## {label} ## ]]\n{longest}\n\n[[ ## completed ## ]]"
    return min(512, max(16, math.ceil(len(text) / 2.5) + 4)), text


def row_tokens(rows: list[dict], fields: list[str], demos: int = DEMOS) -> int:
    """About how many tokens a training row takes (a prompt with `demos` demos, the example and its answer),
    with examples of the 90th percentile of the data's lengths.

    >>> row_tokens([{"q": "x" * 300, "a": "yes"}] * 10, ["q", "a"])  # (700 + 5 x 363) / 3.5
    719
    """
    lengths = sorted(sum(len(str(row.get(f, ""))) + FIELD_MARKERS for f in fields) for row in rows)
    typical = lengths[min(len(lengths) - 1, int(len(lengths) * 0.9))]
    return math.ceil((ROW_OVERHEAD + (demos + 1) * typical) / CHARS_PER_TOKEN)


def max_length(tokens: int) -> int | None:
    """train.max_length for rows of about `tokens` tokens, with room (a multiple of 256), when the default
    (MAX_LENGTH) would leave many of them out; None otherwise.

    >>> max_length(800), max_length(1741)
    (None, 2048)
    """
    wanted = math.ceil(tokens * 1.15 / 256) * 256
    return wanted if wanted > MAX_LENGTH else None


def train_steps(train: int) -> int:
    """Optimizer steps of the weight steps: one epoch of BATCH rows a step, at least MIN_STEPS.

    >>> train_steps(120), train_steps(800)
    (48, 100)
    """
    return max(MIN_STEPS, math.ceil(train / BATCH))


def _words(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def instructions(fields: Fields) -> str:
    """The module's instructions: what to read, what to give, and the label values when they are few.

    >>> fields = Fields(["sentence1", "sentence2"], ["label"], "labels", {"entailment": 3, "not_entailment": 2}, "")
    >>> instructions(fields)
    'Read the sentence1 and sentence2, then give the label: entailment or not_entailment.'
    """
    read = (
        " and ".join([", ".join(fields.inputs[:-1]), fields.inputs[-1]]) if len(fields.inputs) > 1 else fields.inputs[0]
    )
    give = _words(fields.labels).replace(" or ", " and ")
    if fields.kind == "labels":
        return f"Read the {read}, then give the {give}: {_words(list(fields.values))}."
    if fields.kind == "numeric":
        return f"Read the {read}, then give the {give} as a number."
    return f"Read the {read}, then give the {give}."


# ---------------------------------------------------------------- the recipe's text
METRICS = {
    "labels": ("exact_match", "case/punctuation-insensitive equality"),
    "numeric": ("numeric", "the last number"),
    "text": ("f1", "SQuAD token F1: free text"),
}


def _q(value: str) -> str:
    """A YAML scalar for a string (JSON's double-quoted form is YAML too)."""
    return json.dumps(value, ensure_ascii=False)


def _head(made: Made, source: str, out: str) -> list[str]:
    f, (train, dev, test) = made.fields, made.split
    task = f"{', '.join(f.inputs)} -> {', '.join(f.labels)}"
    where = "" if source.startswith("builtin:") else "; a path from the folder you run jointopt in"
    values = f"  # {', '.join(f'{v!r} {n}' for v, n in f.values.items())}" if f.values else ""
    return [
        f"# {made.name}: {task}, on the embedded SmolLM2-135M-Instruct; written by `jointopt init`.",
        f"#   jointopt joint {out}",
        f"#   jointopt plan {out}          # what each step will cost, before anything runs",
        f"#   jointopt joint {out} 'schedule.strategy=w -> p' --name {made.name}-wp   # an override",
        f"name: {made.name}",
        "seed: 0",
        "",
        "data:",
        f"  source: {_q(source)}   # {made.rows} rows{where}",
        f"  inputs: [{', '.join(f.inputs)}]",
        f"  labels: [{', '.join(f.labels)}]{values}",
        f"  # dev and test: a quarter of the rows each, at most {MAX_HELD_OUT}; train: the rest, at most {MAX_TRAIN}",
        f"  split: {{train: {train}, dev: {dev}, test: {test}, seed: 0}}",
        "",
    ]


def _program(made: Made) -> list[str]:
    f = made.fields
    metric, why = METRICS[f.kind]
    tokens, text = max_tokens(f.labels[0], f.longest)
    named = ["      # the instructions name the labels: a small model answers the words its prompt names"]
    return [
        "metric:",
        f"  name: {metric}   # {f.kind}: {why}",
        f"  field: {f.labels[0]}",
        "",
        "program:",
        "  modules:",
        f"    - name: {'classify' if f.kind == 'labels' else 'respond'}",
        f"      signature: {_q(', '.join(f.inputs) + ' -> ' + ', '.join(f.labels))}",
        *(named if f.kind == "labels" else []),
        f"      instructions: {_q(instructions(f))}",
        "      model: small",
        "",
        "models:",
        "  small:",
        "    type: local",
        f"    path: {EMBEDDED_MODEL}",
        f"    max_tokens: {tokens}   # the longest answer in DSPy's markers: {len(text)} characters, ~2.5 a token",
        "    temperature: 0.0",
        "",
    ]


def _optimizers(made: Made, out: str) -> list[str]:
    train = made.split[0]
    steps = train_steps(train)
    arithmetic = f"{train} rows / {BATCH} a step = {math.ceil(train / BATCH)} optimizer steps an epoch"
    why = f"{arithmetic}; {steps}: at least train.min_steps" if steps == MIN_STEPS else f"{arithmetic}: one epoch"
    longest = max_length(made.row_tokens)
    length = f", max_length: {longest}" if longest else ""
    rows_note = (
        [f"    # rows with {DEMOS} demos: ~{made.row_tokens:,} tokens (90th percentile); max_length keeps them"]
        if longest
        else []
    )
    return [
        "optimizers:",
        "  p:                            # prompt step: 4 labeled demos + up to 2 bootstrapped ones",
        "    type: prompt",
        "    optimizer: BootstrapFewShot",
        "    args: {max_labeled_demos: 4, max_bootstrapped_demos: 2, max_errors: 1000}",
        "  w:                            # weight step: LoRA on passing traces, gold answers for the failed ones",
        "    type: weight",
        "    traces: {source: program+labels, threshold: 1.0}",
        "    lora: {r: 8, alpha: 16}",
        f"    # {why}",
        *rows_note,
        f"    train: {{steps: {steps}, learning_rate: 3.0e-3, batch_size: {BATCH}{length}}}",
        "  s:                            # simultaneous: a soft prompt and LoRA in one backward pass, on w's rows",
        f"    type: simultaneous          #   jointopt joint {out} 'schedule.strategy=p -> s -> p'",
        "    traces: {source: program+labels, threshold: 1.0}",
        "    lora: {r: 8, alpha: 16}",
        "    soft_prompt: {virtual_tokens: 8, init: instructions}",
        "    groups:",
        "      lora: {learning_rate: 3.0e-3}",
        "      soft_prompt: {learning_rate: 3.0e-3}",
        f"    train: {{steps: {steps}, batch_size: {BATCH}{length}}}",
        "",
        "schedule:",
        '  strategy: "p -> w -> p"       # BetterTogether',
        "",
        "runtime:",
        "  num_threads: 16               # concurrent calls: the local engine decodes them as one batch",
    ]


def name_of(source: str) -> str:
    """A run name from the source: the built-in's name, or the file's stem in run-name characters."""
    stem = source.removeprefix("builtin:") if source.startswith("builtin:") else Path(source).stem
    name = re.sub(r"[^\w.-]+", "-", stem).strip(".-")[:NAME_MAX].replace("..", ".")
    return name or "task"


def make_recipe(source: str, inputs: list[str] | None, labels: list[str] | None, name: str | None, out: str) -> Made:
    """The recipe for `source` (a .jsonl/.csv path or builtin:NAME), checked as `jointopt validate` checks
    it (InputError, one line, when it would not run); `out` is where it will be written (its comments
    name it)."""
    check_source(source)
    rows = load_rows(source)
    fields = choose_fields(source, rows, inputs, labels)
    name = check_run_name(name, "--name") if name else name_of(source)
    made = Made("", name, fields, split_sizes(len(rows)), len(rows), row_tokens(rows, fields.inputs + fields.labels))
    made.text = "\n".join(_head(made, source, out) + _program(made) + _optimizers(made, out)) + "\n"
    check_recipe(validate_recipe(yaml.safe_load(made.text), "the recipe jointopt init made"))
    return made


def write_recipe(made: Made, out: Path, force: bool) -> None:
    """Write the recipe to `out`; an existing file only with `force`."""
    if out.exists() and not force:
        raise InputError(f"--out: {out} exists; choose another --out, or --force to overwrite it")
    write_atomic(out, made.text)
