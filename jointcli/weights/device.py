"""Where models run: the device, the dtype `auto` picks, how many CPU threads this process may use,
and what kind of CPU this is (every benchmark figure names it).

    JOINTOPT_CPU_BF16=0 jointopt joint recipes/sst2.yaml   # the fp32 path, even on a bf16 CPU

`dtype: auto` means one thing per job, both decided here:
- inference (`models.<name>.dtype`, resolve_dtype): bf16 on CUDA GPUs that support it and on CPUs
  with native bf16 (avx512_bf16 or AMX), else fp32;
- training (`optimizers.<key>.train.dtype`, resolve_train_dtype): bf16 autocast only on CUDA GPUs
  that support it, fp32 on every CPU (bf16 trains faster on a bf16 CPU, but its adapters scored
  lower on sst2: docs/performance.md, Training). LoRA weights and optimizer state stay fp32 either way;
  `autocast` is the context a training forward pass runs in.

The switch JOINTOPT_CPU_BF16 overrides what /proc/cpuinfo says about native bf16 (avx512_bf16 or
AMX): 0 makes `dtype: auto` pick float32 as on an AVX2-only CPU, 1 makes it pick bfloat16. The
tests use it to run both paths on one machine; users use it to compare them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
BF16_SWITCH = "JOINTOPT_CPU_BF16"


def resolve_device(device: str) -> str:
    """auto: cuda when a GPU is visible, else cpu."""
    import torch  # here, not at the top: the CPU facts below serve callers that never load a model

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for, but torch sees no CUDA GPU; use device: cpu or auto")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: bf16 on CUDA GPUs and CPUs with native bf16 (avx512_bf16 or AMX), else fp32."""
    import torch

    if dtype in DTYPES:
        return getattr(torch, dtype)
    if dtype != "auto":
        raise InputError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if resolve_device(device) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_train_dtype(dtype: str, device: str) -> str:
    """auto: 'bfloat16' (autocast) on a CUDA GPU that supports it, else 'float32', CPUs included."""
    import torch

    if dtype == "auto":
        return "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise InputError(f"LoRA training dtype {dtype!r}: use auto, float32 or bfloat16")
    return dtype


def cpu_has_native_bf16() -> bool:
    """True on CPUs with avx512_bf16 or AMX, unless JOINTOPT_CPU_BF16 says otherwise (0 or 1)."""
    switch = os.environ.get(BF16_SWITCH, "").strip()
    if switch in ("0", "1"):
        return switch == "1"
    if switch:
        raise InputError(f"{BF16_SWITCH}={switch!r}: use 0 (fp32 path) or 1 (bf16 path), or leave it unset")
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:  # not Linux
        return frozenset()


def cpu_kind() -> str:
    """The CPU as benchmarks report it: its widest vector/bf16 feature and the cores this process may
    use, e.g. 'avx512_bf16+amx, 2 cores' or 'avx2, 2 cores'; the switch is named when it is set."""
    flags = cpu_flags()
    kind = next((k for k in ("avx512_bf16", "avx512f", "avx2") if k in flags), "other")
    if "amx_bf16" in flags:
        kind += "+amx"
    switch = os.environ.get(BF16_SWITCH)
    forced = f", {BF16_SWITCH}={switch}" if switch in ("0", "1") else ""
    capped = os.environ.get("ATEN_CPU_CAPABILITY")  # torch's kernels limited to an older vector ISA
    forced += f", ATEN_CPU_CAPABILITY={capped}" if capped else ""
    return f"{kind}, {cpu_budget()} cores{forced}"


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def limit_torch_threads() -> None:
    """torch may start one thread per host core inside a container with fewer CPUs; oversubscription
    makes generation several times slower. Only ever lowers the count."""
    import torch

    budget = cpu_budget()
    if torch.get_num_threads() > budget:
        torch.set_num_threads(budget)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block (a trainer's CPU share), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_process_defaults() -> None:
    """What an entry point (the CLI, the test suite, a benchmark) sets for the whole process, before
    torch loads; a library import sets nothing. Each is a default: the environment wins."""
    # OpenMP threads that spin while they wait make generation several times slower whenever
    # another process shares the cores; read once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Models come from packages and local folders (every load passes local_files_only): never
    # reach for the Hugging Face hub, even from a library that jointopt does not call directly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # LiteLLM fetches its model price list from GitHub on first use (a 5 s timeout offline, and a
    # warning): its packaged copy is enough.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def autocast(device: str, dtype: str):
    """bf16 autocast for training in "bfloat16" (frozen weights stored in bf16, LoRA in fp32); nothing
    for "float32"."""
    import torch

    if dtype == "bfloat16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()
