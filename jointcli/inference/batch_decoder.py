"""Serves generation jobs on one worker thread: concurrent greedy requests are decoded together as a batch.

Callers put jobs on a queue (BatchDecoder.submit) and wait for their futures; the worker serves the
queue in batches:

- Batching. After the first job it waits a few milliseconds for others (longer, up to
  `max_wait_s`, while fewer jobs are there than were waiting at once during the last batch: DSPy's
  threads come back a few ms apart, and a batch that leaves half of them behind splits the callers
  into two cohorts for good), then runs every greedy job it holds that uses the same weights (base
  model or one adapter) in one batched forward pass per token. Sampled requests (temperature > 0)
  run alone with `model.generate`. Other calls (BatchDecoder.call: adapter loads) run between
  batches, never during one.
- Shared prefix. The batch's longest common token prefix comes from prefix_cache.PrefixCache (computed
  once, or taken from its LRU); only each row's own suffix is fed in batch (left-padded, with a 2-D
  attention mask and explicit position ids, so padding sits between prefix and suffix and no row
  sees another's tokens). transformers measures a sliding window in cache slots, which those pads
  shift: hybrid full/sliding-window models (Gemma 2/3) get per-layer-type masks built from the real
  positions instead, and other window patterns batch only rows of one prompt length (attention_layout).
- Decoding. A plain greedy loop over model forward + DynamicCache. Each row stops at its own end
  (eos, its stop strings checked after every token, its max_tokens): its caller gets the answer
  at once and the row leaves the batch, so short answers never wait for long ones.

Greedy results do not depend on batching in float32 (the tests check batched == unbatched and
prefix reuse == none): padding is masked out, so a batch changes only floating-point rounding. In
bfloat16 (dtype auto on CPUs with avx512_bf16, and GPUs) that rounding is coarse enough that an
answer near a tie can change with the batch it ran in or the prefix split.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from dspy.lm15 import ConfigurationError, Message, Response, Usage
from transformers import StoppingCriteria, StoppingCriteriaList

from ..weights.compat import cache_keyword
from ..weights.soft_prompt import model_inputs
from .model_id import split_model_id
from .prefix_cache import PrefixCache, cache_with

MAX_BATCH = 16  # rows decoded together
PREFILL_TOKENS = 8192  # rows x padded suffix length fed in one forward pass (bounds activation memory)


class _StopStrings(StoppingCriteria):
    """model.generate stopping criterion (sampled requests): done once the text holds a stop string."""

    def __init__(self, decoder: BatchDecoder, stops: tuple[str, ...], prompt_len: int):
        self.decoder, self.stops, self.prompt_len = decoder, stops, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        done = [
            any(s in self.decoder._decode_text(row[self.prompt_len :].tolist()) for s in self.stops)
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


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

    @property
    def greedy(self) -> bool:
        return not (self.request.config.temperature or 0.0) > 0


class BatchDecoder:
    """The worker thread that owns the model and serves its generation jobs (see the module docstring).

    `select_weights(model_id)` (the engine's) returns the module to generate with, a context that
    selects its weights and the prefix-cache key of those weights; `model` is the base model with the
    LoRA layers (if any) injected, so a forward pass runs the weights the context selected.

    Tuning knobs (attributes, may be changed between calls): max_batch (1 turns batching off),
    batch_window_s, max_wait_s, prefix_reuse (False: every prompt is computed in full, nothing is
    shared or cached). `stats` counts greedy requests, batches, rows, prompt_tokens (all prompts),
    prefill_tokens (prompt tokens actually run, pads included), lru_tokens (taken from the LRU)."""

    def __init__(self, model, tokenizer, tokenizer_lock: threading.Lock, device: str, select_weights):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self._tok_lock = tokenizer_lock  # shared with the callers, who tokenize in their threads
        self.select_weights = select_weights
        self.eos_ids = _eos_ids(model, tokenizer)
        self._cache_kw = cache_keyword(model)
        self._layout = attention_layout(model.config)  # how rows may be padded (sliding-window models)
        self.max_batch = MAX_BATCH
        self.batch_window_s = 0.004  # wait after the first job for others that arrive together
        self.max_wait_s = 0.05  # ... and up to this long while fewer than the last batch have come
        self.prefix_reuse = True
        self.soft = None  # the soft prompt of the weights in use (soft_prompt context), for virtual tokens
        self.stats: Counter = Counter()
        self.prefixes = PrefixCache(self._forward, device, self.stats)
        self._waiting = 0  # generation jobs submitted and not answered yet
        self._peak = 1  # the most that were waiting at once since the last batch was gathered
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed against concurrent submit/stop
        self._closed = False
        self._pid = os.getpid()  # a forked child has no worker thread
        self._worker = threading.Thread(target=self._serve, name="jointopt-engine", daemon=True)
        self._worker.start()

    # ---- callers' side
    def submit(self, job: Job) -> Future:
        """Queue a generation job; its future gets the Response."""
        self._put(job)
        job.future.add_done_callback(self._answered)  # answered, failed or cancelled
        return job.future

    def call(self, fn, *args) -> Future:
        """Queue a call for the worker (adapter loads): it runs between batches."""
        future: Future = Future()
        self._put((fn, args, future))
        return future

    def stop(self) -> bool:
        """End the worker after the jobs queued so far; later submits raise. False if it was stopped before."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._jobs.put(None)
        return True

    def join(self) -> None:
        """Wait for the stopped worker (unless called from it), then let go of the model and the prefixes."""
        if threading.current_thread() is not self._worker:
            self._worker.join()
        self.model = None
        self.prefixes.clear()

    def _answered(self, _future) -> None:
        with self._lock:
            self._waiting -= 1

    def _put(self, job) -> None:
        with self._lock:
            if self._closed:
                raise ConfigurationError("the local engine is closed")
            if os.getpid() != self._pid:
                raise ConfigurationError(
                    "the local engine was created in another process (fork); build the LM again in this one"
                )
            self._jobs.put(job)
            if isinstance(job, Job):
                self._waiting += 1
                self._peak = max(self._peak, self._waiting)

    # ---- the worker
    def _serve(self) -> None:
        held: list = []  # jobs taken off the queue but not run yet (they came after a batch was closed)
        with torch.inference_mode():
            while True:
                job = held.pop(0) if held else self._jobs.get()
                if job is None:
                    return
                if not isinstance(job, Job):
                    self._run_call(*job)
                elif not job.greedy:
                    self._run_batch([job])
                else:
                    batch = self._gather(job, held)
                    self._run_batch(batch)

    def _gather(self, first: Job, held: list) -> list[Job]:
        """Greedy jobs that arrive together with `first`; anything else is held back for later, in order."""
        batch = [first]
        start = time.perf_counter()
        with self._lock:
            expected, self._peak = self._peak, self._waiting
        while len(batch) < self.max_batch and not held:
            # wait at least the window; longer while fewer jobs than were waiting at once during the
            # last batch have come (callers come back a few ms apart), never longer than max_wait_s
            limit = self.batch_window_s if len(batch) >= expected else self.max_wait_s
            remaining = start + limit - time.perf_counter()
            try:
                job = self._jobs.get_nowait() if remaining <= 0 else self._jobs.get(timeout=remaining)
            except queue.Empty:
                break
            if isinstance(job, Job) and job.greedy:
                batch.append(job)
            else:
                held.append(job)  # a barrier (adapter load, close) or a sampled request: after this batch
        return batch

    @contextmanager
    def soft_prompt(self, soft):
        """While a batch runs: the soft prompt [n, hidden] that its prompts' virtual tokens (ids -1..-n)
        stand for (soft_prompt.py); None: the weights have none."""
        self.soft = soft
        try:
            yield
        finally:
            self.soft = None

    def _run_call(self, fn, args, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the caller, the worker lives on
            future.set_exception(exc)

    def _run_batch(self, jobs: list[Job]) -> None:
        """Run the jobs, one group per weights; every job's future gets its result or the error."""
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drop cancelled async calls
        groups: dict[str | None, list[Job]] = {}
        for job in jobs:
            groups.setdefault(split_model_id(job.request.model)[1], []).append(job)  # adapter name or None
        for group in groups.values():
            try:
                model, weights, key = self.select_weights(group[0].request.model)
                with weights:
                    if group[0].greedy:
                        self._greedy(group, key)
                    else:
                        self._sample(model, group[0])
            except BaseException as exc:  # handed to the callers, the worker lives on
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)

    # ---- greedy decoding, batched, with the shared prefix computed once
    def _greedy(self, jobs: list[Job], weights_key: tuple) -> None:
        self.stats["requests"] += len(jobs)
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
                or (len(chunk) + 1) * width > PREFILL_TOKENS
                or (unpadded and len(job.prompt) != len(chunk[-1].prompt))
            ):
                self._decode(chunk, prefix_len, prefix)
                chunk = []
            chunk.append(job)
        self._decode(chunk, prefix_len, prefix)

    def _decode(self, jobs: list[Job], prefix_len: int, prefix: list | None) -> None:
        """Greedy decoding of the rows that share `prefix` (key/value tensors of its first prefix_len tokens)."""
        n = len(jobs)
        self.stats["batches"] += 1
        self.stats["rows"] += n
        suffixes = [j.prompt[prefix_len:] for j in jobs]
        width = max(map(len, suffixes))
        self.stats["prefill_tokens"] += n * width  # pads included
        # left-pad the suffixes: every row's last prompt token sits in the last column, so one logits
        # column serves all; the pads lie between prefix and suffix and are masked out
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
        sliding = isinstance(self._layout, SlidingLayout)
        keys = (
            torch.cat([torch.arange(prefix_len, device=self.device).expand(n, -1), positions], dim=1)
            if sliding
            else None
        )
        cache = cache_with(prefix, repeat=n)
        logits = self._forward(ids, cache, self._mask(mask, keys, positions), positions)
        next_pos = positions[:, -1:] + 1
        active = list(jobs)
        while True:
            tokens = logits.argmax(-1).tolist()
            keep = [i for i, (job, token) in enumerate(zip(active, tokens)) if not self._append(job, token)]
            if not keep:
                return
            if len(keep) < len(active):  # finished rows leave the batch: no more compute for them
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos = mask[index], next_pos[index]
                keys = keys[index] if sliding else None
                active, tokens = [active[i] for i in keep], [tokens[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            keys = torch.cat([keys, next_pos], dim=1) if sliding else None
            logits = self._forward(
                torch.tensor(tokens, device=self.device)[:, None], cache, self._mask(mask, keys, next_pos), next_pos
            )
            next_pos = next_pos + 1

    def _mask(self, mask, keys, queries):
        """The attention mask of a forward pass: the 2-D padding mask (transformers builds the causal
        mask from it), or for a hybrid sliding-window model one 4-D mask per layer type built from
        the tokens' real positions (see attention_layout)."""
        if keys is None:
            return mask
        return self._layout.masks(mask, keys, queries, self.model.dtype)

    def _forward(self, ids, cache, mask=None, positions=None) -> torch.Tensor:
        """One forward pass that extends `cache`; the logits of the last position, one row per sequence.
        self.model is the base model with the LoRA layers (if any) injected: select_weights chose the adapter."""
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

    # ---- sampled requests: one at a time through model.generate
    def _sample(self, model, job: Job) -> None:
        self.stats["sampled"] += 1
        config = job.request.config
        if config.seed is not None:
            torch.manual_seed(config.seed)  # global RNG: only this worker thread samples
        kwargs = {
            "do_sample": True,
            "temperature": config.temperature,
            "top_p": config.top_p or 1.0,
            "top_k": config.top_k or 0,
        }
        # virtual tokens (a soft prompt): generate from embeddings, which returns the new tokens only
        embedded = self.soft is not None and min(job.prompt) < 0
        start = 0 if embedded else len(job.prompt)
        if job.stops:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(self, job.stops, start)])
        ids = torch.tensor([job.prompt], device=self.device)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else min(self.eos_ids, default=None)  # none: generate would warn
        out = model.generate(
            **model_inputs(self.model, ids, self.soft if embedded else None),
            attention_mask=torch.ones_like(ids),
            max_new_tokens=job.max_new,
            pad_token_id=pad,
            **kwargs,
        )
        job.new = out[0, start:].tolist()
        self._respond(job)

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


def _eos_ids(model, tokenizer) -> set[int]:
    """The ids that end an answer: the checkpoint's generation_config (Llama 3, Gemma and Qwen list their
    end-of-turn tokens there) and its tokenizer's eos token."""
    eos = model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}


# ---------------------------------------------------------------- sliding-window attention
UNPADDED = "unpadded"  # attention_layout: batch only rows of one prompt length (no padding at all)


@dataclass(frozen=True)
class SlidingLayout:
    """A hybrid model whose layers attend fully or within a sliding window (Gemma 2/3, Qwen2 with
    use_sliding_window): transformers measures the window in cache slots, which the pads between the
    shared prefix and a row's suffix would shift, so the decoder gives each layer type a 4-D mask
    built from the tokens' real positions instead (the models take a {layer type: mask} mapping)."""

    window: int
    layer_types: tuple[str, ...]

    def masks(self, padding, keys, queries, dtype) -> dict:
        """{layer type: additive mask [rows, 1, queries, keys]}. padding: [rows, keys] 1 for real tokens;
        keys, queries: their positions; the queries are the last slots of the cache."""
        import torch

        distance = queries[:, :, None] - keys[:, None, :]  # [rows, queries, keys]
        allowed = padding.bool()[:, None, :] & (distance >= 0)
        own = torch.zeros(distance.shape[1:], dtype=torch.bool, device=distance.device)
        q = own.shape[0]
        own[torch.arange(q), own.shape[1] - q + torch.arange(q)] = True  # a pad query sees itself: no empty row
        out = {}
        for kind in self.layer_types:
            ok = allowed & (distance < self.window) if kind == "sliding_attention" else allowed
            out[kind] = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(
                ~(ok | own), torch.finfo(dtype).min
            )[:, None]
        return out


def attention_layout(config):
    """How the decoder may pad a batch for this model: None (causal attention over every earlier
    token: a 2-D padding mask is enough), a SlidingLayout (full and sliding-window layers: masks of
    its own), or UNPADDED (any other attention pattern, e.g. a sliding window on every layer without
    layer types, or chunked attention: rows are batched only with rows of the same prompt length, where
    a cache slot is a position and transformers' own masks are right)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = tuple(dict.fromkeys(getattr(text, "layer_types", None) or ()))
    if not types:
        return UNPADDED if window else None
    if set(types) <= {"full_attention"}:
        return None
    if window and set(types) <= {"full_attention", "sliding_attention"}:
        return SlidingLayout(int(window), types)
    return UNPADDED
