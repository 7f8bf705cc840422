"""DSPy's reinforcement interface on the local engine: stock `dspy.GRPO` trains a LoRA adapter in-process.

    from dspy.teleprompt.grpo import GRPO
    from jointcli.models.provider import local_lm
    student.set_lm(local_lm(temperature=0.7))
    GRPO(metric=metric, num_train_steps=4, num_rollouts_per_grpo_step=4, exclude_demos=True).compile(
        student, trainset=trainset)
    student.predictors()[0].lm.model                  # "local/smollm2-135m-instruct@grpo-<digest>"

`lm.reinforce(train_kwargs)` makes a `LocalReinforceJob` (the provider's ReinforceJob) and initializes
it: the adapter in training (a new one, or the one the LM's model id names), on the LM's engine.
`dspy.GRPO.compile` then, each step, waits until `get_status()` lists batch ids it has not filled,
samples its rollouts through the engine, and calls `step(train_data=[{"batch_id", "group": [{messages,
completion, reward}]}], train_data_format)`: every group's rewards become group-relative advantages and
the adapter takes `iterations` optimizer steps of the GRPO objective (training/grpo.py, the g step's),
then the engine serves it and the LM's model id names it, so that the next rollouts run it. Each step
offers train.batch_size batch ids: the groups one step trains on.

train_kwargs: those of LocalProvider.finetune (lora, train, seed; flat or nested), plus the GRPO
settings epsilon, beta and iterations (TRL's num_iterations); DSPy's own num_generations is the group size.
The learning rate is constant, or with train.steps (GRPO's num_train_steps) decays linearly over them.
Adapters are written under `$JOINTOPT_HOME/adapters/grpo-<job>/` (or the provider's adapters_dir);
`save_checkpoint(name)` keeps a copy.
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Any

from dspy.clients.provider import ReinforceJob
from dspy.clients.utils_finetune import GRPOStatus, TrainDataFormat

from ..errors import InputError, StepError
from ..inference.model_id import adapter_model_id, split_model_id
from ..training.grpo import GrpoJob, GrpoPolicy, GrpoSettings, advantages
from ..weights.adapter import adapter_name
from ..weights.checkpoint import jointopt_home
from ..weights.device import resolve_train_dtype

_GRPO_KEYS = {"epsilon": float, "beta": float, "iterations": int, "num_iterations": int}
_DSPY_KEYS = {"num_generations"}  # DSPy's GRPO adds it: the group size, which the groups themselves carry


class LocalReinforceJob(ReinforceJob):
    """A GRPO training of a LoRA adapter on the LM's local engine (module docstring)."""

    def __init__(self, lm, train_kwargs: dict[str, Any] | None = None):
        super().__init__(lm, train_kwargs)
        self.job_id = f"grpo-{uuid.uuid4().hex[:12]}"
        self.policy: GrpoPolicy | None = None
        self.batch_ids = itertools.count()
        self.pending: list[int] = []
        self.steps = 0

    def initialize(self) -> None:
        engine = self.lm.provider.engine
        kwargs = dict(self.train_kwargs)
        grpo = {k: cast(kwargs.pop(k)) for k, cast in _GRPO_KEYS.items() if k in kwargs}
        for key in _DSPY_KEYS:
            kwargs.pop(key, None)
        lora, train, seed = self.lm.provider.parse_train_kwargs(kwargs)
        iterations = grpo.pop("num_iterations", grpo.pop("iterations", 1))
        try:
            # DSPy's GRPO samples at the LM's temperature; greedy (0) has no distribution to score: 1
            sampled = float(self.lm.kwargs.get("temperature") or 1.0)
            settings = GrpoSettings(iterations=iterations, temperature=sampled, **grpo)
        except TypeError as err:
            raise InputError(f"train_kwargs: {err}") from None
        self.base_id, current = split_model_id(self.lm.model)
        if current and current not in engine.adapters:
            raise StepError(f"{self.lm.model}: adapter {current!r} is not registered on the engine")
        self.policy = GrpoPolicy(
            GrpoJob(
                checkpoint=engine.checkpoint,
                lora=lora,
                train=train,
                grpo=settings,
                device=engine.device,
                dtype=resolve_train_dtype(train.dtype, engine.device),
                seed=seed,
                total_steps=train.steps * settings.iterations if train.steps else None,
                init_adapter=Path(engine.adapters[current]) if current else None,
            )
        )
        self.folder = (self.lm.provider.adapters_dir or jointopt_home() / "adapters") / self.job_id
        self._offer()

    def _offer(self) -> None:
        """The batch ids of the next step: train.batch_size groups."""
        self.pending = [next(self.batch_ids) for _ in range(self.policy.job.train.batch_size)]

    def step(self, train_data: list[dict], train_data_format: TrainDataFormat | str | None = None) -> None:
        """One GRPO update on the groups; then the engine serves the new adapter under the LM's id."""
        fmt = getattr(train_data_format, "value", train_data_format)
        if fmt not in (None, TrainDataFormat.GRPO_CHAT.value):
            raise StepError(f"{self.lm.model}: a GRPO step takes {TrainDataFormat.GRPO_CHAT.value!r} data, not {fmt!r}")
        rows, advs = [], []
        for item in train_data:
            group = item["group"]
            rows += [{"messages": [*g["messages"], g["completion"]]} for g in group]
            advs += advantages([float(g["reward"]) for g in group])
        self.policy.update(rows, advs)
        self.steps += 1
        self._serve(self.folder / f"step-{self.steps}")
        self.pending = [b for b in self.pending if b not in {item.get("batch_id") for item in train_data}]
        if not self.pending:
            self._offer()

    def _serve(self, folder: Path) -> None:
        """Save the adapter into `folder`, register it on the engine and point the LM at it."""
        self.policy.save_adapter(folder)
        name = adapter_name("grpo", folder)
        self.lm.provider.engine.add_adapter(name, folder)
        self.lm.model = adapter_model_id(self.base_id, name)

    def get_status(self) -> GRPOStatus:
        return GRPOStatus(
            job_id=self.job_id,
            status="running" if self.policy is not None else "terminated",
            current_model=self.lm.model,
            checkpoints=dict(self.checkpoints),
            last_checkpoint=self.last_checkpoint,
            pending_batch_ids=list(self.pending),
        )

    def save_checkpoint(self, checkpoint_name: str) -> None:
        """A copy of the adapter as it is, under the job's folder (an adapter folder DSPy can name)."""
        folder = self.folder / "checkpoints" / checkpoint_name
        self.policy.save_adapter(folder)
        self.checkpoints[checkpoint_name] = str(folder)
        self.last_checkpoint = checkpoint_name

    def terminate(self) -> None:
        """Free the model in training; the LM keeps serving the last adapter (its folder stays)."""
        self.policy = None
        self.pending = []
