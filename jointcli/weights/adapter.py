"""A PEFT adapter folder, as jointopt saves, checks, loads and names it: the one place that knows.

    runs/sst2/02-w/adapters/classify/
      adapter_config.json           PEFT's LoRA config
      adapter_model.safetensors     the LoRA weights
      prompt_tuning/                the soft prompt, when an `s` step trained one: a PEFT prompt-tuning folder
        adapter_config.json
        adapter_model.safetensors

>>> ADAPTER_FILES
('adapter_config.json', 'adapter_model.safetensors')
>>> is_adapter_dir("/nonexistent")
False

An adapter is registered on its engine under a name made from its content (`adapter_name`), so DSPy's
LM cache (keyed by the model id) never serves an answer of other weights that sat at the same path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import InputError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a PEFT folder, LoRA or prompt tuning
SOFT_PROMPT_SUBFOLDER = "prompt_tuning"  # inside a LoRA adapter folder: that adapter's soft prompt


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` holds a PEFT adapter's files."""
    return all((Path(path) / name).is_file() for name in ADAPTER_FILES)


def check_adapter_dir(path: str | Path, what: str) -> Path:
    """`path`, resolved; InputError naming `what` when it is no PEFT adapter folder."""
    folder = Path(path).expanduser().resolve()
    if not is_adapter_dir(folder):
        raise InputError(f"{what}: {path} is not a PEFT adapter folder (needs {' and '.join(ADAPTER_FILES)})")
    return folder


def soft_prompt_files(adapter_dir: str | Path) -> list[Path]:
    """The files of an adapter folder's soft prompt, if it has one."""
    folder = Path(adapter_dir) / SOFT_PROMPT_SUBFOLDER
    return [folder / name for name in ADAPTER_FILES if (folder / name).is_file()]


def adapter_files(adapter_dir: str | Path) -> list[Path]:
    """Every file that makes the adapter: the LoRA files, then its soft prompt's (for digests and
    fingerprints: other content, another name)."""
    return [Path(adapter_dir) / name for name in ADAPTER_FILES] + soft_prompt_files(adapter_dir)


def adapter_digest(adapter_dir: str | Path) -> str:
    """12 hex digits of the adapter's content: its weights, config and soft prompt, hashed in that
    order (the registered names, and with them DSPy's cache keys, depend on it); InputError when its
    weights are missing."""
    weights = sorted(Path(adapter_dir).glob("adapter_model.*"))
    if not weights:
        raise InputError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_model.*); the run directory is damaged")
    h = hashlib.sha256()
    for path in weights + [Path(adapter_dir) / "adapter_config.json"] + soft_prompt_files(adapter_dir):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def adapter_name(prefix: str, adapter_dir: str | Path) -> str:
    """The name an adapter is registered under on its engine: `prefix` and its content's digest."""
    return f"{prefix}-{adapter_digest(adapter_dir)}"


def load_adapter(model, adapter_dir: str | Path, name: str = "default", trainable: bool = False):
    """The PEFT model with the adapter at `adapter_dir` loaded as `name`: onto `model` if it already is a
    PeftModel (another adapter beside those it holds), else wrapping the base model."""
    from peft import PeftModel  # peft imports torch: only when an adapter is loaded

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=name, is_trainable=trainable, local_files_only=True
    )


def lora_config(lora):
    """PEFT's LoraConfig for the recipe's `lora:` settings (recipe.Lora): what the trainer trains and
    what `jointopt plan` counts."""
    from peft import LoraConfig  # peft imports torch: only when an adapter is built

    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=targets,
    )
