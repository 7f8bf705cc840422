"""LoRA fine-tuning of a local checkpoint on DSPy fine-tune rows: a small training loop of our own.

    result = train_lora(resolve_checkpoint("builtin:smollm2-135m-instruct"), rows,
                        Path("runs/x/02-w/adapters/classify"), Lora(), Train(), seed=0,
                        log_path=Path("runs/x/02-w/train_log.jsonl"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), result.adapter_dir)

Rows are what `dspy.ChatAdapter().format_finetune_data(...)` builds:
`{"messages": [system, user, (assistant, user)*, assistant]}`. Each row becomes a conversational
prompt/completion pair (every message but the last / the last assistant message), tokenized as TRL
does (`tokenize_pair`): the loss is on the final completion only, end-of-turn token included.

Rows longer than `train.max_length` tokens are DROPPED (counted in `TrainResult.dropped_rows`),
never cut: truncating from the right would cut the completion, and cutting the prompt from the left
would remove the system message that tells the model its fields.

The loop (it replaced TRL's SFTTrainer, whose semantics it keeps: AdamW, betas 0.9/0.999, no weight
decay, linear decay of the learning rate to 0, gradient norm clipped at 1.0, the loss of a step is
the summed NLL of its completion tokens over their count):
- an optimizer step is `batch_size x grad_accum` rows (a seeded shuffle per epoch, `plan_steps`),
  computed in micro-batches of at most TOKEN_BUDGET computed tokens, a prompt prefix shared by the
  step's rows computed once, the LM head on the completion positions only: see
  training/microbatch.py. Micro-batches give the gradient of the whole step (tested);
- bf16 on bf16 GPUs (dtype auto) and on request (dtype bfloat16): frozen base weights stored in
  bf16, autocast, LoRA weights and AdamW in fp32; PEFT's cast of each LoRA input to fp32 is turned
  off (under autocast it only kept an fp32 copy of every linear input alive). fp32 on CPU by
  default, even with avx512_bf16 (see weights/device.py: what `dtype: auto` means);
- no gradient checkpointing (TRL's default): micro-batches keep memory small without it;
- torch threads set to the CPU budget (affinity and cgroup quota) while training.
Time and memory figures are in README.md (Performance) and bench/train_throughput.py's output.

A training session, under a lock on `out_dir` (`_train_locked`): prepare the rows (tokenize, drop
the over-long), open the work folder (resume or start over), set up the model and the optimizer,
restore the last checkpoint if resuming, run the training loop, save the adapter.

Writes are atomic: the adapter is saved into a temporary sibling folder that replaces `out_dir` at
the end (`rundir.staged_dir`). Checkpoints for resuming (adapter, optimizer and RNG state, every
SAVE_STEPS steps) live in a sibling work folder `.<name>.work/` that is removed on success, and are
reused only when the data, hyperparameters and base checkpoint are the same (a fingerprint file
says so, `_resume_fingerprint`); the step plan is a function of the seed, so a resumed run trains
the remaining steps on the rows it would have trained.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..console import phase
from ..errors import StepError
from ..failpoints import failpoint
from ..files import remove_stale_staged, staged_dir, write_atomic
from ..recipe import Groups, Lora, SoftPrompt, Train
from ..weights.device import autocast
from ..weights.soft_prompt import (
    SUBFOLDER,
    init_soft_prompt,
    load_soft_prompt,
    save_soft_prompt,
    soft_prompt_files,
    virtual_ids,
)
from . import microbatch
from .curriculum import curriculum_steps, rank, row_losses
from .data_parallel import Ranks, launch
from .hashing import fingerprint
from .microbatch import Row, micro_batch_losses, plan_step

SAVE_STEPS = 20  # a checkpoint every this many optimizer steps: the most a killed run loses
# Computed tokens per micro-batch (rows x its longest row; with a shared prefix, the prefix once +
# rows x the longest suffix): bounds activation memory whatever the recipe's batch size. The CPU
# budget fits several sst2 rows that share their prompt in one micro-batch; lower it for a smaller
# machine (README, Performance).
TOKEN_BUDGET = {"cpu": {"bfloat16": 1024, "float32": 1024}, "cuda": {"bfloat16": 8192, "float32": 4096}}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RESULT_FILE = "training.json"  # TrainResult of the run, next to the adapter files
_FINGERPRINT = "fingerprint.json"
_CURRICULUM = "curriculum.json"  # in the work folder: the rows' difficulty, for a resumed run


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
    processes: int = 1  # data-parallel training processes (training/data_parallel.py)
    virtual_tokens: int = 0  # of the soft prompt trained with the adapter (the s step), if any
    curriculum: list[int] | None = None  # with train.curriculum: the rows (as kept) easiest first

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["adapter_dir"] = str(self.adapter_dir)
        return out


@dataclass(frozen=True)
class SoftTraining:
    """What the s step adds to a LoRA training: a soft prompt of `prompt.virtual_tokens` put before every
    row, trained in the same backward pass, and each parameter group's settings."""

    prompt: SoftPrompt
    groups: Groups
    lora_rate: float  # the LoRA group's learning rate (groups.lora's, or train.learning_rate)
    init_text: str | None = None  # the module's instructions, with prompt.init == "instructions"

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt.model_dump(mode="json"),
            "groups": self.groups.model_dump(mode="json"),
            "lora_rate": self.lora_rate,
            "init_text": self.init_text,
        }

    @classmethod
    def from_json(cls, data: dict) -> SoftTraining:
        return cls(SoftPrompt(**data["prompt"]), Groups(**data["groups"]), data["lora_rate"], data["init_text"])


# ---------------------------------------------------------------- rows
def to_prompt_completion(rows: list[dict]) -> list[dict]:
    """DSPy chat rows -> TRL conversational prompt/completion rows. Raises StepError on a bad row."""
    out = []
    for i, row in enumerate(rows):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or len(messages) < 2:
            raise StepError(f"training row {i}: expected {{'messages': [..., assistant]}} with at least 2 messages")
        for m in messages:
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("content"), str)
                or m.get("role") not in ("system", "user", "assistant")
            ):
                raise StepError(
                    f"training row {i}: every message needs a role (system/user/assistant) and a text content"
                )
        if messages[-1]["role"] != "assistant":
            raise StepError(
                f"training row {i}: the last message must be the assistant's completion, not {messages[-1]['role']!r}"
            )
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        out.append({"prompt": clean[:-1], "completion": clean[-1:]})
    return out


def tokenize_pair(tokenizer, pair: dict) -> tuple[list[int], int]:
    """(input ids of prompt + completion, index of the first completion token), as TRL tokenizes a
    conversational prompt/completion row: the completion starts where the tokenized prompt (with the
    generation prompt) and the tokenized prompt + completion diverge. The checkpoint's chat template
    is applied as the engine applies it to prompts (chat.py)."""
    from ..weights.chat import chat_ids

    prompt = chat_ids(tokenizer, pair["prompt"], add_generation_prompt=True)
    full = chat_ids(tokenizer, pair["prompt"] + pair["completion"], add_generation_prompt=False)
    start = 0
    for a, b in zip(prompt, full):
        if a != b:
            break
        start += 1
    return full, start


@contextmanager
def _silent():
    """phase()'s stand-in in the processes other than 0: their progress is process 0's."""
    yield lambda n=1, note="": None


@contextmanager
def _threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- files
def _resume_fingerprint(
    checkpoint: Path,
    pairs: list[dict],
    lora: Lora,
    train: Train,
    seed: int,
    device: str,
    dtype: str,
    init_adapter: Path | None = None,
    token_budget: int = 0,
    soft: SoftTraining | None = None,
) -> str:
    """What a work folder's checkpoints were trained on and with: a run resumes them only when it
    computes the same (base checkpoint, starting adapter, rows, settings, micro-batch plan); the
    number of data-parallel processes does not change what is computed."""
    share = microbatch.SHARE_PREFIX
    settings = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "lora": lora.model_dump(mode="json"),
        "train": train.identity("processes"),
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "token_budget": token_budget,
        "trainer": 4 if share else 2,
        "shared_prefix": microbatch.MIN_SHARED_PREFIX if share else 0,
    }
    if soft is not None:
        settings["soft"] = soft.to_json()
    files = (
        [Path(init_adapter) / name for name in ADAPTER_FILES] + soft_prompt_files(init_adapter)
        if init_adapter is not None
        else []
    )
    return fingerprint(settings, pairs, files)


@contextmanager
def _lock(out_dir: Path):
    from filelock import FileLock

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.lock")):
        yield


def is_adapter_dir(path: Path) -> bool:
    return all((Path(path) / f).is_file() for f in ADAPTER_FILES)


# ---------------------------------------------------------------- training
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
    token_budget: int | None = None,
    soft: SoftTraining | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `rows` and write it to `out_dir` (a standard PEFT adapter folder).

    dtype: auto (bf16 autocast on a CUDA GPU with bf16 support, else fp32: resolve_train_dtype), float32
    or bfloat16.
    init_adapter: a PEFT adapter folder to continue training (its r, alpha and target modules are
    kept and `lora` is ignored); None starts a new adapter on the base weights.
    token_budget: computed tokens per micro-batch (default: TOKEN_BUDGET[device][dtype]; a shared prefix
    counts once); bounds activation memory, never changes the optimizer step (batch_size x grad_accum rows).
    soft: train a soft prompt together with the adapter (the s step): its settings, and the two parameter
    groups' (SoftTraining); saved as a PEFT prompt-tuning folder in out_dir/prompt_tuning (soft_prompt.py)."""
    if not rows:
        raise StepError("no training rows: nothing to fine-tune on (did every trace fail the metric?)")
    pairs = to_prompt_completion(rows)
    out_dir = Path(out_dir)
    with _lock(out_dir):
        return _train_locked(
            Path(checkpoint),
            pairs,
            out_dir,
            lora,
            train,
            seed,
            Path(log_path) if log_path else None,
            device,
            resume,
            dtype,
            Path(init_adapter) if init_adapter else None,
            token_budget or 0,
            soft,
        )


def plan_steps(n_rows: int, rows_per_step: int, epochs: float, seed: int) -> list[list[int]]:
    """Row indices of every optimizer step: a fresh seeded shuffle each epoch, cut into steps of
    `rows_per_step` (the last of an epoch may be shorter); ceil(epochs x steps per epoch) steps."""
    per_epoch = math.ceil(n_rows / rows_per_step)
    total = max(1, math.ceil(epochs * per_epoch - 1e-9))
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < total:
        order = list(range(n_rows))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        steps += [order[i : i + rows_per_step] for i in range(0, n_rows, rows_per_step)]
        epoch += 1
    return steps[:total]


def load_for_training(
    checkpoint: Path, lora: Lora, device: str, dtype: str, seed: int, init_adapter: Path | None = None
):
    """The base model (frozen; bf16 weights when training in bf16) with a trainable fp32 LoRA adapter."""
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from ..weights.checkpoint import load_causal_lm

    transformers.set_seed(seed)  # before the LoRA A matrices are initialized
    model = load_causal_lm(checkpoint, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    model.config.use_cache = False
    if device == "cuda":
        model.to("cuda")
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True, local_files_only=True)
    else:
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules),
        )
        model = get_peft_model(model, config)
    for p in model.parameters():  # the adapter trains in fp32 whatever the base weights are
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if dtype == "bfloat16":
        _no_fp32_input_casts(model)
    model.train()
    return model


def _no_fp32_input_casts(model) -> None:
    """Turn off PEFT's cast of each LoRA input to the adapter's fp32 (a saved fp32 copy of every linear
    input: most of the activation memory); under autocast the bf16 input can go in as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


# ---------------------------------------------------------------- the training session
@dataclass
class _Data:
    """The rows a session trains on: those within train.max_length, tokenized."""

    pairs: list[dict]  # the prompt/completion rows kept
    rows: list[Row]  # their token ids and first completion token
    lengths: list[int]  # their token counts
    dropped: int  # rows left out for being longer than train.max_length
    pad_id: int
    tokenizer: Any = None  # the checkpoint's (a soft prompt's text init tokenizes with it)


@dataclass
class _Plan:
    """What the training loop computes, and how."""

    steps: list[list[int]]  # row indices of every optimizer step (plan_steps)
    per_epoch: int  # optimizer steps per epoch
    learning_rate: float  # of the first step; it decays linearly to 0
    token_budget: int  # computed tokens per micro-batch
    device: str
    dtype: str  # resolved: float32 or bfloat16
    work: Path  # the work folder of checkpoints
    ranks: Ranks = Ranks()  # this process among the data-parallel training processes
    curriculum: list[int] | None = None  # with train.curriculum: every row, easiest first


@dataclass
class _Session:
    """The model in training and its optimizer; `step` optimizer steps are done."""

    model: Any
    optimizer: Any
    names: list[str]  # of the trainable parameters (LoRA, then the soft prompt), as checkpoints store them
    params: list
    soft: Any = None  # the soft prompt [virtual tokens, hidden] (a Parameter), with SoftTraining
    penalties: list = field(default_factory=list)  # (l2, params) of the groups with an L2 penalty
    step: int = 0
    tokens_before: int = 0  # tokens trained by the sessions before this one (from the checkpoint)
    resumed_from_step: int | None = None


def _train_locked(
    checkpoint: Path,
    pairs: list[dict],
    out_dir: Path,
    lora: Lora,
    train: Train,
    seed: int,
    log_path: Path | None,
    device: str,
    resume: bool,
    dtype: str,
    init_adapter: Path | None = None,
    token_budget: int = 0,
    soft: SoftTraining | None = None,
    ranks: Ranks = Ranks(),
) -> TrainResult:
    """train_lora, holding the lock of out_dir: the steps of a training session, in order. With
    train.processes > 1 it starts that many processes, each of which runs this with its `ranks`."""
    from ..weights.device import resolve_device, resolve_train_dtype

    device = resolve_device(device)
    dtype = resolve_train_dtype(dtype, device)
    token_budget = token_budget or TOKEN_BUDGET[device][dtype]
    if ranks.main:
        remove_stale_staged(out_dir)  # adapter folders half-written by a killed run; we hold the lock
    if train.processes > 1 and ranks.count == 1:
        return _train_in_processes(
            checkpoint,
            pairs,
            out_dir,
            lora,
            train,
            seed,
            log_path,
            device,
            resume,
            dtype,
            init_adapter,
            token_budget,
            soft,
        )
    data = _prepare_data(checkpoint, pairs, train.max_length, soft.prompt.virtual_tokens if soft else 0)
    if init_adapter is not None and not is_adapter_dir(init_adapter):
        raise StepError(f"{init_adapter}: not a PEFT adapter folder (needs {' and '.join(ADAPTER_FILES)})")
    work = out_dir.parent / f".{out_dir.name}.work"
    key = _resume_fingerprint(
        checkpoint, data.pairs, lora, train, seed, device, dtype, init_adapter, token_budget, soft
    )
    last = _open_work_dir(work, resume, key) if ranks.main else None
    ranks.barrier()  # process 0 has checked (or started over) the work folder
    if not ranks.main:
        last = _last_checkpoint(work)
    model = load_for_training(checkpoint, lora, device, dtype, seed, init_adapter)
    session = _setup_optimizer(
        model, train.learning_rate, device, _soft_prompt(model, data, soft, init_adapter, seed), soft
    )
    difficulty = _difficulty(session, data, train, device, dtype, token_budget, work, ranks.main)
    plan = _training_plan(data, train, seed, token_budget, device, dtype, work, ranks, difficulty)
    if last is not None:
        _load_checkpoint(session, last, device)
    logger = _JsonlLog(log_path if ranks.main else None, session.resumed_from_step)
    with _training_errors(session, plan, train.max_length):
        tokens, seconds = _train_loop(session, data, plan, logger, f"LoRA training {out_dir.name}")
    result = _train_result(out_dir, data, plan, session, tokens, seconds, logger.last_loss)
    if ranks.main:
        _save_adapter(session, result, out_dir, checkpoint)
        shutil.rmtree(work, ignore_errors=True)
    return result


def _train_in_processes(
    checkpoint: Path,
    pairs: list[dict],
    out_dir: Path,
    lora: Lora,
    train: Train,
    seed: int,
    log_path: Path | None,
    device: str,
    resume: bool,
    dtype: str,
    init_adapter: Path | None,
    token_budget: int,
    soft: SoftTraining | None,
) -> TrainResult:
    """_train_locked in train.processes processes (training/data_parallel.py); process 0's result."""
    job = {
        "checkpoint": str(checkpoint),
        "pairs": pairs,
        "out_dir": str(out_dir),
        "lora": lora.model_dump(),
        "train": train.model_dump(),
        "seed": seed,
        "log_path": str(log_path) if log_path else None,
        "device": device,
        "resume": resume,
        "dtype": dtype,
        "init_adapter": str(init_adapter) if init_adapter else None,
        "token_budget": token_budget,
        "soft": soft.to_json() if soft else None,
    }
    result = launch(train.processes, device, out_dir, job)
    return TrainResult(**{**result, "adapter_dir": Path(result["adapter_dir"])})


def _prepare_data(checkpoint: Path, pairs: list[dict], max_length: int, virtual: int = 0) -> _Data:
    """Tokenize the prompt/completion rows with the checkpoint's tokenizer (after `virtual` soft-prompt
    tokens, if any) and drop those longer than max_length tokens; StepError when none is left."""
    from ..weights.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)  # its chat template formats the rows, as the engine's prompts
    encoded = [
        (virtual_ids(virtual) + ids, start + virtual) for ids, start in (tokenize_pair(tokenizer, p) for p in pairs)
    ]
    keep = [i for i, (ids, _) in enumerate(encoded) if len(ids) <= max_length]
    if not keep:
        raise StepError(
            f"no training rows: all {len(pairs)} rows are longer than train.max_length="
            f"{max_length} tokens (shortest {min(len(ids) for ids, _ in encoded)}); "
            "raise train.max_length"
        )
    rows = [encoded[i] for i in keep]
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)  # masked out
    return _Data(
        pairs=[pairs[i] for i in keep],
        rows=rows,
        lengths=[len(ids) for ids, _ in rows],
        dropped=len(pairs) - len(keep),
        pad_id=pad_id,
        tokenizer=tokenizer,
    )


def _open_work_dir(work: Path, resume: bool, key: str) -> Path | None:
    """The last checkpoint in the work folder when `resume` and the folder was made for this
    fingerprint `key` (the same data and settings); else None, and the folder is started over."""
    last = None
    if resume and work.is_dir():
        try:
            same = json.loads((work / _FINGERPRINT).read_text()).get("fingerprint") == key
        except (OSError, ValueError):
            same = False
        last = _last_checkpoint(work) if same else None
    if last is None and work.exists():
        shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        write_atomic(work / _FINGERPRINT, json.dumps({"fingerprint": key}) + "\n")
    return last


def _difficulty(
    session: _Session, data: _Data, train: Train, device: str, dtype: str, token_budget: int, work: Path, main: bool
) -> list[float] | None:
    """Each row's difficulty for train.curriculum (None without one): its length, or the loss of the model
    as it starts. Kept in the work folder, so that a resumed run trains on the plan it began with."""
    if train.curriculum is None:
        return None
    saved = work / _CURRICULUM
    if saved.is_file():
        return json.loads(saved.read_text())["difficulty"]
    if train.curriculum.by == "length":
        difficulty = [float(n) for n in data.lengths]
    else:
        with phase("curriculum: loss of every row", total=None):
            difficulty = row_losses(session.model, data.rows, data.pad_id, device, dtype, token_budget, session.soft)
    if main:
        write_atomic(saved, json.dumps({"difficulty": difficulty}) + "\n")
    return difficulty


def _answers(data: _Data, train: Train) -> list[str] | None:
    """Each row's completion text, for a balanced curriculum; None: not balanced."""
    if train.curriculum is None or not train.curriculum.balance:
        return None
    return [pair["completion"][-1]["content"] for pair in data.pairs]


def _training_plan(
    data: _Data,
    train: Train,
    seed: int,
    token_budget: int,
    device: str,
    dtype: str,
    work: Path,
    ranks: Ranks,
    difficulty: list[float] | None = None,
) -> _Plan:
    """The optimizer steps' rows: a fresh shuffle every epoch, or easy rows first (train.curriculum)."""
    rows_per_step = train.batch_size * train.grad_accum
    ranked = None if difficulty is None else rank(difficulty, _answers(data, train))
    steps = (
        plan_steps(len(data.rows), rows_per_step, train.epochs, seed)
        if ranked is None
        else curriculum_steps(ranked, rows_per_step, train.epochs, seed, train.curriculum.stages)
    )
    return _Plan(
        steps=steps,
        per_epoch=math.ceil(len(data.rows) / rows_per_step),
        learning_rate=train.learning_rate,
        token_budget=token_budget,
        device=device,
        dtype=dtype,
        work=work,
        ranks=ranks,
        curriculum=ranked,
    )


def _soft_prompt(model, data: _Data, soft: SoftTraining | None, init_adapter: Path | None, seed: int):
    """The trainable soft prompt of an s step (None without one): the init adapter's if it has one, else
    initialized as soft.prompt.init says."""
    import torch

    if soft is None:
        return None
    base = model.get_base_model()
    start = load_soft_prompt(init_adapter) if init_adapter is not None else None
    if start is None:
        text = soft.init_text if soft.prompt.init == "instructions" else None
        start = init_soft_prompt(base, data.tokenizer, soft.prompt.virtual_tokens, text, seed)
    if start.shape != (soft.prompt.virtual_tokens, base.get_input_embeddings().embedding_dim):
        raise StepError(
            f"{init_adapter}: its soft prompt is {tuple(start.shape)}, the recipe asks for "
            f"{soft.prompt.virtual_tokens} virtual tokens"
        )
    return torch.nn.Parameter(start.to(base.device))


def _setup_optimizer(
    model, learning_rate: float, device: str, soft_param=None, soft: SoftTraining | None = None
) -> _Session:
    """AdamW on the model's trainable (LoRA) parameters, with TRL's settings (no weight decay); with an s
    step's soft prompt, two parameter groups (LoRA, soft prompt), each with its own settings."""
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    names = [n for n, _ in trainable]
    groups = [{"params": params, "lr": learning_rate, "weight_decay": 0.0}]
    penalties = []
    if soft_param is not None:
        lora, prompt = soft.groups.lora, soft.groups.soft_prompt
        groups = [
            {"params": params, "lr": soft.lora_rate, "weight_decay": lora.weight_decay},
            {"params": [soft_param], "lr": prompt.learning_rate, "weight_decay": prompt.weight_decay},
        ]
        penalties = [(g.l2, ps) for g, ps in ((lora, params), (prompt, [soft_param])) if g.l2 > 0]
        params, names = params + [soft_param], names + ["soft_prompt"]
    for group in groups:
        group["peak_lr"] = group["lr"]  # each group decays linearly from its own
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, **_fused(device))
    return _Session(model=model, optimizer=optimizer, names=names, params=params, soft=soft_param, penalties=penalties)


def _fused(device: str) -> dict:
    import torch

    try:  # fused AdamW: one kernel for all the adapter's tensors (CPU since torch 2.4)
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError):  # pragma: no cover
        return {}


def _train_loop(session: _Session, data: _Data, plan: _Plan, logger: _JsonlLog, label: str) -> tuple[int, float]:
    """The optimizer steps from session.step to the end of the plan, each logged and shown as
    progress, a checkpoint every SAVE_STEPS steps; (tokens trained, seconds)."""
    import torch

    from ..weights.device import cpu_budget

    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n_steps, tokens = len(plan.steps), 0
    start = time.perf_counter()
    threads = max(1, cpu_budget() // plan.ranks.count)
    with (
        _threads(threads) if plan.device == "cpu" else nullcontext(),
        phase(label, n_steps - session.step) if plan.ranks.main else _silent() as tick,
    ):
        for index in range(session.step, n_steps):
            decay = (n_steps - index) / n_steps  # every group's learning rate decays linearly to 0
            loss, grad_norm, step_tokens = _train_step(session, data, plan.steps[index], decay, plan)
            lr = session.optimizer.param_groups[0]["lr"]  # the LoRA group's
            tokens += step_tokens
            logger.log(index + 1, (index + 1) / plan.per_epoch, loss, lr, grad_norm)
            tick(note=f"loss {loss:.3f}")
            if (index + 1) % SAVE_STEPS == 0 and index + 1 < n_steps and plan.ranks.main:
                _save_checkpoint(plan.work, index + 1, session, session.tokens_before + tokens)
            session.step = index + 1
            failpoint("train-step")
    return tokens, time.perf_counter() - start


def _train_step(session: _Session, data: _Data, step: list[int], decay: float, plan: _Plan) -> tuple[float, float, int]:
    """One optimizer step on the rows `step`, in micro-batches, every group's learning rate at `decay` x
    its peak: (loss per completion token, gradient norm before clipping, tokens trained). The groups' L2
    penalties, if any, join the gradient once per step (they are not in the loss returned)."""
    import torch

    for group in session.optimizer.param_groups:
        group["lr"] = group.get("peak_lr", plan.learning_rate) * decay
    n_labels = sum(data.lengths[i] - data.rows[i][1] for i in step)  # completion tokens (label count)
    total, tokens = 0.0, 0
    groups = plan_step(data.lengths, plan.ranks.share(step), plan.token_budget, data.rows)
    with autocast(plan.device, plan.dtype):
        for micro, nll, _ in micro_batch_losses(
            session.model, data.rows, groups, data.pad_id, plan.device, session.soft
        ):
            (nll / n_labels).backward()  # divided by the step's label count: the micro-batches add up to the step
            total += float(nll.detach())
            tokens += sum(data.lengths[i] for i in micro)
    total, tokens = plan.ranks.sum_step(session.params, total, tokens)
    if session.penalties:  # after the sum over processes: counted once
        sum(l2 * sum(p.float().pow(2).sum() for p in params) for l2, params in session.penalties).backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(session.params, 1.0))
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    return total / n_labels, grad_norm, tokens


@contextmanager
def _training_errors(session: _Session, plan: _Plan, max_length: int):
    """A StepError for a failed training loop: out of memory (and what to lower), or the step that
    failed (and where its checkpoints are kept for a rerun)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as err:
        raise StepError(
            f"LoRA training ran out of {plan.device} memory with micro-batches of "
            f"{plan.token_budget} tokens, max_length={max_length}: lower train.max_length"
        ) from err
    except (RuntimeError, ValueError) as err:
        raise StepError(
            f"LoRA training failed at step {session.step + 1}: {err} "
            f"(checkpoints, if any, are kept in {plan.work} and a rerun resumes from them)"
        ) from err


def _train_result(
    out_dir: Path, data: _Data, plan: _Plan, session: _Session, tokens: int, seconds: float, final_loss: float | None
) -> TrainResult:
    import torch

    return TrainResult(
        adapter_dir=out_dir,
        steps=len(plan.steps),
        epochs=len(plan.steps) / plan.per_epoch,
        rows=len(data.rows),
        train_tokens=tokens,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        seconds=round(seconds, 3),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if plan.device == "cuda" else None,
        final_loss=final_loss,
        device=plan.device,
        dtype=plan.dtype,
        dropped_rows=data.dropped,
        resumed_from_step=session.resumed_from_step,
        processes=plan.ranks.count,
        virtual_tokens=0 if session.soft is None else int(session.soft.shape[0]),
        curriculum=plan.curriculum,
    )


def _save_adapter(session: _Session, result: TrainResult, out_dir: Path, checkpoint: Path) -> None:
    """The adapter (adapter_config.json + adapter_model.safetensors), its soft prompt if any (a PEFT
    prompt-tuning folder in prompt_tuning/) and the TrainResult (training.json) into out_dir, which
    they replace whole."""
    with staged_dir(out_dir) as tmp:
        session.model.save_pretrained(str(tmp))
        if session.soft is not None:
            save_soft_prompt(session.soft, tmp / SUBFOLDER, checkpoint, session.model.get_base_model().config)
        write_atomic(tmp / RESULT_FILE, json.dumps(result.to_json(), indent=2) + "\n")


# ---------------------------------------------------------------- checkpoints
def _save_checkpoint(work: Path, step: int, session: _Session, tokens: int) -> None:
    """Adapter, optimizer and RNG state after `step` optimizer steps (and `tokens` trained so far)
    into the work folder, replacing the previous checkpoint."""
    import torch

    path = work / f"checkpoint-{step}.pt"
    tmp = work / f".checkpoint-{step}.pt.tmp"
    torch.save(
        {
            "step": step,
            "tokens": tokens,
            "rng": torch.get_rng_state(),
            "adapter": {n: p.detach().cpu() for n, p in zip(session.names, session.params)},
            "optimizer": session.optimizer.state_dict(),
        },
        tmp,
    )
    os.replace(tmp, path)
    for old in work.glob("checkpoint-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)


def _load_checkpoint(session: _Session, path: Path, device: str) -> None:
    """Restore a save_checkpoint into the session: it resumes after the checkpoint's step."""
    import torch

    state = torch.load(path, map_location=device, weights_only=True)
    with torch.no_grad():
        for name, p in zip(session.names, session.params):
            p.copy_(state["adapter"][name])
    session.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    session.step = session.resumed_from_step = int(state["step"])
    session.tokens_before = int(state.get("tokens", 0))


def _last_checkpoint(work: Path) -> Path | None:
    found = [(_checkpoint_step(p.stem), p) for p in work.glob("checkpoint-*.pt")]
    found = [(s, p) for s, p in found if s is not None]
    return max(found)[1] if found else None


def _checkpoint_step(path: str) -> int | None:
    try:
        return int(Path(path).name.rsplit("-", 1)[-1])
    except ValueError:
        return None


class _JsonlLog:
    """One JSON line per optimizer step in train_log.jsonl, rewritten atomically after each (a small
    file); a resumed run keeps the lines of the steps it resumes after."""

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
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in self.lines))
