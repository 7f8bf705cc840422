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
- an optimizer step is `batch_size x grad_accum` rows (a seeded shuffle per epoch); its rows are
  sorted by length and cut into micro-batches of at most TOKEN_BUDGET computed tokens, so memory is
  bounded whatever the recipe's batch size, and rows of similar length share a batch (little
  padding; none when a micro-batch has one row or rows of one length, and then no attention mask
  either). Micro-batches give the gradient of the whole step (tested);
- shared prefix: rows of one module start with the same system message and demos (~370 of ~460
  tokens on sst2). When the rows of a micro-batch share MIN_SHARED_PREFIX+ tokens, that prefix goes
  through the decoder once (batch 1, with gradients) and its key/value cache, repeated for every row,
  serves the rows' own suffixes in one batch (`shared_completion_nll`; the prefix stops before the
  token that predicts the first completion token). A micro-batch then costs prefix + rows x longest
  suffix tokens instead of rows x longest row, so several such rows fit one micro-batch. Same loss
  and LoRA gradients as whole rows (tested); LoRA dropout, if any, draws one mask for the shared part;
- completion-only LM head (`completion_nll`): the decoder body gives hidden states and only the
  ~20 label positions of a ~490-token row go through the 49152-word LM head, instead of the
  [batch, seq, vocab] fp32 logits (770 MB for 8 rows of 490 tokens, and as much again for their
  gradient). Same loss as the model's own (tested);
- bf16 on bf16 GPUs (dtype auto) and on request (dtype bfloat16): frozen base weights stored in
  bf16, autocast, LoRA weights and AdamW in fp32; PEFT's cast of each LoRA input to fp32 is turned
  off (under autocast it only kept an fp32 copy of every linear input alive: 3.6 -> 2.7 GB peak at
  2048 tokens). fp32 on CPU by default, even with avx512_bf16: 1.7x faster there, but worse adapters
  (see resolve_train_dtype);
- no gradient checkpointing (TRL's default): micro-batches keep memory small without it;
- torch threads set to the CPU budget (affinity and cgroup quota) while training.

Measured on 2 shared CPU cores (AMD EPYC, avx512_bf16), rows of ~460 tokens (sst2 with 4 demos),
peak RSS of a training process: fp32 micro-batch of 2048 tokens 6.3 GB, 512 tokens 2.6 GB; bf16 2048
tokens 2.7 GB, 1024 tokens 1.7 GB; the TRL trainer with batch 8 peaked at 13.3 GB in a joint run (on
an Intel Xeon with amx_bf16, fp32 1024 tokens, the CPU default now: 3.6 GB, shared prefix or not,
against 2.3 GB at 512). Throughput before the shared prefix
(bench/train_throughput.py, same rows, 2 shared cores): 201 tokens/s fp32, 347 bf16, against 59 for
TRL's SFTTrainer as DSPy configures it (fp32); the former TRL-based trainer did ~91 in fp32 (README).

Writes are atomic: the adapter is saved into a temporary sibling folder and renamed over
`out_dir` at the end. Checkpoints for resuming (adapter, optimizer and RNG state, every SAVE_STEPS
steps) live in a sibling work folder `.<name>.work/` that is removed on success, and are reused
only when the data, hyperparameters and base checkpoint are the same (a fingerprint file says so);
the step plan is a function of the seed, so a resumed run trains the remaining steps on the rows
it would have trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import math
import random
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..console import phase
from ..errors import StepError
from ..rundir import _umask, write_atomic
from ..recipe import Lora, Train

SAVE_STEPS = 20  # a checkpoint every this many optimizer steps (at most ~2 minutes lost here)
# Computed tokens per micro-batch (rows x its longest row; with a shared prefix, the prefix once +
# rows x the longest suffix): bounds activation memory whatever the recipe's batch size. Measured
# peak RSS of a training process on this 135M model: bf16 1024 tokens 1.7 GB, 2048 tokens 2.7 GB;
# fp32 512 tokens 2.3 GB, 1024 tokens 3.6 GB (shared prefix or not; Intel Xeon), 2048 tokens 6.3 GB. fp32 CPU
# was 512 before the shared prefix: 1024 fits 6 sst2 rows (370 shared + 6 x ~100 tokens) where 512
# fits 1, whole or shared.
TOKEN_BUDGET = {"cpu": {"bfloat16": 1024, "float32": 1024}, "cuda": {"bfloat16": 8192, "float32": 4096}}
# Rows of a micro-batch whose common token prefix is at least this long compute it once (batch 1) and
# run their own suffixes against its key/value cache; a shorter prefix is not worth a second pass.
MIN_SHARED_PREFIX = 32
SHARE_PREFIX = True  # off: every row runs whole (the plan and the gradient are those of trainer 2)
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


# ---------------------------------------------------------------- devices
def resolve_train_dtype(dtype: str, device: str) -> str:
    """auto: bf16 autocast on a CUDA GPU that supports it, else fp32. On a CPU with avx512_bf16, bf16
    trains 1.7x faster (347 against 201 tokens/s, bench/train_throughput.py, 2 cores) but its adapters
    scored lower on sst2 dev (0.72 and 0.68, seeds 0 and 1, against 0.74 and 0.78 in fp32 and 0.76
    and 0.78 with the former TRL trainer), so it is opt-in there (dtype="bfloat16"). The LoRA weights
    and the optimizer always stay in fp32."""
    import torch

    if dtype == "auto":
        return "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise StepError(f"LoRA training dtype {dtype!r}: use auto, float32 or bfloat16")
    return dtype


# ---------------------------------------------------------------- files
def _fingerprint(checkpoint: Path, rows: list[dict], lora: Lora, train: Train, seed: int, device: str,
                 dtype: str, init_adapter: Path | None = None, token_budget: int = 0) -> str:
    h = hashlib.sha256()
    if init_adapter is not None:
        for name in ADAPTER_FILES:
            h.update((Path(init_adapter) / name).read_bytes())
    h.update(json.dumps({"checkpoint": str(Path(checkpoint).resolve()), "lora": lora.model_dump(mode="json"),
                         "train": train.model_dump(mode="json"), "seed": seed, "device": device,
                         "dtype": dtype, "token_budget": token_budget,
                         "trainer": 3 if SHARE_PREFIX else 2,
                         "shared_prefix": MIN_SHARED_PREFIX if SHARE_PREFIX else 0}, sort_keys=True).encode())
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


def is_adapter_dir(path: Path) -> bool:
    return all((Path(path) / f).is_file() for f in ADAPTER_FILES)


# ---------------------------------------------------------------- training
def train_lora(checkpoint: Path, rows: list[dict], out_dir: Path, lora: Lora, train: Train, seed: int = 0,
               log_path: Path | None = None, device: str = "auto", resume: bool = True,
               dtype: str = "auto", init_adapter: Path | None = None,
               token_budget: int | None = None) -> TrainResult:
    """Train a LoRA adapter on `rows` and write it to `out_dir` (a standard PEFT adapter folder).

    dtype: auto (bf16 autocast on a CUDA GPU or CPU with native bf16, else fp32), float32 or bfloat16.
    init_adapter: a PEFT adapter folder to continue training (its r, alpha and target modules are
    kept and `lora` is ignored); None starts a new adapter on the base weights.
    token_budget: computed tokens per micro-batch (default: TOKEN_BUDGET[device][dtype]; a shared prefix
    counts once); bounds activation memory, never changes the optimizer step (batch_size x grad_accum rows)."""
    if not rows:
        raise StepError("no training rows: nothing to fine-tune on (did every trace fail the metric?)")
    pairs = to_prompt_completion(rows)
    out_dir = Path(out_dir)
    with _lock(out_dir):
        return _train_locked(Path(checkpoint), pairs, out_dir, lora, train, seed,
                             Path(log_path) if log_path else None, device, resume, dtype,
                             Path(init_adapter) if init_adapter else None, token_budget or 0)


def tokenize_pair(tokenizer, pair: dict) -> tuple[list[int], int]:
    """(input ids of prompt + completion, index of the first completion token), as TRL tokenizes a
    conversational prompt/completion row: the completion starts where the tokenized prompt (with the
    generation prompt) and the tokenized prompt + completion diverge."""
    def ids(enc):
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)

    prompt = ids(tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True))
    full = ids(tokenizer.apply_chat_template(pair["prompt"] + pair["completion"], tokenize=True))
    start = 0
    for a, b in zip(prompt, full):
        if a != b:
            break
        start += 1
    return full, start


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
        steps += [order[i:i + rows_per_step] for i in range(0, n_rows, rows_per_step)]
        epoch += 1
    return steps[:total]


def micro_batches(lengths: list[int], step: list[int], token_budget: int,
                  rows: list[tuple[list[int], int]] | None = None) -> list[list[int]]:
    """Split one optimizer step's rows into micro-batches of similar length (sorted, longest first),
    each at most `token_budget` computed tokens (a longer row goes alone). Without `rows` (token ids
    and completion start of every row) a micro-batch costs rows x its longest row (padded tokens);
    with them, a micro-batch whose rows share a prefix (`shared_prefix`) costs the prefix once plus
    rows x the longest suffix, which is what `shared_completion_nll` computes."""
    order = sorted(step, key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    common, first_start = 0, 0  # of the last micro-batch: common prefix of its rows, their first completion
    for i in order:
        if out:
            group = out[-1]
            head = group[0]  # the longest row, first of its micro-batch
            n = len(group) + 1
            if rows is None:
                cost = n * lengths[head]
            else:
                c = min(common, _common_len(rows[head][0], rows[i][0]))
                f = min(first_start, rows[i][1])
                shared = _shared_len(c, f, min(lengths[head], lengths[i]), n)
                cost = shared + n * (lengths[head] - shared)
            if cost <= token_budget:
                group.append(i)
                if rows is not None:
                    common, first_start = c, f
                continue
        out.append([i])
        if rows is not None:
            common, first_start = lengths[i], rows[i][1]
    return out


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _shared_len(common: int, first_start: int, shortest: int, n_rows: int) -> int:
    """Prefix tokens a micro-batch computes once: its rows' common prefix, cut so that the hidden
    state predicting each row's first completion token (at first_start - 1) and at least one token
    of every row stay in the suffix; 0 (no sharing) for one row or a prefix under MIN_SHARED_PREFIX."""
    shared = min(common, first_start - 1, shortest - 1)
    return shared if n_rows > 1 and shared >= MIN_SHARED_PREFIX and SHARE_PREFIX else 0


def shared_prefix(rows: list[tuple[list[int], int]]) -> int:
    """Tokens at the start of every row that a micro-batch computes once (see _shared_len); 0: none."""
    if len(rows) < 2:
        return 0
    first = rows[0][0]
    common = min(_common_len(first, ids) for ids, _ in rows[1:])
    return _shared_len(common, min(start for _, start in rows), min(len(ids) for ids, _ in rows), len(rows))


def collate(rows: list[tuple[list[int], int]], pad_id: int, device: str = "cpu"):
    """Right-padded input_ids, attention_mask (None when nothing is padded) and labels (-100 on
    the prompt and the padding)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, start:len(ids)] = input_ids[r, start:len(ids)]
        mask[r, :len(ids)] = 1
    padded = bool((mask == 0).any())
    return (input_ids.to(device), mask.to(device) if padded else None, labels.to(device))


def completion_nll(model, input_ids, attention_mask, labels):
    """Summed cross-entropy of the labeled (completion) tokens, and their count.

    The decoder body gives hidden states; only the positions whose next token has a label go
    through the LM head (~20 of ~500 here), so the [batch, seq, vocab] logits of the full model
    are never built. Same value as the model's own loss x the number of label tokens."""
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def collate_shared(rows: list[tuple[list[int], int]], prefix_len: int, pad_id: int, device: str = "cpu"):
    """The rows' shared first `prefix_len` tokens [1, prefix_len], and their own suffixes as `collate`
    gives them (right-padded input_ids, attention_mask over prefix + suffix or None when nothing is
    padded, labels), plus their position ids (continuing after the prefix)."""
    import torch

    prefix = rows[0][0][:prefix_len]
    if not all(ids[:prefix_len] == prefix and start > prefix_len for ids, start in rows):
        raise ValueError(f"rows do not share {prefix_len} prompt tokens before their completions")
    input_ids, mask, labels = collate([(ids[prefix_len:], start - prefix_len) for ids, start in rows], pad_id)
    if mask is not None:
        mask = torch.cat([mask.new_ones((len(rows), prefix_len)), mask], dim=1)
    positions = torch.arange(prefix_len, prefix_len + input_ids.shape[1])[None].expand(len(rows), -1)
    return (torch.tensor([prefix], device=device), input_ids.to(device),
            mask.to(device) if mask is not None else None, labels.to(device), positions.to(device))


def shared_completion_nll(model, prefix_ids, input_ids, attention_mask, labels, position_ids):
    """completion_nll of rows that start with the same `prefix_ids` (batch 1), as `collate_shared`
    gives them: the prefix goes through the decoder once, and its key/value cache, repeated for every
    row (autograd sums the rows' gradients into the one prefix computation), serves the rows' own
    suffixes in one batch. Same loss and gradients as completion_nll on the whole rows (tested); every
    label and the hidden state predicting it lie in the suffix."""
    import torch.nn.functional as F
    from transformers import DynamicCache

    from .compat import cache_keyword

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    cache_kw = cache_keyword(body)
    prefix_len, (n, width) = prefix_ids.shape[1], input_ids.shape
    cache = DynamicCache(config=base.config)
    body(input_ids=prefix_ids, use_cache=True, **{cache_kw: cache})
    if cache.get_seq_length() != prefix_len:  # the cache keyword was ignored: never train on a wrong loss
        raise RuntimeError(f"the decoder did not fill the prefix cache passed as {cache_kw!r}")
    cache.batch_repeat_interleave(n)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=True, **{cache_kw: cache}).last_hidden_state
    if cache.get_seq_length() != prefix_len + width:
        raise RuntimeError(f"the decoder did not use the prefix cache passed as {cache_kw!r}")
    if bool((labels[:, 0] != -100).any()):
        raise ValueError("a label on the first suffix token: its predicting hidden state is in the prefix")
    targets = labels[:, 1:]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def _autocast(device: str, dtype: str):
    import torch

    if dtype == "bfloat16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def _threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_for_training(checkpoint: Path, lora: Lora, device: str, dtype: str, seed: int,
                      init_adapter: Path | None = None):
    """The base model (frozen; bf16 weights when training in bf16) with a trainable fp32 LoRA adapter."""
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.set_seed(seed)  # before the LoRA A matrices are initialized
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32, local_files_only=True)
    model.config.use_cache = False
    if device == "cuda":
        model.to("cuda")
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True, local_files_only=True)
    else:
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM",
            target_modules=lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules))
        model = get_peft_model(model, config)
    for p in model.parameters():  # the adapter trains in fp32 whatever the base weights are
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if dtype == "bfloat16":
        # PEFT casts each LoRA input to the adapter's fp32 (a saved fp32 copy of every linear input:
        # most of the activation memory); under autocast the bf16 input can go in as it is
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    model.train()
    return model


def _train_locked(checkpoint: Path, pairs: list[dict], out_dir: Path, lora: Lora, train: Train, seed: int,
                  log_path: Path | None, device: str, resume: bool, dtype: str,
                  init_adapter: Path | None = None, token_budget: int = 0) -> TrainResult:
    import torch
    from transformers import AutoTokenizer

    from .device import cpu_budget, resolve_device

    device = resolve_device(device)
    dtype = resolve_train_dtype(dtype, device)
    token_budget = token_budget or TOKEN_BUDGET[device][dtype]
    parent = out_dir.parent
    for stale in parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed run; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    encoded = [tokenize_pair(tokenizer, p) for p in pairs]
    keep = [i for i, (ids, _) in enumerate(encoded) if len(ids) <= train.max_length]
    dropped = len(pairs) - len(keep)
    if not keep:
        raise StepError(f"no training rows: all {len(pairs)} rows are longer than train.max_length="
                        f"{train.max_length} tokens (shortest {min(len(ids) for ids, _ in encoded)}); "
                        "raise train.max_length")
    kept = [pairs[i] for i in keep]
    data = [encoded[i] for i in keep]
    lengths = [len(ids) for ids, _ in data]

    # Resume only a work folder that trained on exactly this data with these settings.
    work = parent / f".{out_dir.name}.work"
    if init_adapter is not None and not is_adapter_dir(init_adapter):
        raise StepError(f"{init_adapter}: not a PEFT adapter folder (needs {' and '.join(ADAPTER_FILES)})")
    fingerprint = _fingerprint(checkpoint, kept, lora, train, seed, device, dtype, init_adapter, token_budget)
    last = None
    if resume and work.is_dir():
        try:
            same = json.loads((work / _FINGERPRINT).read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            same = False
        last = _last_checkpoint(work) if same else None
    if last is None and work.exists():
        shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        write_atomic(work / _FINGERPRINT, json.dumps({"fingerprint": fingerprint}) + "\n")

    steps = plan_steps(len(data), train.batch_size * train.grad_accum, train.epochs, seed)
    per_epoch = math.ceil(len(data) / (train.batch_size * train.grad_accum))
    model = load_for_training(checkpoint, lora, device, dtype, seed, init_adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, **_fused(device))
    done, tokens_before = 0, 0
    if last is not None:
        state = torch.load(last, map_location=device, weights_only=False)
        with torch.no_grad():
            for name, p in zip(names, params):
                p.copy_(state["adapter"][name])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        done, tokens_before = int(state["step"]), int(state.get("tokens", 0))
    resumed_step = done if last is not None else None
    logger = _JsonlLog(log_path, resumed_step)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = 0
    start = time.perf_counter()
    try:
        with _threads(cpu_budget()) if device == "cpu" else nullcontext(), \
                phase(f"LoRA training {out_dir.name}", len(steps) - done) as tick:
            for index in range(done, len(steps)):
                lr = train.learning_rate * (len(steps) - index) / len(steps)  # linear decay to 0
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_rows = steps[index]
                n_labels = sum(lengths[i] - data[i][1] for i in step_rows)  # completion tokens (label count)
                total = 0.0
                for micro in micro_batches(lengths, step_rows, token_budget, data):
                    batch = [data[i] for i in micro]
                    shared = shared_prefix(batch)
                    with _autocast(device, dtype):
                        if shared:
                            nll, _ = shared_completion_nll(model, *collate_shared(batch, shared, pad_id, device))
                        else:
                            nll, _ = completion_nll(model, *collate(batch, pad_id, device))
                    (nll / n_labels).backward()
                    total += float(nll.detach())
                    tokens += sum(lengths[i] for i in micro)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                logger.log(index + 1, (index + 1) / per_epoch, total / n_labels, lr, grad_norm)
                tick(note=f"loss {total / n_labels:.3f}")
                if (index + 1) % SAVE_STEPS == 0 and index + 1 < len(steps):
                    _save_checkpoint(work, index + 1, names, params, optimizer, tokens_before + tokens)
    except torch.OutOfMemoryError as err:
        raise StepError(f"LoRA training ran out of {device} memory with micro-batches of {token_budget} tokens, "
                        f"max_length={train.max_length}: lower train.max_length") from err
    except (RuntimeError, ValueError) as err:
        raise StepError(f"LoRA training failed at step {index + 1}: {err} "
                        f"(checkpoints, if any, are kept in {work} and a rerun resumes from them)") from err
    seconds = time.perf_counter() - start

    result = TrainResult(
        adapter_dir=out_dir,
        steps=len(steps),
        epochs=len(steps) / per_epoch,
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
        model.save_pretrained(str(tmp))  # adapter only: adapter_config.json + adapter_model.safetensors
        write_atomic(tmp / RESULT_FILE, json.dumps(result.to_json(), indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    del model, optimizer
    return result


def _fused(device: str) -> dict:
    import torch

    try:  # fused AdamW: one kernel for all the adapter's tensors (CPU since torch 2.4)
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError):  # pragma: no cover
        return {}


def _save_checkpoint(work: Path, step: int, names, params, optimizer, tokens: int) -> None:
    import torch

    path = work / f"checkpoint-{step}.pt"
    tmp = work / f".checkpoint-{step}.pt.tmp"
    torch.save({"step": step, "tokens": tokens, "rng": torch.get_rng_state(),
                "adapter": {n: p.detach().cpu() for n, p in zip(names, params)},
                "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, path)
    for old in work.glob("checkpoint-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)


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
        self.lines.append({"step": step, "epoch": round(epoch, 4), "loss": self.last_loss,
                           "learning_rate": float(lr),
                           "seconds": round(self._offset + time.perf_counter() - self._start, 3),
                           "grad_norm": float(grad_norm)})
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in self.lines))
