"""The work folder of a training, `.<adapter>.work/` next to the adapter folder: what a killed run
resumes from, removed when the adapter is saved.

    fingerprint.json     what its checkpoints were trained on and with (`resume_fingerprint`)
    checkpoint-N.pt      adapter, optimizer and RNG state after N optimizer steps (the last one only)
    curriculum.json      the rows' difficulty, with train.curriculum: a resumed run keeps its plan

A run resumes a work folder only when it computes the same thing (`open_work_dir`); else the folder
is started over. The step plan is a function of the seed, so a resumed run trains the remaining steps
on the rows it would have trained.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_target, read_json, remove_path, write_json
from ..weights.adapter import adapter_files
from .hashing import fingerprint
from .job import TrainJob
from .microbatch import MIN_SHARED_PREFIX
from .model import TrainState

_FINGERPRINT = "fingerprint.json"
_CURRICULUM = "curriculum.json"


def resume_fingerprint(job: TrainJob, pairs: list[dict]) -> str:
    """What a work folder's checkpoints were trained on and with: a run resumes them only when it
    computes the same (base checkpoint, starting adapter, rows `pairs`, settings, micro-batch plan); the
    number of data-parallel processes and the checkpoint interval do not change what is computed."""
    share = job.train.share_prefix
    settings = {
        "checkpoint": str(Path(job.checkpoint).resolve()),
        "lora": job.lora.model_dump(mode="json"),
        "train": job.train.identity("processes", rows=len(pairs)),
        "seed": job.seed,
        "device": job.device,
        "dtype": job.dtype,
        "token_budget": job.token_budget,
        # how a step's loss is computed: 4 with a shared prompt prefix, 2 with every row whole
        "trainer": 4 if share else 2,
        "shared_prefix": MIN_SHARED_PREFIX if share else 0,
    }
    if job.soft is not None:
        settings["soft"] = job.soft.to_json()
    files = adapter_files(job.init_adapter) if job.init_adapter is not None else []
    return fingerprint(settings, pairs, files)


def open_work_dir(work: Path, resume: bool, key: str) -> Path | None:
    """The last checkpoint in the work folder when `resume` and the folder was made for this
    fingerprint `key` (the same data and settings); else None, and the folder is started over."""
    last = None
    if resume and work.is_dir():
        try:
            same = json.loads((work / _FINGERPRINT).read_text()).get("fingerprint") == key
        except (OSError, ValueError):
            same = False
        last = last_checkpoint(work) if same else None
    if last is None:
        remove_path(work)
        write_json(work / _FINGERPRINT, {"fingerprint": key})
    return last


def saved_difficulty(work: Path) -> list[float] | None:
    """The rows' difficulty a run of this work folder ranked them by, if one did."""
    saved = work / _CURRICULUM
    return read_json(saved)["difficulty"] if saved.is_file() else None


def save_difficulty(work: Path, difficulty: list[float]) -> None:
    write_json(work / _CURRICULUM, {"difficulty": difficulty})


def save_checkpoint(work: Path, step: int, state: TrainState, tokens: int) -> None:
    """Adapter, optimizer and RNG state after `step` optimizer steps (and `tokens` trained so far)
    into the work folder, replacing the previous checkpoint."""
    import torch

    path = work / f"checkpoint-{step}.pt"
    with atomic_target(path) as tmp:
        torch.save(
            {
                "step": step,
                "tokens": tokens,
                "rng": torch.get_rng_state(),
                "adapter": {n: p.detach().cpu() for n, p in zip(state.names, state.params)},
                "optimizer": state.optimizer.state_dict(),
            },
            tmp,
        )
    for old in work.glob("checkpoint-*.pt"):
        if old != path:
            remove_path(old)


def load_checkpoint(state: TrainState, path: Path, device: str) -> None:
    """Restore a save_checkpoint into the state: training resumes after the checkpoint's step."""
    import torch

    saved = torch.load(path, map_location=device, weights_only=True)
    with torch.no_grad():
        for name, p in zip(state.names, state.params):
            p.copy_(saved["adapter"][name])
    state.optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    state.step = state.resumed_from_step = int(saved["step"])
    state.tokens_before = int(saved.get("tokens", 0))


def last_checkpoint(work: Path) -> Path | None:
    found = [(_checkpoint_step(p.stem), p) for p in work.glob("checkpoint-*.pt")]
    found = [(s, p) for s, p in found if s is not None]
    return max(found)[1] if found else None


def _checkpoint_step(path: str) -> int | None:
    try:
        return int(Path(path).name.rsplit("-", 1)[-1])
    except ValueError:
        return None
