"""A DSPy 3.4 engine that runs a transformers causal LM in-process, with LoRA adapters chosen per request.

    engine = get_engine("builtin:smollm2-135m-instruct", "auto", "auto")
    lm = dspy.LM("local/smollm2", engine=engine, async_engine=engine.async_engine, max_tokens=64, temperature=0)
    engine.add_adapter("classify-03", "runs/x/step-2/adapter")
    tuned = lm.copy(model="local/smollm2@classify-03")      # same weights in memory, adapter on top

How it works: one worker thread owns the model; callers (DSPy's thread pools call complete() from
many threads, the async engine from an event loop) tokenize their prompt in their own thread, put a
job on a queue and wait for its future. The worker serves the queue in batches:

- Batching. After the first job it waits a few milliseconds for others (longer, up to
  `max_wait_s`, while fewer jobs are there than were waiting at once during the last batch: DSPy's
  threads come back a few ms apart, and a batch that leaves half of them behind splits the callers
  into two cohorts for good), then runs every greedy job it holds that uses the same weights (base
  model or one adapter) in one batched forward pass per token. Sampled requests (temperature > 0) run alone with
  `model.generate`. Adding an adapter is a job too: it runs between batches, never during one.
- Shared prefix. DSPy prompts of one module start with the same system message and demos. The
  longest common token prefix of a batch is computed once (batch 1) and its key/value cache is
  repeated for every row; only each row's own suffix is fed in batch (left-padded, with a 2-D
  attention mask and explicit position ids, so padding sits between prefix and suffix and no row
  sees another's tokens). Prefixes of 16+ tokens are also kept in a small LRU, keyed by the
  weights (base, or adapter name + folder + load count) and the prefix's token ids, so later
  batches and lone calls skip them too. An entry is reused only for the exact same weights:
  replacing an adapter drops its entries, and its new load count would never match them anyway.
- Decoding. A plain greedy loop over model forward + DynamicCache. Each row stops at its own end
  (eos, its stop strings checked after every token, its max_tokens): its caller gets the answer
  at once and the row leaves the batch, so short answers never wait for long ones.

Greedy results do not depend on batching in float32 (the tests check batched == unbatched and
prefix reuse == none): padding is masked out, so a batch changes only floating-point rounding. In
bfloat16 (dtype auto on CPUs with avx512_bf16, and GPUs) that rounding is coarse enough that an
answer near a tie can change with the batch it ran in or the prefix split.

Weights are chosen by the request's model id: an id with "@<name>" runs the registered PEFT adapter
<name>, any other id the base weights (adapters disabled). All adapters live on one PeftModel that
wraps the one base model: adding one costs its LoRA matrices, never a copy of the base.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import re
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from dspy.clients.engines.base import validate_request
from dspy.lm15 import (
    ConfigurationError,
    ContextLengthError,
    InvalidRequestError,
    Message,
    Response,
    Usage,
    UnsupportedFeatureError,
    response_to_events,
)

from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StoppingCriteria, StoppingCriteriaList

from ..errors import InputError
from .compat import cache_keyword
from .device import limit_torch_threads, resolve_device, resolve_dtype
from .embedded import resolve_checkpoint

DEFAULT_MAX_TOKENS = 512  # when a request names none; build_lm always passes the recipe's
_ADAPTER_NAME = re.compile(r"^[^.@\s]+$")  # PEFT keeps adapters in ModuleDicts (no dots); '@' splits ids
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

MAX_BATCH = 16  # rows decoded together
PREFILL_TOKENS = 8192  # rows x padded suffix length fed in one forward pass (bounds activation memory)
MIN_PREFIX = 16  # shorter shared prefixes are not worth an LRU entry
PREFIX_CACHE_TOKENS = 8192  # LRU budget, in cached tokens (batch 1): ~190 MB in bf16 for SmolLM2-135M
PREFIX_CACHE_ENTRIES = 8


# ---------------------------------------------------------------- model ids
def adapter_of(model_id: str) -> str | None:
    """'local/smollm2@classify-03' -> 'classify-03'; an id without '@' -> None (base weights)."""
    _, at, name = model_id.rpartition("@")
    if not at:
        return None
    if not name:
        raise InvalidRequestError(f"model id {model_id!r} ends in '@' without an adapter name")
    return name


class _StopStrings(StoppingCriteria):
    """model.generate stopping criterion (sampled requests): done once the text holds a stop string."""

    def __init__(self, engine: "LocalEngine", stops: tuple[str, ...], prompt_len: int):
        self.engine, self.stops, self.prompt_len = engine, stops, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        done = [any(s in self.engine._decode_text(row[self.prompt_len:].tolist()) for s in self.stops)
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass(eq=False)
class _Job:
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


# ---------------------------------------------------------------- the engine
class LocalEngine:
    """A DSPy 3.4 custom engine (dspy.LM(model, engine=LocalEngine(...))) running transformers in-process.

    Tuning knobs (attributes, may be changed between calls): max_batch (1 turns batching off),
    batch_window_s, max_wait_s, prefix_reuse (False: every prompt is computed in full, nothing is
    shared or cached). `stats` counts greedy requests, batches, rows, prompt_tokens (all prompts),
    prefill_tokens (prompt tokens actually run, pads included), lru_tokens (taken from the LRU)."""

    def __init__(self, checkpoint: str | Path, dtype: str = "auto", device: str = "auto"):
        self.source = str(checkpoint)  # "builtin:..." stays portable in saved programs
        self.checkpoint = resolve_checkpoint(self.source)
        self.requested = {"dtype": dtype, "device": device}
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device == "cpu":
            limit_torch_threads()
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=self.dtype, local_files_only=True)
        self.model = model.to(self.device).eval()
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.weights_id = _fingerprint(self.checkpoint, self.dtype)
        self.eos_ids = _eos_ids(self.model)
        self._cache_kw = cache_keyword(model)
        self.adapters: dict[str, str] = {}  # name -> adapter folder
        self._loads: dict[str, int] = {}  # name -> how many times it was (re)loaded: part of prefix-cache keys
        self._peft = None  # the PeftModel wrapping self.model, once an adapter is added
        self.max_batch = MAX_BATCH
        self.batch_window_s = 0.004  # wait after the first job for others that arrive together
        self.max_wait_s = 0.05  # ... and up to this long while fewer than the last batch have come
        self.prefix_reuse = True
        self._prefixes: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()  # the LRU
        self._waiting = 0  # generation jobs submitted and not answered yet
        self._peak = 1  # the most that were waiting at once since the last batch was gathered
        self.stats: Counter = Counter()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed against concurrent submit/close
        self._tok_lock = threading.Lock()  # callers tokenize in their threads; fast tokenizers dislike races
        self._closed = False
        self._pid = os.getpid()  # a forked child has no worker thread
        self._worker = threading.Thread(target=self._serve, name="jointopt-engine", daemon=True)
        self._worker.start()
        self.async_engine = AsyncLocalEngine(self)

    def __repr__(self) -> str:
        return f"LocalEngine({self.source!r}, dtype={str(self.dtype)[6:]}, device={self.device})"

    # ---- the DSPy engine contract
    def complete(self, request) -> Response:
        validate_request(request)
        return self._submit_request(request).result()

    def stream(self, request):
        """One delta with the whole text: DSPy's streaming listeners work, token streaming is for later."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Stop the worker after the queued jobs and forget this engine; later calls raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        _forget(self)
        if threading.current_thread() is not self._worker:
            self._worker.join()
        self.model = self._peft = None
        self._prefixes.clear()

    def dump_state(self) -> dict:
        """What load_state needs to rebuild this engine (DSPy saves it with program.save()); no secrets."""
        source = self.source if self.source.startswith("builtin:") else str(self.checkpoint)
        return {"checkpoint": source, **self.requested, "adapters": dict(self.adapters)}

    @classmethod
    def load_state(cls, state: dict) -> "LocalEngine":
        engine = get_engine(state["checkpoint"], state.get("dtype", "auto"), state.get("device", "auto"))
        for name, folder in (state.get("adapters") or {}).items():
            engine.add_adapter(name, folder)
        return engine

    # DSPy deep-copies programs, and LMs with them: every copy must share this engine, not its weights.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (LocalEngine.load_state, (self.dump_state(),))

    # ---- adapters
    def add_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Register a PEFT LoRA adapter; requests whose model id ends in '@<name>' then use it.
        Adding a name again with another folder replaces it; with the same folder it is a no-op."""
        if not _ADAPTER_NAME.match(name):
            raise InputError(f"adapter name {name!r}: must be non-empty, without '.', '@' or spaces")
        folder = Path(adapter_dir).expanduser().resolve()
        if not (folder / "adapter_config.json").is_file():
            raise InputError(f"adapter {name!r}: {adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
        self._submit(self._load_adapter, name, str(folder)).result()

    def _load_adapter(self, name: str, folder: str) -> None:
        if self.adapters.get(name) == folder:
            return
        from peft import PeftModel

        # other weights under this name from now on: its cached prefixes must never be used again
        for key in [k for k in self._prefixes if k[0][:2] == ("adapter", name)]:
            del self._prefixes[key]
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False)
        else:
            if name in self.adapters:
                self._peft.delete_adapter(name)
            self._peft.load_adapter(folder, adapter_name=name, is_trainable=False)
        self._peft.eval()
        self.adapters[name] = folder
        self._loads[name] = self._loads.get(name, 0) + 1

    def _weights(self, model_id: str):
        """(module to generate with, context that selects its weights, prefix-cache key of those weights)."""
        name = adapter_of(model_id)
        if name is None:
            context = nullcontext() if self._peft is None else self._peft.disable_adapter()
            return (self.model if self._peft is None else self._peft), context, ("base",)
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise InvalidRequestError(f"model id {model_id!r}: no adapter {name!r} registered (known: {known})")
        self._peft.set_adapter(name)
        return self._peft, nullcontext(), ("adapter", name, self.adapters[name], self._loads[name])

    # ---- callers' side
    def _submit(self, fn, *args) -> Future:
        """Queue a call for the worker (adapter loads): it runs between batches."""
        future: Future = Future()
        self._put((fn, args, future))
        return future

    def _submit_request(self, request) -> Future:
        """Tokenize and check in the caller's thread, then queue the generation job."""
        config = request.config
        prompt = self._prompt_ids(request)
        max_new = config.max_tokens or DEFAULT_MAX_TOKENS
        if self.context_length and len(prompt) + max_new > self.context_length:
            raise ContextLengthError(f"{len(prompt)} prompt tokens + max_tokens {max_new} exceed the "
                                     f"model's context of {self.context_length} tokens")
        job = _Job(request, prompt, max_new, tuple(config.stop or ()))
        self._put(job)
        job.future.add_done_callback(self._answered)  # answered, failed or cancelled
        return job.future

    def _answered(self, _future) -> None:
        with self._lock:
            self._waiting -= 1

    def _put(self, job) -> None:
        with self._lock:
            if self._closed:
                raise ConfigurationError("the local engine is closed")
            if os.getpid() != self._pid:
                raise ConfigurationError("the local engine was created in another process (fork); "
                                         "build the LM again in this one")
            self._jobs.put(job)
            if isinstance(job, _Job):
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
                if not isinstance(job, _Job):
                    self._run_call(*job)
                elif not job.greedy:
                    self._run_batch([job])
                else:
                    batch = self._gather(job, held)
                    self._run_batch(batch)

    def _gather(self, first: _Job, held: list) -> list[_Job]:
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
            if isinstance(job, _Job) and job.greedy:
                batch.append(job)
            else:
                held.append(job)  # a barrier (adapter load, close) or a sampled request: after this batch
        return batch

    def _run_call(self, fn, args, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the caller, the worker lives on
            future.set_exception(exc)

    def _run_batch(self, jobs: list[_Job]) -> None:
        """Run the jobs, one group per weights; every job's future gets its result or the error."""
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drop cancelled async calls
        groups: dict[str, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.request.model.partition("@")[2], []).append(job)  # adapter name or ""
        for group in groups.values():
            try:
                model, weights, key = self._weights(group[0].request.model)
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
    def _greedy(self, jobs: list[_Job], weights_key: tuple) -> None:
        self.stats["requests"] += len(jobs)
        self.stats["prompt_tokens"] += sum(len(j.prompt) for j in jobs)
        prefix_len, prefix = self._prefix(jobs, weights_key)
        # chunks of rows with similar suffix lengths (less padding), within the batch and prefill budgets
        jobs = sorted(jobs, key=lambda j: len(j.prompt))
        chunk: list[_Job] = []
        for job in jobs:
            width = len(job.prompt) - prefix_len  # the longest suffix so far (sorted)
            if chunk and (len(chunk) >= self.max_batch or (len(chunk) + 1) * width > PREFILL_TOKENS):
                self._decode(chunk, prefix_len, prefix)
                chunk = []
            chunk.append(job)
        self._decode(chunk, prefix_len, prefix)

    def _prefix(self, jobs: list[_Job], weights_key: tuple) -> tuple[int, list | None]:
        """The shared prefix of the jobs' prompts and its key/value tensors (batch 1), from the LRU
        where possible. Every row keeps at least one token of its own: its logits give the first new token."""
        if not self.prefix_reuse:
            return 0, None
        prompts = [j.prompt for j in jobs]
        target = min(_common_len(prompts[0], p) for p in prompts)
        target = min(target, min(len(p) for p in prompts) - 1)
        if target <= 0:
            return 0, None
        ids = prompts[0][:target]
        # the cached entry that shares most tokens with this prefix (any part of an entry is reusable)
        best_key, have = None, 0
        for key in self._prefixes:
            if key[0] == weights_key:
                n = _common_len(key[1], ids)
                if n >= have and n > 0:
                    best_key, have = key, n
        kv = None
        if best_key is not None:
            self._prefixes.move_to_end(best_key)
            kv = [(k[:, :, :have], v[:, :, :have]) for k, v in self._prefixes[best_key]]
        self.stats["lru_tokens"] += have  # taken from the LRU instead of computed
        if have < target:  # compute the rest of the prefix once, on top of what was cached
            cache = _cache_from(kv, repeat=1)
            self._forward(torch.tensor([ids[have:]], device=self.device), cache,
                          positions=torch.arange(have, target, device=self.device)[None])
            kv = [(k, v) for k, v, *_ in cache]
            self.stats["prefill_tokens"] += target - have
            # worth keeping: a prefix that several rows share, or a lone prompt with nothing cached
            # like it (the next lone prompt of the same module then reuses its shared part)
            if target >= MIN_PREFIX and (len(jobs) > 1 or have < MIN_PREFIX):
                self._remember((weights_key, tuple(ids)), kv)
        return target, kv

    def _remember(self, key: tuple, kv: list) -> None:
        self._prefixes[key] = kv
        self._prefixes.move_to_end(key)
        while len(self._prefixes) > PREFIX_CACHE_ENTRIES or \
                (len(self._prefixes) > 1 and sum(len(k[1]) for k in self._prefixes) > PREFIX_CACHE_TOKENS):
            self._prefixes.popitem(last=False)

    def _decode(self, jobs: list[_Job], prefix_len: int, prefix: list | None) -> None:
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
            ids[i, width - len(suffix):] = torch.tensor(suffix)
            mask[i, prefix_len + width - len(suffix):] = 1
            positions[i, width - len(suffix):] = torch.arange(prefix_len, prefix_len + len(suffix))
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = _cache_from(prefix, repeat=n)
        logits = self._forward(ids, cache, mask, positions)
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
                active, tokens = [active[i] for i in keep], [tokens[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = self._forward(torch.tensor(tokens, device=self.device)[:, None], cache, mask, next_pos)
            next_pos = next_pos + 1

    def _forward(self, ids, cache, mask=None, positions=None) -> torch.Tensor:
        """One forward pass that extends `cache`; the logits of the last position, one row per sequence.
        self.model is the base model with the LoRA layers (if any) injected: _weights chose the adapter."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self._cache_kw: cache},
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _append(self, job: _Job, token: int) -> bool:
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

    def _respond(self, job: _Job) -> None:
        text, finish = self._finish(job.new, job.stops, job.max_new)
        self.stats["output_tokens"] += len(job.new)
        job.future.set_result(Response(id=None, model=job.request.model, message=Message.assistant(text),
                                       finish_reason=finish,
                                       usage=Usage(input_tokens=len(job.prompt), output_tokens=len(job.new))))

    # ---- sampled requests: one at a time through model.generate
    def _sample(self, model, job: _Job) -> None:
        self.stats["sampled"] += 1
        config = job.request.config
        if config.seed is not None:
            torch.manual_seed(config.seed)  # global RNG: only this worker thread samples
        kwargs = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p or 1.0,
                  "top_k": config.top_k or 0}
        if job.stops:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(self, job.stops, len(job.prompt))])
        ids = torch.tensor([job.prompt], device=self.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.max_new,
                             pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        job.new = out[0, len(job.prompt):].tolist()
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
            return text[:min(cuts)], "stop"
        ended = bool(new) and new[-1] in self.eos_ids
        return text, "stop" if ended or len(new) < max_new else "length"

    def _prompt_ids(self, request) -> list[int]:
        """The tokenizer's chat template applied to request.system + request.messages."""
        if request.tools:
            raise UnsupportedFeatureError("the local engine does not support tools", feature="tools")
        messages = []
        if request.system is not None:
            messages.append({"role": "system", "content": _system_text(request.system)})
        for m in request.messages:
            if m.role not in _ROLES or m.text is None:
                raise UnsupportedFeatureError(f"the local engine takes text messages from "
                                              f"{', '.join(_ROLES)}; got a {m.role} message with "
                                              f"{', '.join(p.type for p in m.parts)} parts")
            messages.append({"role": _ROLES[m.role], "content": m.text})
        with self._tok_lock:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class AsyncLocalEngine:
    """The async face of a LocalEngine (dspy.LM(..., async_engine=...)): awaits the same worker's jobs."""

    def __init__(self, engine: LocalEngine):
        self.engine = engine

    async def complete(self, request) -> Response:
        validate_request(request)
        return await asyncio.wrap_future(self.engine._submit_request(request))

    async def stream(self, request):
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Nothing to release: the engine is shared (see get_engine) and closed with LocalEngine.close()."""

    def dump_state(self) -> dict:
        return self.engine.dump_state()

    @classmethod
    def load_state(cls, state: dict) -> "AsyncLocalEngine":
        return LocalEngine.load_state(state).async_engine

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _common_len(a, b) -> int:
    """Length of the common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _cache_from(kv: list | None, repeat: int) -> DynamicCache:
    """A fresh DynamicCache holding `kv` (per layer: keys, values of batch 1) repeated `repeat` times
    along the batch. The cache copies the tensors, so the LRU's entries are never changed by decoding."""
    if kv is None:
        return DynamicCache()
    return DynamicCache([(k.expand(repeat, -1, -1, -1), v.expand(repeat, -1, -1, -1)) for k, v in kv])


def _system_text(system) -> str:
    if isinstance(system, str):
        return system
    if not all(p.type == "text" for p in system):
        raise UnsupportedFeatureError("the local engine takes a text-only system prompt", feature="system")
    return "".join(p.text for p in system)


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _fingerprint(checkpoint: Path, dtype: torch.dtype) -> str:
    """Identity of the weights as loaded (files by path, size and mtime; dtype): part of DSPy's cache
    key through build_lm, so a changed checkpoint or dtype never returns another model's answers."""
    parts = [str(checkpoint), str(dtype)]
    for f in sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.bin")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- one engine per weights
_ENGINES: dict[tuple[str, str, str], LocalEngine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(checkpoint: str | Path, dtype: str = "auto", device: str = "auto") -> LocalEngine:
    """The process-wide engine for (checkpoint, dtype, device): one copy of the weights however
    many dspy.LMs, predictors and adapters use it. `checkpoint` may be "builtin:..." or a folder."""
    resolved_device = resolve_device(device)
    key = (str(resolve_checkpoint(str(checkpoint))), str(resolve_dtype(dtype, resolved_device)), resolved_device)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = LocalEngine(checkpoint, dtype, device)
        return engine


def _forget(engine: LocalEngine) -> None:
    with _ENGINES_LOCK:
        for key in [k for k, e in _ENGINES.items() if e is engine]:
            del _ENGINES[key]
