"""What a process that serves and trains one checkpoint holds in memory, and how it gives some back.

    register_frozen(checkpoint, engine_model)     # the engine's base weights, never written to
    shared = share_frozen(checkpoint, model)      # the trainer's frozen weights become the same tensors
    on_release(engine.release_caches)            # what an idle engine can let go of
    release_memory()                              # before training: caches, garbage, the C heap

- Frozen weights: the engine and the trainer load the same checkpoint. Where both hold it in the same
  dtype on the same device (fp32 on a CPU without native bf16), the trainer's frozen base tensors are
  replaced by the engine's (the same storage): one copy instead of two. Neither writes them: the engine
  puts adapters on top, the trainer trains LoRA weights of its own. Where the dtypes differ (a bf16
  engine, fp32 training) nothing is shared.
- Caches: an engine registers what it keeps only to go faster (its prefix cache) and `release_memory`
  empties it: during training the engine is idle, and the adapter trained next is new weights whose
  prefixes were never cached anyway.
- The C heap: glibc keeps freed memory for later allocations instead of returning it; torch's
  activations come and go in large blocks, so that a process's RSS stays near its highest point long
  after. `trim_heap` hands the free part back (malloc_trim); a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import threading
import weakref
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()
# (resolved checkpoint folder, dtype, device) -> the model whose base weights may be shared
_FROZEN: weakref.WeakValueDictionary[tuple[str, str, str], Any] = weakref.WeakValueDictionary()
_RELEASERS: list[weakref.WeakMethod] = []
_PEFT_WRAPPER = ".base_layer"  # PEFT's LoRA layers hold the original Linear as `<name>.base_layer`


def _key(checkpoint: Path | str, model) -> tuple[str, str, str]:
    first = next(model.parameters())
    return str(Path(checkpoint).resolve()), str(first.dtype), str(first.device)


def register_frozen(checkpoint: Path | str, model) -> None:
    """`model`'s base weights (of `checkpoint`) are never written to while it lives: share_frozen may
    hand them to another model of the same checkpoint, dtype and device. Held weakly."""
    with _LOCK:
        _FROZEN[_key(checkpoint, model)] = model


def share_frozen(checkpoint: Path | str, model) -> int:
    """Give `model` (a plain causal LM of `checkpoint`, before any adapter is put on it) the tensors of a
    registered model of the same checkpoint, dtype and device, parameter by parameter where name, shape
    and dtype match; the caller must never write them. Returns the bytes now shared (0: none)."""
    with _LOCK:
        source = _FROZEN.get(_key(checkpoint, model))
    if source is None or source is model:
        return 0
    theirs = {name.replace(_PEFT_WRAPPER, ""): p for name, p in source.named_parameters() if ".lora_" not in f".{name}"}
    shared = 0
    for name, p in model.named_parameters():
        other = theirs.get(name)
        if other is not None and other.shape == p.shape and other.dtype == p.dtype and other.device == p.device:
            if p.data_ptr() != other.data_ptr():
                p.data = other.data
                shared += p.numel() * p.element_size()
    return shared


def on_release(method) -> None:
    """Call `method` (a bound method, held weakly) from release_memory: it drops what its object keeps
    only to go faster."""
    with _LOCK:
        _RELEASERS.append(weakref.WeakMethod(method))


def release_memory() -> None:
    """Empty the registered caches, collect garbage and hand the C heap's free memory back."""
    with _LOCK:
        _RELEASERS[:] = [r for r in _RELEASERS if r() is not None]
        methods = [r() for r in _RELEASERS]
    for method in methods:
        if method is not None:
            method()
    gc.collect()
    trim_heap()


def trim_heap() -> bool:
    """Return the C heap's free memory to the system (glibc's malloc_trim); False where there is none."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None
