"""LoRA fine-tuning of a local checkpoint on DSPy fine-tune rows: a small training loop of our own.

    checkpoint = resolve_checkpoint("builtin:smollm2-135m-instruct")
    result = train_lora(checkpoint, rows, Path("runs/x/02-w/adapters/classify"), Lora(), Train(), seed=0,
                        log_path=Path("runs/x/02-w/train_log.jsonl"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), str(result.adapter_dir))

Rows are what `dspy.ChatAdapter().format_finetune_data(...)` builds (training/rows.py): each becomes a
conversational prompt/completion pair, the loss on the final completion only. Rows longer than
`train.max_length` tokens are dropped (counted in `TrainResult.dropped_rows`), never cut.

The loop (training/loop.py) keeps the semantics of TRL's SFTTrainer: AdamW, betas 0.9/0.999, no weight
decay, linear decay of the learning rate to 0, gradient norm clipped at 1.0, the loss of a step the
summed NLL of its completion tokens over their count. How it computes them:
- an optimizer step is `batch_size x grad_accum` rows (a seeded shuffle per epoch, or easy rows first
  with train.curriculum), computed in micro-batches of at most train.token_budget computed tokens, a
  prompt prefix shared by the step's rows computed once (train.share_prefix), the LM head on the
  completion positions only: see training/microbatch.py. Micro-batches give the gradient of the whole
  step (tested);
- bf16 on bf16 GPUs (dtype auto) and on request (dtype bfloat16): frozen base weights in bf16,
  autocast, LoRA weights and AdamW in fp32 (training/model.py). fp32 on CPU by default, even with
  avx512_bf16 (weights/device.py: what `dtype: auto` means);
- no gradient checkpointing (TRL's default): micro-batches keep memory small without it;
- memory (weights/memory.py): before training, the engine's prefix cache is emptied and the C heap's
  free memory handed back; the frozen weights are the engine's where the dtypes match; after it, the
  training's memory goes back to the system before the next step;
- torch threads set to the CPU budget (affinity and cgroup quota) while training;
- with train.processes > 1, each step's rows shared out to that many processes
  (training/data_parallel.py).

Writes are atomic (jointcli/files.py): the adapter is saved into a temporary sibling folder that
replaces `out_dir` at the end (`files.staged_dir`). Checkpoints for resuming (adapter, optimizer and
RNG state, every train.save_steps steps) live in a sibling work folder `.<name>.work/` that is removed
on success, and are reused only when the data, hyperparameters and base checkpoint are the same
(training/work.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ..errors import StepError
from ..files import remove_stale_staged
from ..recipe import Lora, Train
from ..weights.device import resolve_device, resolve_train_dtype
from ..weights.memory import release_memory
from .data_parallel import launch
from .job import SoftTraining, TrainJob, TrainResult
from .loop import train_in_process
from .model import load_for_training
from .rows import to_prompt_completion

# What callers of the trainer use, wherever below it is defined
__all__ = ["SoftTraining", "TrainResult", "load_for_training", "train_lora"]


def train_lora(
    checkpoint: Path,
    rows: list[dict],
    out_dir: Path,
    lora: Lora,
    train: Train,
    seed: int = 0,
    log_path: Path | None = None,
    device: str = "auto",
    resume: bool = True,
    dtype: str = "auto",
    init_adapter: Path | None = None,
    soft: SoftTraining | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `rows` and write it to `out_dir` (a standard PEFT adapter folder).

    dtype: auto (bf16 autocast on a CUDA GPU with bf16 support, else fp32: resolve_train_dtype), float32
    or bfloat16.
    init_adapter: a PEFT adapter folder to continue training (its r, alpha and target modules are
    kept and `lora` is ignored); None starts a new adapter on the base weights.
    soft: train a soft prompt together with the adapter (the s step): its settings, and the two parameter
    groups' (SoftTraining); saved as a PEFT prompt-tuning folder in out_dir/prompt_tuning (soft_prompt.py)."""
    if not rows:
        raise StepError("no training rows: nothing to fine-tune on (did every trace fail the metric?)")
    pairs = to_prompt_completion(rows)
    out_dir = Path(out_dir)
    with _lock(out_dir):
        device = resolve_device(device)
        job = TrainJob(
            checkpoint=Path(checkpoint),
            pairs=pairs,
            out_dir=out_dir,
            lora=lora,
            train=train,
            seed=seed,
            log_path=Path(log_path) if log_path else None,
            device=device,
            dtype=resolve_train_dtype(dtype, device),
            resume=resume,
            init_adapter=Path(init_adapter) if init_adapter else None,
            soft=soft,
        )
        remove_stale_staged(out_dir)  # adapter folders half-written by a killed run; we hold the lock
        release_memory()  # the engine's caches and the heap's free memory, before the training's peak
        result = launch(job) if train.processes > 1 else train_in_process(job)
        release_memory()  # the training's model and activations, back to the system
        return result


@contextmanager
def _lock(out_dir: Path):
    """One training of `out_dir` at a time, across processes: a lock file next to it."""
    from filelock import FileLock

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.lock")):
        yield
