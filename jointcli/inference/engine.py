"""A DSPy 3.4 engine that runs a transformers causal LM in-process, with LoRA adapters chosen per request.

    engine = get_engine("builtin:smollm2-135m-instruct", "auto", "auto")
    lm = dspy.LM("local/smollm2", engine=engine, async_engine=engine.async_engine, max_tokens=64, temperature=0)
    engine.add_adapter("classify-03", "runs/sst2/02-w/adapters/classify")
    tuned = lm.copy(model="local/smollm2@classify-03")      # same weights in memory, adapter on top

The engine loads the model and tokenizer, keeps the adapters and speaks DSPy's engine contract.
Callers (DSPy's thread pools call complete() from many threads, the async engine from an event loop)
tokenize their prompt in their own thread and hand the job to a BatchDecoder (batch_decoder.py):
one worker thread that owns the model, decodes concurrent requests as one batch
(generation.py) and shares their prompt prefix (prefix_cache.py). How much it takes on at once is
the recipe's models.<name>.limits (EngineLimits: max_batch, prefill_tokens, prefix_cache_tokens),
a setting of the engine (set_limits) rather than part of what identifies it (see get_engine).

The checkpoint is the embedded model or any local Hugging Face folder that AutoModelForCausalLM loads
(tested: Llama, SmolLM, Qwen2, Qwen3, Gemma 2 and 3 text); its tokenizer's chat template makes the
prompts, and its generation_config's eos ids (with the tokenizer's eos) end the answers.

Weights are chosen by the request's model id (the rule: model_id.py): an id with "@<name>" runs the
registered PEFT adapter <name>, any other id the base weights (adapters disabled). All adapters live
on one PeftModel that wraps the one base model: adding one costs its LoRA matrices, never a copy of
the base. Adding an adapter runs on the worker between batches, never during one. What an adapter
folder holds, how it is checked and loaded: weights/adapter.py. One with a soft prompt (the s step)
puts its virtual tokens before every prompt of its requests: they batch and share prefixes like any
prompt tokens (weights/soft_prompt.py).
"""

from __future__ import annotations

import asyncio
import hashlib
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
    Response,
    UnsupportedFeatureError,
    response_to_events,
)

from ..recipe.sections import EngineLimits
from ..weights.adapter import check_adapter_dir, load_adapter
from ..weights.chat import chat_ids
from ..weights.checkpoint import load_causal_lm, load_tokenizer, resolve_checkpoint
from ..weights.device import limit_torch_threads, resolve_device, resolve_dtype
from ..weights.memory import on_release, register_frozen
from ..weights.soft_prompt import load_soft_prompt, virtual_ids
from .batch_decoder import BatchDecoder, Job
from .model_id import check_adapter_name, split_model_id

DEFAULT_MAX_TOKENS = 512  # when a request names none; build_lm always passes the recipe's
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------- the engine
class LocalEngine:
    """A DSPy 3.4 custom engine (dspy.LM(model, engine=LocalEngine(...))) running transformers in-process.

    `decoder` is its BatchDecoder: its tuning knobs (max_batch, prefill_tokens, batch_window_s,
    max_wait_s, prefix_reuse) may be changed between calls, and its `stats` count what it ran.
    `limits` are the batch limits it was last given (set_limits; default: EngineLimits())."""

    def __init__(
        self, checkpoint: str | Path, dtype: str = "auto", device: str = "auto", limits: EngineLimits | None = None
    ):
        self.source = str(checkpoint)  # "builtin:..." stays portable in saved programs
        self.checkpoint = resolve_checkpoint(self.source)
        self.requested = {"dtype": dtype, "device": device}
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device == "cpu":
            limit_torch_threads()
        self.tokenizer = load_tokenizer(self.checkpoint)  # its chat template makes every prompt
        model = load_causal_lm(self.checkpoint, self.dtype)
        self.model = model.to(self.device).eval()
        register_frozen(self.checkpoint, self.model)  # a trainer of the same dtype shares these weights
        on_release(self.release_caches)  # emptied before training (weights/memory.py)
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.weights_id = _weights_fingerprint(
            self.checkpoint, self.dtype, prompt_files=not self.source.startswith("builtin:")
        )
        self.adapters: dict[str, str] = {}  # name -> adapter folder
        self._soft: dict[str, torch.Tensor] = {}  # name -> the adapter's soft prompt, if it has one (s step)
        self._loads: dict[str, int] = {}  # name -> how many times it was (re)loaded: part of prefix-cache keys
        self._peft = None  # the PeftModel wrapping self.model, once an adapter is added
        self._tok_lock = threading.Lock()  # callers tokenize in their threads; fast tokenizers dislike races
        self.limits = limits or EngineLimits()
        self.decoder = BatchDecoder(self.model, self.tokenizer, self._tok_lock, self.device, self._weights, self.limits)
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
        if not self.decoder.stop():
            return
        _forget(self)
        self.decoder.join()
        self.model = self._peft = None

    def release_caches(self) -> None:
        """Empty the prefix cache (it refills as calls come): what weights/memory.release_memory frees."""
        try:
            self.decoder.call(self.decoder.prefixes.clear).result()
        except ConfigurationError:  # closed: join() emptied it
            pass

    def set_limits(self, limits: EngineLimits) -> None:
        """Serve with these batch limits from the next batch on."""
        self.limits = limits
        self.decoder.apply_limits(limits)

    def dump_state(self) -> dict:
        """What load_state needs to rebuild this engine (DSPy saves it with program.save()); no secrets.
        The limits are left out: they suit the machine that runs a program, not the program."""
        source = self.source if self.source.startswith("builtin:") else str(self.checkpoint)
        return {"checkpoint": source, **self.requested, "adapters": dict(self.adapters)}

    @classmethod
    def load_state(cls, state: dict) -> LocalEngine:
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
        check_adapter_name(name)
        folder = check_adapter_dir(adapter_dir, f"adapter {name!r}")
        self.decoder.call(self._load_adapter, name, str(folder)).result()

    def _load_adapter(self, name: str, folder: str) -> None:
        if self.adapters.get(name) == folder:
            return
        # other weights under this name from now on: its cached prefixes must never be used again
        self.decoder.prefixes.drop(("adapter", name))
        soft = load_soft_prompt(Path(folder))
        self._soft.pop(name, None)
        if self._peft is not None and name in self.adapters:
            self._peft.delete_adapter(name)
        self._peft = load_adapter(self._peft or self.model, folder, name)
        self._peft.eval()
        if soft is not None:
            self._soft[name] = soft.to(self.device, self.dtype)
        self.adapters[name] = folder
        self._loads[name] = self._loads.get(name, 0) + 1

    def _weights(self, model_id: str):
        """(context that selects its weights, prefix-cache key of those weights)."""
        name = split_model_id(model_id)[1]
        if name is None:
            context = nullcontext() if self._peft is None else self._peft.disable_adapter()
            return context, ("base",)
        if not name:
            raise InvalidRequestError(f"model id {model_id!r} ends in '@' without an adapter name")
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise InvalidRequestError(f"model id {model_id!r}: no adapter {name!r} registered (known: {known})")
        self._peft.set_adapter(name)
        return self.decoder.soft_prompt(self._soft.get(name)), ("adapter", name, self.adapters[name], self._loads[name])

    # ---- callers' side
    def _submit_request(self, request) -> Future:
        """Tokenize and check in the caller's thread, then queue the generation job."""
        config = request.config
        prompt = self._prompt_ids(request)
        soft = self._soft.get(split_model_id(request.model)[1])
        if soft is not None:  # the adapter's soft prompt goes first: its virtual tokens (soft_prompt.py)
            prompt = virtual_ids(soft.shape[0]) + prompt
        max_new = config.max_tokens or DEFAULT_MAX_TOKENS
        if self.context_length and len(prompt) + max_new > self.context_length:
            raise ContextLengthError(
                f"{len(prompt)} prompt tokens + max_tokens {max_new} exceed the "
                f"model's context of {self.context_length} tokens"
            )
        return self.decoder.submit(Job(request, prompt, max_new, tuple(config.stop or ())))

    def _prompt_ids(self, request) -> list[int]:
        """The checkpoint's chat template applied to request.system + request.messages (chat.py)."""
        if request.tools:
            raise UnsupportedFeatureError("the local engine does not support tools", feature="tools")
        messages = []
        if request.system is not None:
            messages.append({"role": "system", "content": _system_text(request.system)})
        for m in request.messages:
            if m.role not in _ROLES or m.text is None:
                raise UnsupportedFeatureError(
                    f"the local engine takes text messages from "
                    f"{', '.join(_ROLES)}; got a {m.role} message with "
                    f"{', '.join(p.type for p in m.parts)} parts"
                )
            messages.append({"role": _ROLES[m.role], "content": m.text})
        with self._tok_lock:
            return chat_ids(self.tokenizer, messages, add_generation_prompt=True)


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
    def load_state(cls, state: dict) -> AsyncLocalEngine:
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


# What makes a folder's prompts and ends its answers, besides the weights: the chat template and eos ids
_PROMPT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _weights_fingerprint(checkpoint: Path, dtype: torch.dtype, prompt_files: bool = False) -> str:
    """Identity of the weights as loaded (files by path, size and mtime; dtype): part of DSPy's cache
    key through build_lm, so a changed checkpoint or dtype never returns another model's answers.
    prompt_files: the tokenizer, chat template and generation config count too (a user's folder, whose
    template may be edited; the embedded model's identity stays what it was)."""
    parts = [str(checkpoint), str(dtype)]
    files = [checkpoint / name for name in _PROMPT_FILES if (checkpoint / name).is_file()] if prompt_files else []
    for f in sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.bin")) + files:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- one engine per weights
_ENGINES: dict[tuple[str, str, str], LocalEngine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(
    checkpoint: str | Path, dtype: str = "auto", device: str = "auto", limits: EngineLimits | None = None
) -> LocalEngine:
    """The process-wide engine for (checkpoint, dtype, device): one copy of the weights however
    many dspy.LMs, predictors and adapters use it. `checkpoint` may be "builtin:..." or a folder.

    limits: the batch limits to serve with from now on; None keeps the engine's (a new engine's are
    EngineLimits()). They are a setting of the engine, not part of its key: asking for other limits
    must never load a second copy of the weights. Nor are they part of weights_id (DSPy's cache key):
    they decide how much runs at once, not which weights answer."""
    resolved_device = resolve_device(device)
    key = (str(resolve_checkpoint(str(checkpoint))), str(resolve_dtype(dtype, resolved_device)), resolved_device)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = LocalEngine(checkpoint, dtype, device, limits)
        elif limits is not None and limits != engine.limits:
            engine.set_limits(limits)
        return engine


def _forget(engine: LocalEngine) -> None:
    with _ENGINES_LOCK:
        for key in [k for k, e in _ENGINES.items() if e is engine]:
            del _ENGINES[key]
