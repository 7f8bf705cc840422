"""Running generation jobs on the model: rows decoded together over a shared prefix, greedy or sampled.
The worker thread that gathers the jobs into batches is batch_decoder.py.

- Shared prefix. The batch's longest common token prefix comes from prefix_cache.PrefixCache (computed
  once, or taken from its LRU); only each row's own suffix is fed in batch (left-padded, with a 2-D
  attention mask and explicit position ids, so padding sits between prefix and suffix and no row
  sees another's tokens). Models whose attention those pads would disturb get masks of their own or
  batch only rows of one prompt length (attention.py).
- Decoding. A plain loop over model forward + DynamicCache. A greedy row takes the argmax; a sampled
  row (temperature > 0) draws from its logits after transformers' temperature, top-k and top-p
  warpers, with a generator of its own (seeded by the request's seed, else from torch's global RNG),
  so a seeded request draws the same tokens whatever batch it runs in. Each row stops at its own end
  (eos, its stop strings checked after every token, its max_tokens): its caller gets the answer
  at once and the row leaves the batch, so short answers never wait for long ones.
- Limits. At most `max_batch` rows run together and at most `prefill_tokens` (rows x padded suffix
  length) go into one forward pass; the recipe sets both (models.<name>.limits). A batch that runs
  out of memory fails its callers with a StepError that names those limits.

Greedy results do not depend on batching in float32 (the tests check batched == unbatched and
prefix reuse == none): padding is masked out, so a batch changes only floating-point rounding. In
bfloat16 (dtype auto on CPUs with avx512_bf16, and GPUs) that rounding is coarse enough that an
answer near a tie can change with the batch it ran in or the prefix split.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from dspy.lm15 import Message, Response, Usage
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..errors import StepError
from ..recipe.sections import EngineLimits
from ..weights.compat import cache_keyword
from ..weights.soft_prompt import model_inputs
from .attention import UNPADDED, SlidingLayout, attention_layout
from .model_id import model_name, split_model_id
from .prefix_cache import PrefixCache, cache_with


@dataclass(eq=False)
class Job:
    """One generation request on its way through the worker."""

    request: object
    prompt: list[int]
    max_new: int
    stops: tuple[str, ...]
    future: Future = field(default_factory=Future)
    new: list[int] = field(default_factory=list)  # generated token ids
    checked: int = 0  # length of the generated text already searched for stop strings
    _sampler: tuple | None = None  # (warpers, generator) of a sampled job, made at its first token

    @property
    def greedy(self) -> bool:
        return not (self.request.config.temperature or 0.0) > 0

    def draw(self, logits: torch.Tensor) -> int:
        """The next token of a sampled job: drawn from `logits` [vocab] after the request's warpers."""
        if self._sampler is None:
            config = self.request.config
            warpers = LogitsProcessorList([TemperatureLogitsWarper(config.temperature)])
            if config.top_k:
                warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                warpers.append(TopPLogitsWarper(config.top_p))
            seed = config.seed if config.seed is not None else int(torch.randint(2**62, (1,)))
            self._sampler = (warpers, torch.Generator(logits.device).manual_seed(seed))
        warpers, generator = self._sampler
        probs = warpers(None, logits[None].float()).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Rows:
    """The rows of a batch as decoding goes: the attention mask over the cache, the next
    position of each row, and (sliding-window models only) the position of every cached key."""

    jobs: list[Job]
    mask: torch.Tensor
    next_pos: torch.Tensor
    keys: torch.Tensor | None

    def keep(self, index: list[int], device: str) -> torch.Tensor:
        """Only the rows at `index` go on (the others are done); their index tensor."""
        at = torch.tensor(index, device=device)
        self.jobs = [self.jobs[i] for i in index]
        self.mask, self.next_pos = self.mask[at], self.next_pos[at]
        self.keys = None if self.keys is None else self.keys[at]
        return at

    def advance(self) -> None:
        """One more token per row in the cache, at next_pos."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.jobs), 1))], dim=1)
        self.keys = None if self.keys is None else torch.cat([self.keys, self.next_pos], dim=1)


class Generation:
    """Runs jobs on the model (see the module docstring); BatchDecoder adds the worker thread.

    Tuning knobs (attributes, may be changed between calls): max_batch (1 turns batching off),
    prefill_tokens, prefix_reuse (False: every prompt is computed in full, nothing is shared or
    cached), prefixes.max_tokens (the LRU's budget); apply_limits sets them from the recipe's limits.
    `stats` counts requests (sampled: those at temperature > 0), batches, rows, prompt_tokens (all
    prompts), prefill_tokens (prompt tokens actually run, pads included), lru_tokens (taken from the
    LRU), output_tokens."""

    def __init__(self, model, tokenizer, tokenizer_lock: threading.Lock, device: str, limits: EngineLimits):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self._tok_lock = tokenizer_lock  # shared with the callers, who tokenize in their threads
        self.eos_ids = _eos_ids(model, tokenizer)
        self._cache_kw = cache_keyword(model)
        self._layout = attention_layout(model.config)  # how rows may be padded (sliding-window models)
        self.prefix_reuse = True
        self.soft = None  # the soft prompt of the weights in use (soft_prompt context), for virtual tokens
        self.stats: Counter = Counter()
        self.prefixes = PrefixCache(self._forward, device, self.stats, limits.prefix_cache_tokens)
        self.apply_limits(limits)

    def apply_limits(self, limits: EngineLimits) -> None:
        """Serve with these batch limits from the next batch on."""
        self.max_batch, self.prefill_tokens = limits.max_batch, limits.prefill_tokens
        self.prefixes.max_tokens = limits.prefix_cache_tokens

    @contextmanager
    def soft_prompt(self, soft):
        """While a batch runs: the soft prompt [n, hidden] that its prompts' virtual tokens (ids -1..-n)
        stand for (soft_prompt.py); None: the weights have none."""
        self.soft = soft
        try:
            yield
        finally:
            self.soft = None

    def out_of_memory(self, jobs: list[Job]) -> StepError:
        """The one-line error of jobs that ran out of memory: which limits to lower, and where."""
        model_id, n = split_model_id(jobs[0].request.model)[0], len(jobs)
        return StepError(
            f"{model_id} ran out of {self.device} memory on {n} request{'s' * (n != 1)} at once: lower "
            f"models.{model_name(model_id)}.limits.max_batch ({self.max_batch}), .prefill_tokens "
            f"({self.prefill_tokens}) or .prefix_cache_tokens ({self.prefixes.max_tokens}) "
            "(in your own code: local_lm(limits=...))"
        )

    # ---- decoding, batched, with the shared prefix computed once
    def decode(self, jobs: list[Job], weights_key: tuple) -> None:
        """Decode jobs of one weights (`weights_key`: the prefix cache's key of them) in batches."""
        self.stats["requests"] += len(jobs)
        self.stats["sampled"] += sum(not j.greedy for j in jobs)
        self.stats["prompt_tokens"] += sum(len(j.prompt) for j in jobs)
        prefix_len, prefix = 0, None
        if self.prefix_reuse:
            prefix_len, prefix = self.prefixes.shared_prefix([j.prompt for j in jobs], weights_key)
        # chunks of rows with similar suffix lengths (less padding), within the batch and prefill budgets
        jobs = sorted(jobs, key=lambda j: len(j.prompt))
        chunk: list[Job] = []
        unpadded = self._layout is UNPADDED  # rows of one prompt length only: no pads at all
        for job in jobs:
            width = len(job.prompt) - prefix_len  # the longest suffix so far (sorted)
            if chunk and (
                len(chunk) >= self.max_batch
                or (len(chunk) + 1) * width > self.prefill_tokens
                or (unpadded and len(job.prompt) != len(chunk[-1].prompt))
            ):
                self._decode(chunk, prefix_len, prefix)
                chunk = []
            chunk.append(job)
        self._decode(chunk, prefix_len, prefix)

    def _decode(self, jobs: list[Job], prefix_len: int, prefix: list | None) -> None:
        """Decoding of the rows that share `prefix` (key/value tensors of its first prefix_len tokens)."""
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        ids, rows, positions = self._prefill_inputs(jobs, prefix_len)
        cache = cache_with(prefix, repeat=len(jobs))
        logits = self._forward(ids, cache, self._mask(rows.mask, rows.keys, positions), positions)
        while True:
            tokens = _next_tokens(logits, rows.jobs)
            keep = [i for i, (job, token) in enumerate(zip(rows.jobs, tokens)) if not self._append(job, token)]
            if not keep:
                return
            if len(keep) < len(rows.jobs):  # finished rows leave the batch: no more compute for them
                cache.batch_select_indices(rows.keep(keep, self.device))
                tokens = [tokens[i] for i in keep]
            rows.advance()
            column = torch.tensor(tokens, device=self.device)[:, None]
            logits = self._forward(column, cache, self._mask(rows.mask, rows.keys, rows.next_pos), rows.next_pos)
            rows.next_pos = rows.next_pos + 1

    def _prefill_inputs(self, jobs: list[Job], prefix_len: int) -> tuple[torch.Tensor, _Rows, torch.Tensor]:
        """The suffixes after the prefix, left-padded (every row's last prompt token sits in the last
        column, so one logits column serves all; the pads lie between prefix and suffix and are masked
        out): (token ids, the rows, the suffix tokens' positions)."""
        n = len(jobs)
        suffixes = [j.prompt[prefix_len:] for j in jobs]
        width = max(map(len, suffixes))
        self.stats["prefill_tokens"] += n * width  # pads included
        ids = torch.full((n, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((n, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        positions = torch.full((n, width), prefix_len, dtype=torch.long)  # pads: any position will do
        for i, suffix in enumerate(suffixes):
            ids[i, width - len(suffix) :] = torch.tensor(suffix)
            mask[i, prefix_len + width - len(suffix) :] = 1
            positions[i, width - len(suffix) :] = torch.arange(prefix_len, prefix_len + len(suffix))
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        # the position of every cached key (pads: masked out, any value), kept only for sliding-window
        # models, whose masks are built from it
        keys = None
        if isinstance(self._layout, SlidingLayout):
            keys = torch.cat([torch.arange(prefix_len, device=self.device).expand(n, -1), positions], dim=1)
        return ids, _Rows(list(jobs), mask, positions[:, -1:] + 1, keys), positions

    def _mask(self, mask, keys, queries):
        """The attention mask of a forward pass: the 2-D padding mask (transformers builds the causal
        mask from it), or for a hybrid sliding-window model one 4-D mask per layer type built from
        the tokens' real positions (see attention.py)."""
        if keys is None:
            return mask
        return self._layout.masks(mask, keys, queries, self.model.dtype)

    def _forward(self, ids, cache, mask=None, positions=None) -> torch.Tensor:
        """One forward pass that extends `cache`; the logits of the last position, one row per sequence.
        self.model is the base model with the LoRA layers (if any) injected: the engine chose the adapter."""
        soft = self.soft if self.soft is not None and bool((ids < 0).any()) else None
        out = self.model(
            **model_inputs(self.model, ids, soft),
            attention_mask=mask,
            position_ids=positions,
            **{self._cache_kw: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def _append(self, job: Job, token: int) -> bool:
        """Add a generated token to a row; True (and the caller has its answer) once the row is done."""
        job.new.append(token)
        done = token in self.eos_ids or len(job.new) >= job.max_new
        if not done and job.stops:
            text = self._decode_text(job.new)
            longest = max(map(len, job.stops))
            start = max(0, job.checked - longest - 4)  # only the new tail can complete a stop string
            done = any(text.find(s, start) >= 0 for s in job.stops)
            job.checked = len(text)
        if done:
            self._respond(job)
        return done

    def _respond(self, job: Job) -> None:
        text, finish = self._finish(job.new, job.stops, job.max_new)
        self.stats["output_tokens"] += len(job.new)
        job.future.set_result(
            Response(
                id=None,
                model=job.request.model,
                message=Message.assistant(text),
                finish_reason=finish,
                usage=Usage(input_tokens=len(job.prompt), output_tokens=len(job.new)),
            )
        )

    # ---- text
    def _decode_text(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, new: list[int], stops: tuple[str, ...], max_new: int) -> tuple[str, str]:
        """The text up to the first stop string, and why generation ended."""
        text = self._decode_text(new)
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            return text[: min(cuts)], "stop"
        ended = bool(new) and new[-1] in self.eos_ids
        return text, "stop" if ended or len(new) < max_new else "length"


def _next_tokens(logits: torch.Tensor, jobs: list[Job]) -> list[int]:
    """Each row's next token: the argmax, or a draw for a sampled job."""
    tokens = logits.argmax(-1).tolist()
    for i, job in enumerate(jobs):
        if not job.greedy:
            tokens[i] = job.draw(logits[i])
    return tokens


def _eos_ids(model, tokenizer) -> set[int]:
    """The ids that end an answer: the checkpoint's generation_config (Llama 3, Gemma and Qwen list their
    end-of-turn tokens there) and its tokenizer's eos token."""
    eos = model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}
