"""What a training is asked to do (`TrainJob`, with an s step's `SoftTraining`) and what it gives back
(`TrainResult`, saved as training.json next to the adapter files). A job goes to other processes as
JSON (training/data_parallel.py), so every one of these turns into JSON and back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..recipe import Groups, Lora, SoftPrompt, Train

RESULT_FILE = "training.json"  # the TrainResult of the training, next to the adapter files


@dataclass(frozen=True)
class SoftTraining:
    """What the s step adds to a LoRA training: a soft prompt of `prompt.virtual_tokens` put before every
    row, trained in the same backward pass, and each parameter group's settings."""

    prompt: SoftPrompt
    groups: Groups
    lora_rate: float  # the LoRA group's learning rate (groups.lora's, or train.learning_rate)
    init_text: str | None = None  # the module's instructions, with prompt.init == "instructions"

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt.model_dump(mode="json"),
            "groups": self.groups.model_dump(mode="json"),
            "lora_rate": self.lora_rate,
            "init_text": self.init_text,
        }

    @classmethod
    def from_json(cls, data: dict) -> SoftTraining:
        return cls(SoftPrompt(**data["prompt"]), Groups(**data["groups"]), data["lora_rate"], data["init_text"])


@dataclass(frozen=True)
class TrainJob:
    """One adapter to train: the base checkpoint, the prompt/completion rows (rows.to_prompt_completion)
    and the settings, with the device and training dtype already resolved ("cpu"/"cuda", "float32"/
    "bfloat16")."""

    checkpoint: Path
    pairs: list[dict]
    out_dir: Path  # the adapter folder it writes
    lora: Lora
    train: Train
    seed: int
    log_path: Path | None  # train_log.jsonl: one line per optimizer step
    device: str
    dtype: str
    resume: bool = True  # from the work folder's last checkpoint, when it was made for this job
    init_adapter: Path | None = None  # an adapter folder to go on training; None: a new adapter
    soft: SoftTraining | None = None  # the s step's soft prompt, trained with the adapter

    @property
    def work(self) -> Path:
        """The folder of the checkpoints to resume from, next to the adapter folder; removed on success."""
        return self.out_dir.parent / f".{self.out_dir.name}.work"

    @property
    def token_budget(self) -> int:
        """Computed tokens per micro-batch (train.token_budget, or the device's default)."""
        return self.train.micro_batch_tokens(self.device, self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            **{key: str(value) if isinstance(value, Path) else value for key, value in self.__dict__.items()},
            "lora": self.lora.model_dump(mode="json"),
            "train": self.train.model_dump(mode="json"),
            "soft": self.soft.to_json() if self.soft else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainJob:
        paths = ("checkpoint", "out_dir", "log_path", "init_adapter")
        return cls(
            **{
                **data,
                **{key: Path(data[key]) if data[key] else None for key in paths},
                "lora": Lora(**data["lora"]),
                "train": Train(**data["train"]),
                "soft": SoftTraining.from_json(data["soft"]) if data["soft"] else None,
            }
        )


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    epochs: float
    rows: int  # rows trained on (after dropping over-long ones)
    train_tokens: int  # prompt + completion tokens trained by this run (non-pad; after a resume, since it)
    tokens_per_second: float
    seconds: float  # wall time of this run's training loop
    peak_rss_mb: float
    peak_cuda_mb: float | None
    final_loss: float | None
    device: str
    dtype: str
    dropped_rows: int = 0  # rows longer than train.max_length, left out
    resumed_from_step: int | None = None
    processes: int = 1  # data-parallel training processes (training/data_parallel.py)
    virtual_tokens: int = 0  # of the soft prompt trained with the adapter (the s step), if any
    curriculum: list[int] | None = None  # with train.curriculum: the rows (as kept) easiest first

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["adapter_dir"] = str(self.adapter_dir)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        return cls(**{**data, "adapter_dir": Path(data["adapter_dir"])})
