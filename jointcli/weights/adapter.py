"""A PEFT adapter folder, as jointopt saves, checks, loads and names it.

adapter_digest(Path("runs/sst2/02-w/adapters/classify"))   # "3f2a9c01d4e7": a name from its content
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import InputError
from .soft_prompt import soft_prompt_files


def adapter_digest(adapter_dir: Path) -> str:
    weights = sorted(Path(adapter_dir).glob("adapter_model.*"))
    if not weights:
        raise InputError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_model.*); the run directory is damaged")
    h = hashlib.sha256()
    for path in weights + [Path(adapter_dir) / "adapter_config.json"] + soft_prompt_files(adapter_dir):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]
