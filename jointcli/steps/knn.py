"""KNNFewShot as a program state: the k nearest training examples bootstrap each call's demos.

    state.knn = knn_record(spec, "small", trainset, row_of_examples(ctx))   # the prompt step
    apply_knn(program, state.knn, ctx)      # Context.attach: the program looks its neighbours up

DSPy's KNNFewShot returns a program whose forward finds the k training examples nearest the input
(by their embeddings) and compiles a BootstrapFewShot on them for that one call. Nothing of this is
in `program.json` (DSPy's program.save keeps predictors only), so the state records what rebuilds it:
the recipe's `args` (k and BootstrapFewShot's settings), the training examples by their row in the
data source, in the step's order, and the model whose hidden states embed them
(models/embedder.py). Wherever a state becomes a program (Context.attach: `eval`, the next step, a
resumed run), the same KNNFewShot is built again from the same examples, so the program answers as
it did in its step.

The program stays the recipe's program, with its predictors where they were (models attach, weights
train, `program.json` saves them as usual); only its `forward` is DSPy's KNNFewShot forward, which
runs a plain view of the program (same predictors, the class's own forward) as the student.
"""

from __future__ import annotations

import copy
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager

import dspy

from ..errors import InputError
from ..models.embedder import local_embedder
from ..recipe import PromptOptimizer
from .prompts import make_optimizer

NAME = "KNNFewShot"
LOOKUP = "jointopt_knn"  # the program's attribute holding its neighbour lookup (not a DSPy parameter)
_inside = threading.local()  # .active: this thread is compiling a call's demos
_compiling_lock = threading.Lock()
_compiling: dict = {"threads": 0, "stdout": None}  # threads compiling now; the stdout they replaced


class _DropCompilePrints:
    """sys.stdout while calls compile their demos: BootstrapFewShot prints a line each time it compiles
    ("Bootstrapped 1 full traces after 2 examples ..."), here once per program call, so a line per
    evaluated example; those threads' prints are dropped, the others' pass (its log records stay)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return len(text) if getattr(_inside, "active", False) else self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextmanager
def _compiling_demos() -> Iterator[None]:
    with _compiling_lock:
        if not _compiling["threads"]:
            _compiling["stdout"], sys.stdout = sys.stdout, _DropCompilePrints(sys.stdout)
        _compiling["threads"] += 1
    _inside.active = True
    try:
        yield
    finally:
        _inside.active = False
        with _compiling_lock:
            _compiling["threads"] -= 1
            if not _compiling["threads"]:
                sys.stdout = _compiling["stdout"]


class Neighbours:
    """The KNN of a KNNFewShot and the BootstrapFewShot settings each call compiles with; shared, never
    copied, by copies of the program (DSPy deep-copies programs)."""

    def __init__(self, optimizer):
        self.knn, self.bootstrap_args = optimizer.KNN, optimizer.few_shot_bootstrap_args

    def __deepcopy__(self, memo):
        return self


def knn_record(spec: PromptOptimizer, model: str, trainset: list[dspy.Example], rows: dict[int, int]) -> dict:
    """What state.json keeps of a KNNFewShot step: its args, its training examples (their row in the
    data source, in the step's order; `rows` maps an example's id() to it) and the embedding model.

    >>> a, b = dspy.Example(sentence="fine"), dspy.Example(sentence="dull")
    >>> spec = PromptOptimizer(type="prompt", optimizer="KNNFewShot", args={"k": 2})
    >>> knn_record(spec, "small", [b, a], {id(a): 17, id(b): 4})
    {'args': {'k': 2}, 'examples': [4, 17], 'embedder': 'small'}
    """
    return {"args": dict(spec.args), "examples": [rows[id(e)] for e in trainset], "embedder": model}


def apply_knn(program: dspy.Module, record: dict, ctx) -> None:
    """Give `program` (in place) the neighbour lookup a state's `knn` record describes; `ctx` is the
    StepContext whose training split, metric and models rebuild it as the step built it."""
    rows = ctx.splits.indices["train"]
    trainset = training_examples(record, ctx.splits.train, rows, str(ctx.run.path))
    embedder = local_embedder(ctx.pool.get(record["embedder"]))
    with_knn(program, build_knn(record, trainset, embedder, {"metric": ctx.metric}))


def row_of_examples(ctx) -> dict[int, int]:
    """id() of each training example of `ctx` -> its row in the data source."""
    return {id(e): r for e, r in zip(ctx.splits.train, ctx.splits.indices["train"], strict=True)}


def build_knn(record: dict, trainset: list[dspy.Example], embedder, supplied: dict):
    """The DSPy KNNFewShot of `record` (the recipe's args plus what jointopt supplies, as in the step)."""
    spec = PromptOptimizer(type="prompt", optimizer=NAME, args=record["args"])
    return make_optimizer("knn", spec, {**supplied, "trainset": trainset, "vectorizer": embedder})


def with_knn(program: dspy.Module, optimizer) -> dspy.Module:
    """`program`, in place, with KNNFewShot's forward: each call bootstraps demos from the nearest examples."""
    setattr(program, LOOKUP, Neighbours(optimizer))
    program.forward = types.MethodType(_knn_forward, program)
    return program


def without_knn(program: dspy.Module) -> dspy.Module:
    """`program`, in place, with its class's own forward again."""
    for name in (LOOKUP, "forward"):
        program.__dict__.pop(name, None)
    return program


def _knn_forward(self, **kwargs):
    """DSPy's KNNFewShot forward (teleprompt/knn_fewshot.py), with this program's predictors as the student."""
    lookup: Neighbours = getattr(self, LOOKUP)
    student = without_knn(copy.copy(self))  # the same predictors, the program's own forward
    lms = {name: p.lm for name, p in student.named_predictors()}
    # DSPy's copies forget their LMs (Predict.reset): the labeled teacher runs on the first module's, as
    # a prompt step's optimizer does, and the compiled program's modules get their own back
    with _compiling_demos(), dspy.context(lm=next(iter(lms.values()))):
        compiled = dspy.BootstrapFewShot(**lookup.bootstrap_args).compile(
            student, teacher=None, trainset=lookup.knn(**kwargs)
        )
    for name, predictor in compiled.named_predictors():
        predictor.lm = lms[name]
    trace = dspy.settings.trace
    start = len(trace) if trace is not None else 0
    prediction = compiled(**kwargs)
    if trace is not None:  # the calls, as this program's modules' (a weight step finds its rows by module)
        own, names = dict(student.named_predictors()), {id(p): n for n, p in compiled.named_predictors()}
        trace[start:] = [(own.get(names.get(id(p)), p), inputs, out) for p, inputs, out in trace[start:]]
    return prediction


def training_examples(record: dict, train: list[dspy.Example], rows: list[int], where: str) -> list[dspy.Example]:
    """The examples a record names, from the run's training split (`rows`: each example's row)."""
    by_row = dict(zip(rows, train, strict=True))
    missing = [r for r in record["examples"] if r not in by_row]
    if missing:
        raise InputError(
            f"{where}: the KNNFewShot state names training rows the run's split no longer has ({missing[:3]}); "
            "the data changed (--force?)"
        )
    return [by_row[r] for r in record["examples"]]
