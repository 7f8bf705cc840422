"""A DSPy fine-tuning provider for the local engine: `lm.finetune(...)` trains a LoRA adapter in-process.

    from jointcli.models.provider import local_lm
    lm = local_lm(max_tokens=32)                      # dspy.LM("local/smollm2-135m-instruct", engine=..., provider=...)
    program.set_lm(lm)
    tuned = dspy.BootstrapFinetune(metric=metric, train_kwargs={"epochs": 1, "batch_size": 4})(
        program, trainset=trainset)
    tuned.predictors()[0].lm.model                    # "local/smollm2-135m-instruct@ft-3f2a9c01d4e7"

DSPy's `LM.finetune` runs `provider.finetune(job, model, train_data, train_data_format, train_kwargs)`
in a thread and returns `lm.copy(model=<the returned id>)`. Here that id is the same model id with
"@<adapter>": the copy shares the engine, which serves the adapter for such ids on the one base model
in memory. Stock `dspy.BootstrapFinetune` and `dspy.BetterTogether` work unchanged.

Adapters are kept under `$JOINTOPT_HOME/adapters/<hash>/`, where the hash (`_job_hash`) covers the base
weights and device, the adapter training starts from (if any), the rows, the hyperparameters and the
seed: the same fine-tune asked again (a rerun of a script) reuses the folder instead of training.
Fine-tuning a model id that already names an adapter continues that adapter's training
(BetterTogether's second "w" step), it does not restart from the base weights.

train_kwargs (all optional; defaults are recipe.Lora() and recipe.Train()):
    {"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
     "train": {"epochs": 2, "learning_rate": 1e-3, "batch_size": 8, "grad_accum": 1, "max_length": 1024},
     "seed": 0}
The fields of "lora" and "train" may also be given flat ({"epochs": 1, "r": 16}), and the usual
Hugging Face names are understood: num_train_epochs, per_device_train_batch_size,
gradient_accumulation_steps, max_seq_length, lora_r, lora_alpha, lora_dropout. Unknown keys are an error.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat
from pydantic import ValidationError

from ..errors import InputError, StepError
from ..inference.model_id import adapter_model_id, is_local_model_id, split_model_id
from ..recipe import EMBEDDED_MODEL, LocalModel, Lora, Train
from ..recipe.sections import EngineLimits
from ..training.hashing import fingerprint
from ..training.lora import TrainResult, train_lora
from ..weights.adapter import adapter_digest, adapter_name, is_adapter_dir
from ..weights.checkpoint import jointopt_home
from .local import engine_lm
from .reinforce import LocalReinforceJob

logger = logging.getLogger(__name__)

_ALIASES = {
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
}
_TRAIN_LOCK = threading.Lock()  # one training at a time per process: each already uses every core


def parse_train_kwargs(train_kwargs: dict[str, Any] | None) -> tuple[Lora, Train, int]:
    """(Lora, Train, seed) from DSPy's train_kwargs; InputError on an unknown key or a bad value."""
    kwargs = dict(train_kwargs or {})
    lora = kwargs.pop("lora", None) or {}
    train = kwargs.pop("train", None) or {}
    lora = lora.model_dump() if isinstance(lora, Lora) else dict(lora)
    train = train.model_dump() if isinstance(train, Train) else dict(train)
    seed = kwargs.pop("seed", 0)
    unknown = []
    for key, value in kwargs.items():
        field = _ALIASES.get(key, key)
        if field in Train.model_fields:
            train[field] = value
        elif field in Lora.model_fields:
            lora[field] = value
        else:
            unknown.append(key)
    if unknown:
        known = sorted({"lora", "train", "seed", *Train.model_fields, *Lora.model_fields, *_ALIASES})
        raise InputError(f"train_kwargs: unknown keys {unknown}; known: {', '.join(known)}")
    try:
        return Lora.model_validate(lora), Train.model_validate(train), int(seed)
    except (ValidationError, TypeError, ValueError) as err:
        raise InputError(f"train_kwargs: {err}") from None


class LocalTrainingJob(TrainingJob):
    """DSPy's job future; `train_result` holds the TrainResult once training has run."""

    train_result: TrainResult | None = None

    def status(self) -> str:
        if not self.done():
            return "running"
        return "failed" if isinstance(self.result(), Exception) else "succeeded"


class LocalProvider(Provider):
    """Fine-tunes the base model of a LocalEngine with LoRA and registers the adapter on that engine."""

    def __init__(self, engine=None, adapters_dir: str | Path | None = None):
        super().__init__()
        self.finetunable = True
        self.TrainingJob = LocalTrainingJob
        self.reinforceable = True  # stock dspy.GRPO: reinforce.py
        self.ReinforceJob = LocalReinforceJob
        self.engine = engine
        self.adapters_dir = Path(adapters_dir) if adapters_dir else None

    def __repr__(self) -> str:
        return f"LocalProvider({self.engine!r})"

    parse_train_kwargs = staticmethod(parse_train_kwargs)  # for LocalReinforceJob

    @staticmethod
    def is_provider_model(model: str) -> bool:
        return is_local_model_id(model)

    @staticmethod
    def launch(lm, launch_kwargs: dict[str, Any] | None = None):
        """Nothing to start: the engine runs in this process and loads its weights once."""

    @staticmethod
    def kill(lm, launch_kwargs: dict[str, Any] | None = None):
        """Nothing to stop: the engine is shared by every LM of that checkpoint (see engine.get_engine)."""

    def finetune(
        self,
        job: TrainingJob,
        model: str,
        train_data: list[dict[str, Any]],
        train_data_format: TrainDataFormat | str | None,
        train_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Train (or reuse) a LoRA adapter on train_data; return `model` with '@<adapter>'."""
        engine = self._engine_of(model)
        fmt = getattr(train_data_format, "value", train_data_format)
        if fmt not in (None, TrainDataFormat.CHAT.value):
            raise StepError(
                f"{model}: the local provider trains on chat data, not {fmt!r}; "
                "use a ChatAdapter (or JSONAdapter) for fine-tuning"
            )
        lora, train, seed = parse_train_kwargs(train_kwargs)
        if not train_data:
            raise StepError(f"no training rows for {model}: no trace passed the metric, nothing to fine-tune on")

        base_id, current = split_model_id(model)
        init_adapter = None
        if current:  # continue that adapter's training
            if current not in engine.adapters:
                raise StepError(f"{model}: adapter {current!r} is not registered on the engine")
            init_adapter = Path(engine.adapters[current])
        with _TRAIN_LOCK:
            folder = self._train_or_reuse(job, model, train_data, init_adapter, lora, train, seed)
        name = adapter_name("ft", folder)
        engine.add_adapter(name, folder)
        return adapter_model_id(base_id, name)

    def _train_or_reuse(
        self,
        job: TrainingJob,
        model: str,
        rows: list[dict],
        init_adapter: Path | None,
        lora: Lora,
        train: Train,
        seed: int,
    ) -> Path:
        """The adapter folder of this training: reused when it is there (same weights, data and settings)."""
        key = _job_hash(self.engine, init_adapter, rows, lora, train, seed)
        root = self.adapters_dir or jointopt_home() / "adapters"
        folder = root / key
        if is_adapter_dir(folder):
            logger.info("fine-tune of %s: reusing %s (same weights, data and settings)", model, folder)
            return folder
        logger.info(
            "fine-tune of %s: %d rows, LoRA r=%d, %s epochs -> %s", model, len(rows), lora.r, train.epochs, folder
        )
        result = train_lora(
            self.engine.checkpoint,
            rows,
            folder,
            lora,
            train,
            seed=seed,
            log_path=root / f"{key}.train_log.jsonl",
            device=self.engine.device,
            init_adapter=init_adapter,
            dtype=train.dtype,
        )
        if isinstance(job, LocalTrainingJob):
            job.train_result = result
        logger.info(
            "fine-tune of %s: %d steps in %.0f s, final loss %s", model, result.steps, result.seconds, result.final_loss
        )
        return folder

    def _engine_of(self, model: str):
        """The LocalEngine this provider fine-tunes; StepError when it has none."""
        if self.engine is None or not hasattr(self.engine, "add_adapter"):
            raise StepError(
                f"{model}: LocalProvider needs the LocalEngine of the model; build the LM with "
                "jointcli.models.provider.local_lm(...) or LocalProvider(engine)"
            )
        return self.engine


def _job_hash(engine, init_adapter: Path | None, rows: list[dict], lora: Lora, train: Train, seed: int) -> str:
    """The adapter folder's name: the same base weights, starting adapter, rows and settings give the
    same name, so the finished adapter is reused."""
    settings = {
        "weights": getattr(engine, "weights_id", str(engine.checkpoint)),
        "device": str(engine.device),
        "lora": lora.model_dump(mode="json"),
        "train": train.identity(rows=len(rows)),  # with the steps train.min_steps adds, if any
        "seed": seed,
    }
    if init_adapter is not None:  # only then: the names of adapters trained from the base weights stay as they were
        settings["init_adapter"] = adapter_digest(init_adapter)
    return fingerprint(settings, rows)[:20]


def local_lm(
    checkpoint_or_builtin: str = EMBEDDED_MODEL,
    *,
    name: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    adapters_dir: str | Path | None = None,
    limits: EngineLimits | dict | None = None,
    **lm_kwargs,
):
    """A dspy.LM on the in-process engine for a checkpoint, fine-tunable with dspy.BootstrapFinetune.

    name: the model id is "local/<name>" (default: the built-in's or the folder's name).
    limits: the engine's batch limits (EngineLimits or a dict, e.g. {"max_batch": 4}; default: the
    recipe's defaults); the engine, shared per checkpoint, dtype and device, serves with the last given.
    Other keywords (max_tokens, temperature, cache, ...) go to dspy.LM."""
    from ..inference.engine import get_engine  # torch and transformers: only once a local model is built

    if name is None:
        name = (
            checkpoint_or_builtin.split(":", 1)[1]
            if checkpoint_or_builtin.startswith("builtin:")
            else Path(checkpoint_or_builtin).expanduser().resolve().name
        )
        name = re.sub(r"[^\w.-]+", "-", name) or "model"
    spec_fields = {k: lm_kwargs.pop(k) for k in ("max_tokens", "temperature") if k in lm_kwargs}
    if limits is not None:
        spec_fields["limits"] = limits
    try:
        spec = LocalModel(path=checkpoint_or_builtin, dtype=dtype, device=device, **spec_fields)
    except ValidationError as err:
        raise InputError(f"local_lm: {err}") from None
    engine = get_engine(spec.path, spec.dtype, spec.device, spec.limits)
    return engine_lm(name, spec, engine, provider=LocalProvider(engine, adapters_dir), **lm_kwargs)
