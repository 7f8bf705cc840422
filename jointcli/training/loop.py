"""The training loop of one process: `train_in_process(job)` trains the job's adapter and saves it.

    result = train_in_process(TrainJob(checkpoint, to_prompt_completion(rows), out_dir, Lora(), Train(),
                                       seed=0, log_path=None, device="cpu", dtype="float32"))

In order: prepare the rows (tokenize, drop the over-long), open the work folder (resume or start over),
set up the model and the optimizer, rank the rows (train.curriculum), restore the last checkpoint if
resuming, run the optimizer steps, save the adapter. The caller holds the adapter folder's lock
(lora.train_lora); with several data-parallel processes each runs this with its `ranks`, and process 0
alone writes files.

An optimizer step (`_train_step`): every parameter group's learning rate decays linearly to 0; the
step's rows run in micro-batches (microbatch.py), each micro-batch's summed NLL divided by the step's
completion-token count before its backward pass, so that they add up to the step's gradient; the
gradients are summed over the processes, the groups' L2 penalties added, the norm clipped at 1.0.
"""

from __future__ import annotations

import json
import math
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..console import phase
from ..errors import StepError
from ..failpoints import failpoint
from ..files import remove_path, staged_dir, write_json, write_jsonl
from ..weights.adapter import ADAPTER_FILES, SOFT_PROMPT_SUBFOLDER, is_adapter_dir
from ..weights.device import autocast, cpu_budget, torch_threads
from ..weights.soft_prompt import save_soft_prompt
from .curriculum import curriculum_steps, rank, row_losses
from .job import RESULT_FILE, TrainJob, TrainResult
from .microbatch import micro_batch_losses, plan_step, plan_steps
from .model import TrainState, load_for_training, soft_prompt_param, start_optimizer
from .ranks import Ranks
from .rows import TrainData, prepare_data
from .work import (
    last_checkpoint,
    load_checkpoint,
    open_work_dir,
    resume_fingerprint,
    save_checkpoint,
    save_difficulty,
    saved_difficulty,
)


@dataclass
class Plan:
    """What the training loop computes, and how."""

    steps: list[list[int]]  # row indices of every optimizer step (plan_steps or curriculum_steps)
    per_epoch: int  # optimizer steps per epoch
    ranks: Ranks = Ranks()  # this process among the data-parallel training processes
    curriculum: list[int] | None = None  # with train.curriculum: every row, easiest first


def train_in_process(job: TrainJob, ranks: Ranks = Ranks()) -> TrainResult:
    """Train the job's adapter in this process (`ranks`: its share of every step) and, in process 0,
    save it into job.out_dir and remove the work folder."""
    data = prepare_data(
        job.checkpoint, job.pairs, job.train.max_length, job.soft.prompt.virtual_tokens if job.soft else 0
    )
    if job.init_adapter is not None and not is_adapter_dir(job.init_adapter):
        raise StepError(f"{job.init_adapter}: not a PEFT adapter folder (needs {' and '.join(ADAPTER_FILES)})")
    key = resume_fingerprint(job, data.pairs)
    last = open_work_dir(job.work, job.resume, key) if ranks.main else None
    ranks.barrier()  # process 0 has checked (or started over) the work folder
    if not ranks.main:
        last = last_checkpoint(job.work)
    model = load_for_training(job.checkpoint, job.lora, job.device, job.dtype, job.seed, job.init_adapter)
    soft = soft_prompt_param(model, data.tokenizer, job.soft, job.init_adapter, job.seed)
    state = start_optimizer(model, job, soft)
    plan = _training_plan(job, data, ranks, _difficulty(job, state, data, ranks.main))
    if last is not None:
        load_checkpoint(state, last, job.device)
    logger = _JsonlLog(job.log_path if ranks.main else None, state.resumed_from_step)
    with _training_errors(job, state):
        tokens, seconds = _train_loop(job, state, data, plan, logger)
    result = _train_result(job, data, plan, state, tokens, seconds, logger.last_loss)
    if ranks.main:
        _save_adapter(job, state, result)
        remove_path(job.work)
    return result


def _difficulty(job: TrainJob, state: TrainState, data: TrainData, main: bool) -> list[float] | None:
    """Each row's difficulty for train.curriculum (None without one): its length, or the loss of the model
    as it starts. Kept in the work folder, so that a resumed run trains on the plan it began with."""
    curriculum = job.train.curriculum
    if curriculum is None:
        return None
    difficulty = saved_difficulty(job.work)
    if difficulty is not None:
        return difficulty
    if curriculum.by == "length":
        difficulty = [float(n) for n in data.lengths]
    else:
        with phase("curriculum: loss of every row", total=None):
            difficulty = row_losses(
                state.model,
                data.rows,
                data.pad_id,
                job.device,
                job.dtype,
                job.token_budget,
                state.soft,
                job.train.share_prefix,
            )
    if main:
        save_difficulty(job.work, difficulty)
    return difficulty


def _training_plan(job: TrainJob, data: TrainData, ranks: Ranks, difficulty: list[float] | None) -> Plan:
    """The optimizer steps' rows: a fresh shuffle every epoch, or easy rows first (train.curriculum)."""
    train = job.train
    rows_per_step = train.batch_size * train.grad_accum
    ranked = None
    if difficulty is not None:
        ranked = rank(difficulty, data.answers() if train.curriculum.balance else None)
    total = train.optimizer_steps(len(data.rows))  # train.steps, or epochs (at least min_steps when unset)
    steps = (
        plan_steps(len(data.rows), rows_per_step, 0, job.seed, steps=total)
        if ranked is None
        else curriculum_steps(ranked, rows_per_step, 0, job.seed, train.curriculum.stages, total=total)
    )
    return Plan(steps=steps, per_epoch=math.ceil(len(data.rows) / rows_per_step), ranks=ranks, curriculum=ranked)


def _train_loop(job: TrainJob, state: TrainState, data: TrainData, plan: Plan, logger: _JsonlLog) -> tuple[int, float]:
    """The optimizer steps from state.step to the end of the plan, each logged and shown as progress, a
    checkpoint every train.save_steps steps; (tokens trained, seconds)."""
    import torch

    if job.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n_steps, tokens = len(plan.steps), 0
    start = time.perf_counter()
    threads = max(1, cpu_budget() // plan.ranks.count)
    with (
        torch_threads(threads) if job.device == "cpu" else nullcontext(),
        phase(f"LoRA training {job.out_dir.name}", n_steps - state.step) if plan.ranks.main else _silent() as tick,
    ):
        for index in range(state.step, n_steps):
            decay = (n_steps - index) / n_steps  # every group's learning rate decays linearly to 0
            loss, grad_norm, step_tokens = _train_step(job, state, data, plan.steps[index], decay, plan.ranks)
            lr = state.optimizer.param_groups[0]["lr"]  # the LoRA group's
            tokens += step_tokens
            logger.log(index + 1, (index + 1) / plan.per_epoch, loss, lr, grad_norm)
            tick(note=f"loss {loss:.3f}")
            if (index + 1) % job.train.save_steps == 0 and index + 1 < n_steps and plan.ranks.main:
                save_checkpoint(job.work, index + 1, state, state.tokens_before + tokens)
            state.step = index + 1
            failpoint("train-step")
    return tokens, time.perf_counter() - start


def _train_step(
    job: TrainJob, state: TrainState, data: TrainData, step: list[int], decay: float, ranks: Ranks
) -> tuple[float, float, int]:
    """One optimizer step on the rows `step`, in micro-batches, every group's learning rate at `decay` x
    its peak: (loss per completion token, gradient norm before clipping, tokens trained). The groups' L2
    penalties, if any, join the gradient once per step (they are not in the loss returned)."""
    import torch

    for group in state.optimizer.param_groups:
        group["lr"] = group.get("peak_lr", job.train.learning_rate) * decay
    n_labels = sum(data.lengths[i] - data.rows[i][1] for i in step)  # completion tokens (label count)
    total, tokens = 0.0, 0
    rows = data.rows if job.train.share_prefix else None  # without the rows' tokens, every row runs whole
    groups = plan_step(data.lengths, ranks.share(step), job.token_budget, rows)
    with autocast(job.device, job.dtype):
        for micro, nll, _ in micro_batch_losses(state.model, data.rows, groups, data.pad_id, job.device, state.soft):
            (nll / n_labels).backward()  # divided by the step's label count: the micro-batches add up to the step
            total += float(nll.detach())
            tokens += sum(data.lengths[i] for i in micro)
    total, tokens = ranks.sum_step(state.params, total, tokens)
    if state.penalties:  # after the sum over processes: counted once
        sum(l2 * sum(p.float().pow(2).sum() for p in params) for l2, params in state.penalties).backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.params, 1.0))
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return total / n_labels, grad_norm, tokens


@contextmanager
def _training_errors(job: TrainJob, state: TrainState):
    """A StepError for a failed training loop: out of memory (and the settings that bound it), or the
    step that failed (and where its checkpoints are kept for a rerun)."""
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise StepError(
            f"out of {job.device} memory training {job.out_dir.name}: lower train.token_budget "
            f"(now {job.token_budget}) or train.max_length (now {job.train.max_length})"
        ) from err
    except (RuntimeError, ValueError) as err:
        raise StepError(
            f"LoRA training failed at step {state.step + 1}: {err} "
            f"(checkpoints, if any, are kept in {job.work} and a rerun resumes from them)"
        ) from err


def _train_result(
    job: TrainJob, data: TrainData, plan: Plan, state: TrainState, tokens: int, seconds: float, final_loss: float | None
) -> TrainResult:
    import torch

    return TrainResult(
        adapter_dir=job.out_dir,
        steps=len(plan.steps),
        epochs=len(plan.steps) / plan.per_epoch,
        rows=len(data.rows),
        train_tokens=tokens,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        seconds=round(seconds, 3),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if job.device == "cuda" else None,
        final_loss=final_loss,
        device=job.device,
        dtype=job.dtype,
        dropped_rows=data.dropped,
        resumed_from_step=state.resumed_from_step,
        processes=plan.ranks.count,
        virtual_tokens=0 if state.soft is None else int(state.soft.shape[0]),
        curriculum=plan.curriculum,
    )


def _save_adapter(job: TrainJob, state: TrainState, result: TrainResult) -> None:
    """The adapter (adapter_config.json + adapter_model.safetensors), its soft prompt if any (a PEFT
    prompt-tuning folder in prompt_tuning/) and the TrainResult (training.json) into job.out_dir,
    which they replace whole."""
    with staged_dir(job.out_dir) as tmp:
        state.model.save_pretrained(str(tmp))
        if state.soft is not None:
            config = state.model.get_base_model().config
            save_soft_prompt(state.soft, tmp / SOFT_PROMPT_SUBFOLDER, job.checkpoint, config)
        write_json(tmp / RESULT_FILE, result.to_json())


@contextmanager
def _silent():
    """phase()'s stand-in in the processes other than 0: their progress is process 0's."""
    yield lambda n=1, note="": None


class _JsonlLog:
    """One JSON line per optimizer step in train_log.jsonl, rewritten atomically after each (a small
    file); a resumed run keeps the lines of the steps it resumes after."""

    def __init__(self, path: Path | None, resumed_step: int | None):
        self.path = path
        self.lines: list[dict] = []
        if path is not None and resumed_step is not None and path.is_file():
            self.lines = [e for e in _read_lines(path) if e.get("step", 0) <= resumed_step]
        self.last_loss: float | None = self.lines[-1]["loss"] if self.lines else None
        self._start = time.perf_counter()
        self._offset = self.lines[-1].get("seconds", 0.0) if self.lines else 0.0

    def log(self, step: int, epoch: float, loss: float, lr: float, grad_norm: float) -> None:
        self.last_loss = float(loss)
        self.lines.append(
            {
                "step": step,
                "epoch": round(epoch, 4),
                "loss": self.last_loss,
                "learning_rate": float(lr),
                "seconds": round(self._offset + time.perf_counter() - self._start, 3),
                "grad_norm": float(grad_norm),
            }
        )
        if self.path is not None:
            write_jsonl(self.path, self.lines)


def _read_lines(path: Path) -> list[dict]:
    """The JSON objects of a train log's lines; a line cut by a kill or not an object is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out
