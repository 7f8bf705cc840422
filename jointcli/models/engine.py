"""A DSPy 3.4 engine that runs a transformers causal LM in-process, with LoRA adapters chosen per request.

    engine = get_engine("builtin:smollm2-135m-instruct", "auto", "auto")
    lm = dspy.LM("local/smollm2", engine=engine, async_engine=engine.async_engine, max_tokens=64, temperature=0)
    engine.add_adapter("classify-03", "runs/x/step-2/adapter")
    tuned = lm.copy(model="local/smollm2@classify-03")      # same weights in memory, adapter on top

How it works: one worker thread owns the model and runs the jobs that callers put on a queue, one at
a time, under torch.inference_mode. DSPy's thread pools (Evaluate, optimizers) may call complete()
from many threads: each caller just waits for its own job, so calls are serialized without locks
around the model, and a later version can batch the queued jobs. The async engine awaits the same
jobs without blocking its event loop.

Weights are chosen by the request's model id: an id with "@<name>" runs the registered PEFT adapter
<name>, any other id the base weights (adapters disabled). All adapters live on one PeftModel that
wraps the one base model: adding one costs its LoRA matrices, never a copy of the base.

Greedy decoding (temperature 0, the default) gives the same output for the same prompt: requests
are not batched together, so an answer never depends on what else was running.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import queue
import re
import threading
from concurrent.futures import Future
from contextlib import nullcontext
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

from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from ..errors import InputError
from .embedded import resolve_checkpoint

DEFAULT_MAX_TOKENS = 512  # when a request names none; build_lm always passes the recipe's
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ADAPTER_NAME = re.compile(r"^[^.@\s]+$")  # PEFT keeps adapters in ModuleDicts (no dots); '@' splits ids
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------- device and dtype
def resolve_device(device: str) -> str:
    """auto: cuda when a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for, but torch sees no CUDA GPU; use device: cpu or auto")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: bf16 on CUDA GPUs and CPUs with native bf16 (avx512_bf16 or AMX), else fp32."""
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype != "auto":
        raise InputError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    if resolve_device(device) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def _cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def _limit_torch_threads() -> None:
    """torch may start one thread per host core inside a container with fewer CPUs; oversubscription
    makes generation several times slower. Only ever lowers the count."""
    budget = _cpu_budget()
    if torch.get_num_threads() > budget:
        torch.set_num_threads(budget)


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
    """Stopping criterion: a row is done once its generated text contains one of the stop strings."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        done = [any(s in self.tokenizer.decode(row[self.prompt_len:], skip_special_tokens=True)
                    for s in self.stops) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


# ---------------------------------------------------------------- the engine
class LocalEngine:
    """A DSPy 3.4 custom engine (dspy.LM(model, engine=LocalEngine(...))) running transformers in-process."""

    def __init__(self, checkpoint: str | Path, dtype: str = "auto", device: str = "auto"):
        self.source = str(checkpoint)  # "builtin:..." stays portable in saved programs
        self.checkpoint = resolve_checkpoint(self.source)
        self.requested = {"dtype": dtype, "device": device}
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device == "cpu":
            _limit_torch_threads()
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=self.dtype, local_files_only=True)
        self.model = model.to(self.device).eval()
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.weights_id = _fingerprint(self.checkpoint, self.dtype)
        self.adapters: dict[str, str] = {}  # name -> adapter folder
        self._peft = None  # the PeftModel wrapping self.model, once an adapter is added
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed against concurrent submit/close
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
        return self._submit(self._generate, request).result()

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

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False)
        else:
            if name in self.adapters:
                self._peft.delete_adapter(name)
            self._peft.load_adapter(folder, adapter_name=name, is_trainable=False)
        self._peft.eval()
        self.adapters[name] = folder

    def _weights(self, model_id: str):
        """(module to generate with, context that selects its weights) for a request's model id."""
        name = adapter_of(model_id)
        if name is None:
            return (self.model, nullcontext()) if self._peft is None else (self._peft, self._peft.disable_adapter())
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise InvalidRequestError(f"model id {model_id!r}: no adapter {name!r} registered (known: {known})")
        self._peft.set_adapter(name)
        return self._peft, nullcontext()

    # ---- the worker
    def _submit(self, fn, *args) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise ConfigurationError("the local engine is closed")
            if os.getpid() != self._pid:
                raise ConfigurationError("the local engine was created in another process (fork); "
                                         "build the LM again in this one")
            self._jobs.put((fn, args, future))
        return future

    def _serve(self) -> None:
        with torch.inference_mode():
            while (job := self._jobs.get()) is not None:
                fn, args, future = job
                if not future.set_running_or_notify_cancel():
                    continue  # the caller gave up (a cancelled async call)
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the caller, the worker lives on
                    future.set_exception(exc)

    def _generate(self, request) -> Response:
        config = request.config
        prompt = self._prompt_ids(request)
        max_new = config.max_tokens or DEFAULT_MAX_TOKENS
        if self.context_length and len(prompt) + max_new > self.context_length:
            raise ContextLengthError(f"{len(prompt)} prompt tokens + max_tokens {max_new} exceed the "
                                     f"model's context of {self.context_length} tokens")
        model, weights = self._weights(request.model)
        ids = torch.tensor([prompt], device=self.device)
        kwargs = self._sampling(config)
        if config.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(self.tokenizer, config.stop, len(prompt))])
        with weights:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        new = out[0, len(prompt):].tolist()
        text, finish = self._finish(new, config.stop, max_new)
        return Response(id=None, model=request.model, message=Message.assistant(text), finish_reason=finish,
                        usage=Usage(input_tokens=len(prompt), output_tokens=len(new)))

    def _sampling(self, config) -> dict:
        temperature = config.temperature or 0.0
        if temperature <= 0:
            return {"do_sample": False}
        if config.seed is not None:
            torch.manual_seed(config.seed)  # global RNG: only this worker thread samples
        return {"do_sample": True, "temperature": temperature, "top_p": config.top_p or 1.0,
                "top_k": config.top_k or 0}

    def _finish(self, new: list[int], stops: tuple[str, ...], max_new: int) -> tuple[str, str]:
        """The text up to the first stop string, and why generation ended."""
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            return text[:min(cuts)], "stop"
        ended = bool(new) and new[-1] in _eos_ids(self.model)
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
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class AsyncLocalEngine:
    """The async face of a LocalEngine (dspy.LM(..., async_engine=...)): awaits the same worker's jobs."""

    def __init__(self, engine: LocalEngine):
        self.engine = engine

    async def complete(self, request) -> Response:
        validate_request(request)
        return await asyncio.wrap_future(self.engine._submit(self.engine._generate, request))

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
