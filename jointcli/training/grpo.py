"""GRPO updates of a LoRA adapter: group-relative advantages and the clipped objective, computed on the
trainer's shared-prefix micro-batches.

    policy = GrpoPolicy(GrpoJob(checkpoint, Lora(), Train(), GrpoSettings(), "cpu", "float32", seed=0,
                                total_steps=8))
    advantages([1.0, 0.0, 0.0, 0.0])                 # one group: the rewards of one example's rollouts
    figures = policy.update(rows, advantages)        # rows: {"messages": [system, user, assistant]}
    policy.save_adapter(Path("runs/x/03-g/adapters/classify"))

The objective is TRL's GRPO loss with token-level importance sampling, written here because TRL's
`GRPOTrainer` computes it inside its own trainer from the full [batch, seq, vocab] logits, while this
trainer computes a step in micro-batches that share the group's prompt (its rollouts answer one
prompt) and sends only the completion positions through the LM head (microbatch.py). Per completion
token t of rollout i, with advantage A_i and ratio r = pi(t) / pi_old(t):

    loss_t = -min(r A_i, clip(r, 1 - epsilon, 1 + epsilon) A_i) + beta (exp(q - l) - (q - l) - 1)

where l, q are the token's log-probabilities under the adapter and under the adapter the training
started from (the k3 estimate of the KL divergence, as TRL), both of softmax(logits / T) at the
rollouts' sampling temperature T: the distribution the rollouts were drawn from, as TRL scores them.
The step's loss is the sum over the completion tokens of its rows divided by their count (TRL's
"dapo"/"bnpo" normalization, the same as the supervised trainer's). pi_old is the adapter that
sampled the rollouts: its log-probabilities are those of the first of the `iterations` optimizer
steps on a batch, detached (the ratio is then 1 and the clip inactive, as in TRL with
num_iterations=1). Rollouts whose advantage is 0 (a group whose rewards are all equal) add nothing to
the gradient without a KL term and are left out, as DAPO's dynamic sampling does.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from ..files import staged_dir, write_json
from ..recipe import Lora, Train
from ..weights.checkpoint import load_tokenizer
from ..weights.device import autocast, cpu_budget, torch_threads
from .job import TrainJob
from .microbatch import micro_batch_losses, plan_step
from .model import TrainState, load_for_training, start_optimizer
from .rows import to_prompt_completion, tokenize_pair
from .work import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class GrpoSettings:
    epsilon: float = 0.2  # the ratio's clip
    beta: float = 0.0  # weight of the KL term to the starting adapter
    iterations: int = 1  # optimizer steps on each batch of rollouts
    temperature: float = 1.0  # the rollouts' sampling temperature: log-probabilities are of logits / temperature


@dataclass(frozen=True)
class GrpoJob:
    """One adapter trained by GRPO: the base checkpoint, its settings, the adapter it starts from (None:
    a new one on the base weights) and the optimizer steps the learning rate decays over."""

    checkpoint: Path
    lora: Lora
    train: Train
    grpo: GrpoSettings
    device: str
    dtype: str
    seed: int
    total_steps: int | None  # the learning rate decays linearly to 0 over them; None: constant
    init_adapter: Path | None = None


def advantages(rewards: list[float]) -> list[float]:
    """Group-relative advantages of one group's rewards: (r - mean) / (std + 1e-4), the sample standard
    deviation, as TRL scales them; all 0 when the rewards are equal.

    >>> [round(a, 3) for a in advantages([1.0, 0.0, 0.0, 1.0])]
    [0.866, -0.866, -0.866, 0.866]
    >>> advantages([0.5, 0.5])
    [0.0, 0.0]
    """
    mean = statistics.fmean(rewards)
    std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    return [(r - mean) / (std + 1e-4) for r in rewards]


class GrpoPolicy:
    """The adapter in training (the frozen base with its LoRA, and AdamW), updated by `update`."""

    def __init__(self, job: GrpoJob):
        self.job = job
        self.tokenizer = load_tokenizer(job.checkpoint)  # its chat template formats the rows, as the engine's
        self.pad_id = next((i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if i is not None), 0)
        model = load_for_training(job.checkpoint, job.lora, job.device, job.dtype, job.seed, job.init_adapter)
        train_job = TrainJob(job.checkpoint, [], Path("."), job.lora, job.train, job.seed, None, job.device, job.dtype)
        self.state: TrainState = start_optimizer(model, train_job)
        # the starting adapter's weights (for the KL term): swapped in to compute its log-probabilities
        self.start = [p.detach().clone() for p in self.state.params] if job.grpo.beta > 0 else None
        self.token_budget = job.train.micro_batch_tokens(job.device, job.dtype)

    def update(self, rows: list[dict], advantages: list[float]) -> dict:
        """`iterations` optimizer steps on the rollouts `rows` (DSPy chat rows, the last message the
        rollout's answer), each with its advantage: {"rows", "tokens", "loss", "grad_norm"} of the last
        (no step when no row carries a gradient: grad_norm None)."""
        data = self._rows(rows, advantages)
        figures = {"rows": len(data[0]), "tokens": sum(len(ids) for ids, _ in data[0]), "loss": 0.0, "grad_norm": None}
        if not data[0]:
            self.state.step += self.job.grpo.iterations  # the learning rate's schedule goes on
            return figures
        with torch_threads(cpu_budget()), autocast(self.job.device, self.job.dtype):
            ref = self._logps(data[0]) if self.start is not None else None
            old: dict[int, object] = {}
            for _ in range(self.job.grpo.iterations):
                figures["loss"], figures["grad_norm"] = self._step(data, old, ref)
        return figures

    def _rows(self, rows: list[dict], advantages: list[float]) -> tuple[list, list[float]]:
        """The rows to train on, tokenized, with their advantages: without those over train.max_length
        and, without a KL term, those whose advantage is 0."""
        keep_zero = self.start is not None
        out, advs = [], []
        for pair, adv in zip(to_prompt_completion(rows), advantages):
            if adv == 0 and not keep_zero:
                continue
            ids, start = tokenize_pair(self.tokenizer, pair)
            if len(ids) <= self.job.train.max_length:
                out.append((ids, start))
                advs.append(adv)
        return out, advs

    def _step(self, data: tuple[list, list[float]], old: dict, ref: dict | None) -> tuple[float, float]:
        """One optimizer step of the GRPO objective on the rows (module docstring)."""
        import torch

        rows, advs = data
        state, grpo = self.state, self.job.grpo
        total = self.job.total_steps
        decay = 1.0 if total is None else (total - min(state.step, total - 1)) / total
        for group in state.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * decay
        n_labels = sum(len(ids) - start for ids, start in rows)
        total = 0.0
        for micro, nll, counts in self._micro_batches(rows):
            logp = -nll
            counts = counts.tolist()
            if not old.keys() >= set(micro):  # the first step on this batch: the sampling adapter's
                old.update(zip(micro, logp.detach().split(counts)))
            before = torch.cat([old[i] for i in micro])
            adv = torch.tensor([advs[i] for i in micro], device=logp.device).repeat_interleave(
                torch.tensor(counts, device=logp.device)
            )
            ratio = torch.exp(logp - before)
            clipped = torch.clamp(ratio, 1 - grpo.epsilon, 1 + grpo.epsilon)
            per_token = -torch.min(ratio * adv, clipped * adv)
            if ref is not None:
                diff = torch.cat([ref[i] for i in micro]) - logp
                per_token = per_token + grpo.beta * (torch.exp(diff) - diff - 1)
            loss = per_token.sum() / n_labels
            loss.backward()
            total += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(state.params, 1.0))
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        return total, grad_norm

    def _logps(self, rows: list) -> dict:
        """Each row's per-token log-probabilities under the starting adapter (no gradient)."""
        import torch

        current = [p.detach().clone() for p in self.state.params]
        out = {}
        with torch.no_grad():
            for p, s in zip(self.state.params, self.start):
                p.copy_(s)
            try:
                for micro, nll, counts in self._micro_batches(rows):
                    out.update(zip(micro, (-nll).split(counts.tolist())))
            finally:
                for p, c in zip(self.state.params, current):
                    p.copy_(c)
        return out

    def _micro_batches(self, rows: list):
        """micro_batch_losses of `rows` as the objective scores them: per token, at the rollouts'
        temperature, in micro-batches that share the group's prompt (train.share_prefix)."""
        shared = rows if self.job.train.share_prefix else None
        groups = plan_step([len(ids) for ids, _ in rows], list(range(len(rows))), self.token_budget, shared)
        return micro_batch_losses(
            self.state.model,
            rows,
            groups,
            self.pad_id,
            self.job.device,
            per_row="token",
            temperature=self.job.grpo.temperature,
        )

    def save_adapter(self, folder: Path, extra: dict | None = None) -> None:
        """The adapter as it is (a PEFT adapter folder), replacing `folder` whole; `extra` files
        ({name: JSON-able}) beside it."""
        with staged_dir(folder) as tmp:
            self.state.model.save_pretrained(str(tmp))
            for name, obj in (extra or {}).items():
                write_json(tmp / name, obj)

    def checkpoint(self, work: Path, step: int) -> None:
        """Adapter, optimizer and RNG state after `step` GRPO steps, into the work folder."""
        save_checkpoint(work, step, self.state, 0)

    def restore(self, path: Path) -> int:
        """Resume from a `checkpoint`: the GRPO steps it was taken after."""
        load_checkpoint(self.state, path, self.job.device)
        done = self.state.step
        self.state.step = done * self.job.grpo.iterations  # optimizer steps, for the learning rate
        return done
