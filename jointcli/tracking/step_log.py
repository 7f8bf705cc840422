"""What one finished step puts into its MLflow run: params (its optimizer key and settings, secrets
masked), metrics (as its manifest entry says: scores, tokens, seconds, the majority-class score,
answer counts, evaluation counts; a weight step's loss and learning rate per optimizer step, from
its train_log.jsonl) and artifacts (program.json, eval.json, the manifest entry; adapters when
tracking.adapters is on)."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path

from ..files import read_jsonl
from ..recipe import Recipe
from ..rundir import RunDir, Step, eval_files
from .client import client
from .target import Target, masked

BATCH = 1000  # metrics per log_batch call: MLflow's limit
_KEY = re.compile(r"[^\w\-. /]")  # characters an MLflow metric or param key may not hold


def ms(stamp: str | None) -> int | None:
    """A manifest time stamp (ISO 8601) in epoch milliseconds, as MLflow takes them.

    >>> ms("2026-12-06T10:00:00+00:00")
    1796551200000
    """
    return None if not stamp else int(dt.datetime.fromisoformat(stamp).timestamp() * 1000)


def key(text: str) -> str:
    """A metric name MLflow takes, from a label such as 'very positive!'.

    >>> key("dev_answers.very positive!")
    'dev_answers.very positive_'
    """
    return _KEY.sub("_", text)[:250]


def step_params(recipe: Recipe, step: Step) -> dict[str, str]:
    """The step's kind and, for an optimizer step, the optimizer's settings and its key under `optimizers`."""
    params = {"kind": step.kind}
    optimizer = step.info.get("optimizer")
    if optimizer in recipe.optimizers:  # its settings, e.g. optimizer: MIPROv2, args.num_candidates: 4
        params.update(masked(recipe.optimizers[optimizer].model_dump(mode="json", exclude_none=True)))
        params["optimizer_key"] = optimizer
    return {key(k): v for k, v in params.items()}


def split_metrics(step: Step, split: str) -> dict[str, float]:
    """The manifest's figures of one evaluation of the step."""
    info = step.info
    found = {split: step.scores[split]}
    for name in ("n", "parse_failures", "errors", "majority"):
        if isinstance(info.get(f"{split}_{name}"), int | float):
            found[f"{split}_{name}"] = info[f"{split}_{name}"]
    for label, count in (info.get(f"{split}_answers") or {}).items():
        found[key(f"{split}_answers.{label}")] = count
    return found


def step_metrics(step: Step, splits: list[str]) -> dict[str, float]:
    """Scores of `splits` with their counts, and what the step as a whole cost."""
    found = {}
    for split in splits:
        found.update(split_metrics(step, split))
    found.update({f"tokens_{k}": v for k, v in step.tokens.items()})
    traces = step.info.get("traces")  # a bootstrap's (or weight step's) counts of kept and dropped traces
    if isinstance(traces, dict):
        found.update({key(f"traces.{k}"): v for k, v in traces.items() if type(v) in (int, float)})
    if step.seconds is not None:
        found["seconds"] = step.seconds
    return found


def log_metrics(t: Target, run_id: str, values: dict[str, float], step_index: int = 0) -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    metrics = [Metric(k, float(v), stamp, step_index) for k, v in values.items()]
    for i in range(0, len(metrics), BATCH):
        client(t).log_batch(run_id, metrics=metrics[i : i + BATCH])


def log_training(t: Target, run_id: str, folder: Path) -> None:
    """Loss and learning rate per optimizer step (the step index is MLflow's step), per adapter when several."""
    from mlflow.entities import Metric

    path = folder / "train_log.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    several = len({r.get("adapter") for r in rows}) > 1
    metrics = []
    for row in rows:
        suffix = f".{key(str(row.get('adapter')))}" if several else ""
        stamp = int(time.time() * 1000)
        for name, field in (("loss", "loss"), ("lr", "learning_rate"), ("grad_norm", "grad_norm")):
            if isinstance(row.get(field), int | float):
                metrics.append(Metric(f"{name}{suffix}", float(row[field]), stamp, int(row.get("step", 0))))
    for i in range(0, len(metrics), BATCH):
        client(t).log_batch(run_id, metrics=metrics[i : i + BATCH])


def log_files(t: Target, run_id: str, run: RunDir, step: Step, splits: list[str], first: bool) -> None:
    """The evaluations of `splits`, the manifest entry; the first time also program.json (when the
    step saved one) and, with tracking.adapters, the adapters."""
    folder = run.step_dir(step)
    names = [eval_files(split)[0] for split in splits] + (["program.json"] if first else [])
    for name in names:
        if (folder / name).is_file():
            client(t).log_artifact(run_id, str(folder / name))
    client(t).log_text(run_id, json.dumps(step.__dict__, indent=2), "step.json")  # the entry as it is now
    if first and t.adapters and (folder / "adapters").is_dir():
        client(t).log_artifacts(run_id, str(folder / "adapters"), "adapters")


def log_step(t: Target, run_id: str, recipe: Recipe, run: RunDir, step: Step, splits: list[str], first: bool) -> None:
    """Into the step's MLflow run: everything the first time; later (a test score added), those splits."""
    if first:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in step_params(recipe, step).items()]
        for i in range(0, len(params), 100):
            client(t).log_batch(run_id, params=params[i : i + 100])
        log_training(t, run_id, run.step_dir(step))
    log_metrics(t, run_id, step_metrics(step, splits), len(step.scores))
    log_files(t, run_id, run, step, splits, first)
