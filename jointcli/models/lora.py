"""LoRA fine-tuning of a local checkpoint on DSPy fine-tune rows, with TRL's SFTTrainer.

    result = train_lora(resolve_checkpoint("builtin:smollm2-135m-instruct"), rows,
                        Path("runs/x/02-w/adapters/classify"), Lora(), Train(), seed=0,
                        log_path=Path("runs/x/02-w/train_log.jsonl"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), result.adapter_dir)

Rows are what `dspy.ChatAdapter().format_finetune_data(...)` builds:
`{"messages": [system, user, (assistant, user)*, assistant]}`. Each row becomes a conversational
prompt/completion pair (every message but the last / the last assistant message), so TRL masks the
prompt tokens with -100 and the loss is on the final completion only, end-of-turn token included.

Rows longer than `train.max_length` tokens are DROPPED (counted in `TrainResult.dropped_rows`),
never cut: TRL truncates from the right, which would cut the completion, and cutting the prompt
from the left would remove the system message that tells the model its fields.

Choices, measured on 2 CPU cores (AMD EPYC, avx512_bf16), batch 8 of ~190-token DSPy rows:
- no gradient checkpointing: TRL turns it on by default; it made steps 30% slower (12.0 s against
  9.2 s) to lower peak RSS from 6.3 to 3.9 GB, and memory suffices (it grows with batch x length);
- the loss is the model's own cross-entropy (see `_trainer_class`), not TRL's chunked "fused LM
  head", which also computes per-token entropy/accuracy for its logs: same loss values to the last
  digit, 8.5-9.2 s a step instead of 13.3 s;
- padded batches grouped by length (`train_sampling_strategy="group_by_length"`), not padding-free:
  padding-free is correct with SDPA in transformers 5 (packed position_ids become a block-diagonal
  mask), but attention over the flattened batch is quadratic in the whole batch: forward+backward
  11.4 s against 7.7 s padded (rows of one signature differ little in length, so padding is ~5%);
- fp32 on CPU by default; `dtype="bfloat16"` (autocast, LoRA weights stay fp32) takes 5.4 s a step
  (-37%, peak RSS 4.8 GB) and its loss falls about as fast (8 steps: 1.83 -> 0.095 against
  1.83 -> 0.081); bf16 mixed precision on CUDA when the GPU supports it.

Writes are atomic: the adapter is saved into a temporary sibling folder and renamed over
`out_dir` at the end; Trainer checkpoints for resuming live in a sibling work folder
`.<name>.work/` that is removed on success, and are reused only when the data, hyperparameters
and base checkpoint are the same (a fingerprint file says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import StepError
from ..rundir import _umask, write_atomic
from ..recipe import Lora, Train

SAVE_STEPS = 20  # a Trainer checkpoint every this many optimizer steps (at most ~2 minutes lost here)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RESULT_FILE = "training.json"  # TrainResult of the run, next to the adapter files
_FINGERPRINT = "fingerprint.json"


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    epochs: float
    rows: int  # rows trained on (after dropping over-long ones)
    train_tokens: int  # prompt + completion tokens processed in this session (non-pad)
    tokens_per_second: float
    seconds: float  # wall time of the training loop of this session
    peak_rss_mb: float
    peak_cuda_mb: float | None
    final_loss: float | None
    device: str
    dtype: str
    dropped_rows: int = 0  # rows longer than train.max_length, left out
    resumed_from_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["adapter_dir"] = str(self.adapter_dir)
        return out


# ---------------------------------------------------------------- rows
def to_prompt_completion(rows: list[dict]) -> list[dict]:
    """DSPy chat rows -> TRL conversational prompt/completion rows. Raises StepError on a bad row."""
    out = []
    for i, row in enumerate(rows):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or len(messages) < 2:
            raise StepError(f"training row {i}: expected {{'messages': [..., assistant]}} with at least 2 messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                    "system", "user", "assistant"):
                raise StepError(f"training row {i}: every message needs a role (system/user/assistant) "
                                "and a text content")
        if messages[-1]["role"] != "assistant":
            raise StepError(f"training row {i}: the last message must be the assistant's completion, "
                            f"not {messages[-1]['role']!r}")
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        out.append({"prompt": clean[:-1], "completion": clean[-1:]})
    return out


def _token_length(tokenizer, row: dict) -> int:
    enc = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    return len(ids)


# ---------------------------------------------------------------- devices
def resolve_train_dtype(dtype: str, device: str) -> str:
    """auto: bf16 mixed precision on a CUDA GPU that supports it, else fp32 (CPU included)."""
    import torch

    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if dtype not in ("float32", "bfloat16"):
        raise StepError(f"LoRA training dtype {dtype!r}: use auto, float32 or bfloat16")
    return dtype


# ---------------------------------------------------------------- files
def _fingerprint(checkpoint: Path, rows: list[dict], lora: Lora, train: Train, seed: int, device: str,
                 dtype: str, init_adapter: Path | None = None) -> str:
    h = hashlib.sha256()
    if init_adapter is not None:
        for name in ADAPTER_FILES:
            h.update((Path(init_adapter) / name).read_bytes())
    h.update(json.dumps({"checkpoint": str(Path(checkpoint).resolve()), "lora": lora.model_dump(mode="json"),
                         "train": train.model_dump(mode="json"), "seed": seed, "device": device,
                         "dtype": dtype}, sort_keys=True).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder src to dst, replacing dst if it exists; dst is never half-written."""
    if not dst.exists():
        os.replace(src, dst)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, trash / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(trash / dst.name, dst)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _lock(out_dir: Path):
    from filelock import FileLock

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.lock")):
        yield


@contextmanager
def _quiet_datasets():
    """TRL's dataset preparation prints a progress bar per map(); the CLI has its own output."""
    try:
        from datasets.utils import logging as ds_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def is_adapter_dir(path: Path) -> bool:
    return all((Path(path) / f).is_file() for f in ADAPTER_FILES)


# ---------------------------------------------------------------- training
def train_lora(checkpoint: Path, rows: list[dict], out_dir: Path, lora: Lora, train: Train, seed: int = 0,
               log_path: Path | None = None, device: str = "auto", resume: bool = True,
               dtype: str = "auto", init_adapter: Path | None = None) -> TrainResult:
    """Train a LoRA adapter on `rows` and write it to `out_dir` (a standard PEFT adapter folder).

    dtype: auto (bf16 mixed precision on a bf16 GPU, else fp32), float32 or bfloat16 (autocast).
    init_adapter: a PEFT adapter folder to continue training (its r, alpha and target modules are
    kept and `lora` is ignored); None starts a new adapter on the base weights."""
    if not rows:
        raise StepError("no training rows: nothing to fine-tune on (did every trace fail the metric?)")
    pairs = to_prompt_completion(rows)
    out_dir = Path(out_dir)
    with _lock(out_dir):
        return _train_locked(Path(checkpoint), pairs, out_dir, lora, train, seed,
                             Path(log_path) if log_path else None, device, resume, dtype,
                             Path(init_adapter) if init_adapter else None)


def _sft_config(work: Path, train: Train, seed: int, device: str, dtype: str, **overrides):
    from trl import SFTConfig

    args = dict(
        output_dir=str(work),
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        max_length=train.max_length,  # rows are pre-filtered to fit, so this never cuts
        completion_only_loss=True,
        packing=False,
        padding_free=False,
        train_sampling_strategy="group_by_length",
        activation_checkpointing=False,  # TRL defaults to on (the old name, gradient_checkpointing)
        bf16=dtype == "bfloat16",
        fp16=False,
        use_cpu=device == "cpu",
        seed=seed,
        data_seed=seed,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        save_total_limit=1,
        eval_strategy="no",
        report_to="none",
        push_to_hub=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        include_num_input_tokens_seen="non_padding",
    )
    args.update(overrides)
    return SFTConfig(**args)


def _train_locked(checkpoint: Path, pairs: list[dict], out_dir: Path, lora: Lora, train: Train, seed: int,
                  log_path: Path | None, device: str, resume: bool, dtype: str,
                  init_adapter: Path | None = None, sft_overrides: dict | None = None) -> TrainResult:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    from .engine import resolve_device

    device = resolve_device(device)
    dtype = resolve_train_dtype(dtype, device)
    parent = out_dir.parent
    for stale in parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed run; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    lengths = [_token_length(tokenizer, p) for p in pairs]
    kept = [p for p, n in zip(pairs, lengths) if n <= train.max_length]
    dropped = len(pairs) - len(kept)
    if not kept:
        raise StepError(f"no training rows: all {len(pairs)} rows are longer than train.max_length="
                        f"{train.max_length} tokens (shortest {min(lengths)}); raise train.max_length")

    # Resume only a work folder that trained on exactly this data with these settings.
    work = parent / f".{out_dir.name}.work"
    if init_adapter is not None and not is_adapter_dir(init_adapter):
        raise StepError(f"{init_adapter}: not a PEFT adapter folder (needs {' and '.join(ADAPTER_FILES)})")
    fingerprint = _fingerprint(checkpoint, kept, lora, train, seed, device, dtype, init_adapter)
    last = None
    if resume and work.is_dir():
        try:
            same = json.loads((work / _FINGERPRINT).read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            same = False
        last = get_last_checkpoint(str(work)) if same else None
    if last is None and work.exists():
        shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        write_atomic(work / _FINGERPRINT, json.dumps({"fingerprint": fingerprint}) + "\n")
    resumed_step = _checkpoint_step(last) if last else None

    transformers.set_seed(seed)  # before the LoRA A matrices are initialized inside SFTTrainer
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.bfloat16 if dtype == "bfloat16" and device == "cuda" else torch.float32,
        local_files_only=True)
    if device == "cuda":
        model.to("cuda")
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True, local_files_only=True)
        peft_config = None
    else:
        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM",
            target_modules=lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules))
    logger = _JsonlLog(log_path, resumed_step)
    with _quiet_datasets():
        trainer = _trainer_class()(
            model=model,
            args=_sft_config(work, train, seed, device, dtype, **(sft_overrides or {})),
            train_dataset=Dataset.from_list(kept),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[logger],
        )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; train_log.jsonl has them
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=last)
    except torch.OutOfMemoryError as err:
        raise StepError(f"LoRA training ran out of {device} memory with batch_size={train.batch_size}, "
                        f"max_length={train.max_length}: lower train.batch_size (and raise train.grad_accum "
                        f"to keep the effective batch), or train.max_length") from err
    except (RuntimeError, ValueError) as err:
        raise StepError(f"LoRA training failed at step {trainer.state.global_step}: {err} "
                        f"(checkpoints, if any, are kept in {work} and a rerun resumes from them)") from err
    seconds = time.perf_counter() - start
    logger.flush()

    state = trainer.state
    tokens = int(state.num_input_tokens_seen - logger.tokens_at_start)
    result = TrainResult(
        adapter_dir=out_dir,
        steps=int(state.global_step),
        epochs=float(state.epoch or 0.0),
        rows=len(kept),
        train_tokens=tokens,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        seconds=round(seconds, 3),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        final_loss=logger.last_loss,
        device=device,
        dtype=dtype,
        dropped_rows=dropped,
        resumed_from_step=resumed_step,
    )

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the adapter folder is an ordinary one
    try:
        trainer.model.save_pretrained(str(tmp))  # adapter only: adapter_config.json + adapter_model.safetensors
        write_atomic(tmp / RESULT_FILE, json.dumps(result.to_json(), indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    del trainer, model
    return result


def _checkpoint_step(path: str) -> int | None:
    try:
        return int(Path(path).name.rsplit("-", 1)[-1])
    except ValueError:
        return None


_TRAINER_CLASS = None


def _trainer_class():
    """SFTTrainer with the plain transformers loss (the model's own cross-entropy on the labels TRL built).

    TRL 1.16 computes the loss through its chunked "fused LM head", which also computes the entropy
    and token accuracy of every position for its logs; on CPU that path took 5 of the 11 seconds of
    a step (batch 8 x 200 tokens, 49k vocabulary). The model's loss is the same number (mean NLL of
    the completion tokens, normalized by the tokens of the whole accumulated batch) for ~1 second."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        from transformers import Trainer
        from trl import SFTTrainer

        class _SFTTrainer(SFTTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs["use_cache"] = False
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        _TRAINER_CLASS = _SFTTrainer
    return _TRAINER_CLASS


_LOG_CLASS = None


def _JsonlLog(path: Path | None, resumed_step: int | None):
    """A TrainerCallback writing train_log.jsonl; the class is built on first use, so importing
    this module does not import transformers."""
    global _LOG_CLASS
    if _LOG_CLASS is None:
        from transformers import TrainerCallback

        _LOG_CLASS = type("JsonlLog", (_JsonlLogMixin, TrainerCallback), {})
    return _LOG_CLASS(path, resumed_step)


class _JsonlLogMixin:
    """One JSON line per logged optimizer step, rewritten atomically after each (a small file)."""

    def __init__(self, path: Path | None, resumed_step: int | None):
        self.path = path
        self.lines: list[dict] = []
        if path is not None and resumed_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("step", 0) <= resumed_step:
                    self.lines.append(entry)
        self.last_loss: float | None = None
        self.tokens_at_start = 0
        self._start = time.perf_counter()
        self._offset = self.lines[-1].get("seconds", 0.0) if self.lines else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen  # 0, or the resumed checkpoint's count

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # the final summary log has train_loss, not loss
            return
        self.last_loss = float(logs["loss"])
        self.lines.append({
            "step": int(state.global_step),
            "epoch": round(float(state.epoch or 0.0), 4),
            "loss": self.last_loss,
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "seconds": round(self._offset + time.perf_counter() - self._start, 3),
            **({"grad_norm": float(logs["grad_norm"])} if "grad_norm" in logs else {}),
        })
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in self.lines))
