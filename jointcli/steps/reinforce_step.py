"""The reinforce step (g): GRPO on the metric's rewards, one LoRA adapter per module (or per base model).

    ReinforceStep("g").run(ctx)        # a strategy's `g`: NN-g

Each of its steps (train.steps, or train.epochs over the training examples) takes the next
train.batch_size x train.grad_accum training examples, runs the current program on each group_size
times at the optimizer's temperature through the engine (rollouts.py), scores every run with the
metric and updates the adapters on the group-relative advantages (training/grpo.py); the program of
the next step runs the updated adapters. A module with an adapter (after a w step) goes on training
it; one without starts a new adapter, which answers as the base model until it trains.

Files in NN-g/: adapters/<name>/ (with training.json: the figures and the reward curve, the mean
reward of each step's rollouts), train_log.jsonl (one line per step and adapter), rollouts.jsonl (each
rollout's example, reward and answer), and the evaluation, as a w step's. A killed step resumes from
the checkpoint of its last save (train.save_steps), kept in `.<name>.work/` beside the adapters; the
rollouts are seeded (the recipe's seed, the step, the optimizer step, the example, the sample), so
the resumed step draws what the first try drew.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..checks import step_optimizer
from ..files import read_jsonl, remove_path, write_json, write_jsonl
from ..program import module_names
from ..recipe.optimizers import ReinforceOptimizer
from ..rundir import Step
from ..state import ModuleState, ProgramState, save_state
from ..step_kinds import StepKind
from ..training.grpo import GrpoJob, GrpoPolicy, GrpoSettings, advantages
from ..training.hashing import fingerprint
from ..training.microbatch import plan_steps
from ..training.work import open_work_dir
from ..weights.checkpoint import resolve_checkpoint
from ..weights.device import resolve_device, resolve_train_dtype
from .base import StepContext, note, run_step
from .rollouts import Rollout, collect_rollouts, sampling
from .weights import weight_modules


class ReinforceStep:
    """GRPO on the modules that reinforce optimizer `key` names."""

    def __init__(self, key: str):
        self.key = key

    def run(self, ctx: StepContext) -> Step:
        spec: ReinforceOptimizer = step_optimizer(ctx.recipe, self.key, ReinforceOptimizer)
        return run_step(ctx, StepKind.REINFORCE, lambda step: self._train(ctx, spec, step), {"optimizer": self.key})

    def _train(self, ctx: StepContext, spec: ReinforceOptimizer, step: Step) -> None:
        folder = ctx.run.step_dir(step)
        program, state = ctx.current_program()
        modules = weight_modules(ctx.recipe, spec, module_names(ctx.recipe, program), state.modules)
        names = {m: state.modules[m].model if spec.adapters == "shared" else m for m in modules}
        trainset = ctx.trainset(step.index)
        per_step = spec.train.batch_size * spec.train.grad_accum
        plan = plan_steps(
            len(trainset), per_step, 0, ctx.recipe.seed + step.index, steps=spec.train.optimizer_steps(len(trainset))
        )
        run = _Run(ctx, spec, folder, state, names, len(plan), (ctx.recipe.seed, step.index))
        done = run.resume(trainset)
        for k in range(done, len(plan)):
            run.step(k, program if k == 0 else None, [trainset[i] for i in plan[k]])
        step.info["training"] = run.finish()
        new = state.with_modules(state.modules)
        for module, name in names.items():
            adapter = str((folder / "adapters" / name).relative_to(ctx.run.path))
            new.modules[module] = ModuleState(state.modules[module].model, adapter)
        tuned = ctx.program_for(new)
        save_state(ctx.run, folder, tuned, new)
        ctx.record_eval(step, ctx.evaluate(tuned, "dev"), "dev")


class _Run:
    """The adapters of one g step in training, its logs and checkpoints."""

    def __init__(
        self, ctx: StepContext, spec: ReinforceOptimizer, folder: Path, state: ProgramState, names, n_steps, seed
    ):
        self.ctx, self.spec, self.folder, self.state, self.names = ctx, spec, folder, state, names
        self.n_steps, self.seed = n_steps, seed  # seed: the rollouts' (the recipe's seed, the step's index)
        self.modules = list(names)
        self.log: list[dict] = []
        self.rollouts: list[dict] = []
        self.seconds = 0.0
        self.policies: dict[str, GrpoPolicy] = {}
        for module, name in names.items():
            if name not in self.policies:
                self.policies[name] = GrpoPolicy(self._job(module))

    def _job(self, module: str) -> GrpoJob:
        ms, spec = self.state.modules[module], self.spec
        local = self.ctx.recipe.models[ms.model]
        device = resolve_device(local.device)
        return GrpoJob(
            checkpoint=resolve_checkpoint(local.path),
            lora=spec.lora,
            train=spec.train,
            grpo=GrpoSettings(spec.epsilon, spec.beta, spec.iterations, spec.temperature),
            device=device,
            dtype=resolve_train_dtype(spec.train.dtype, device),
            seed=self.ctx.recipe.seed,
            total_steps=self.n_steps * spec.iterations,
            init_adapter=(self.ctx.run.path / ms.adapter) if ms.adapter else None,
        )

    def work(self, name: str) -> Path:
        return self.folder / "adapters" / f".{name}.work"

    def resume(self, trainset: list) -> int:
        """The steps done by an earlier try of this step whose checkpoints compute the same; 0 without."""
        key = fingerprint(
            {"optimizer": self.spec.model_dump(mode="json"), "seed": self.ctx.recipe.seed, "steps": self.n_steps},
            [e.toDict() for e in trainset],
            [],
        )
        lasts = {name: open_work_dir(self.work(name), True, key) for name in self.policies}
        if any(last is None for last in lasts.values()):
            return 0
        done = min(self.policies[name].restore(last) for name, last in lasts.items())
        self.log = [r for r in _lines(self.folder / "train_log.jsonl") if r.get("step", 0) <= done]
        self.rollouts = [r for r in _lines(self.folder / "rollouts.jsonl") if r.get("step", 0) <= done]
        note(f"{self.folder.name}: resuming after step {done} of {self.n_steps}")
        return done

    def _program(self, k: int):
        """The program whose adapters are the policies as they are before step k + 1."""
        modules = dict(self.state.modules)
        for module, name in self.names.items():
            path = self.work(name) / f"policy-{k}"
            if not path.is_dir():
                self.policies[name].save_adapter(path)
            modules[module] = ModuleState(modules[module].model, str(path.relative_to(self.ctx.run.path)))
        return self.ctx.program_for(self.state.with_modules(modules))

    def step(self, k: int, program, examples: list) -> None:
        """Step k + 1: rollouts of the examples, then the adapters' update."""
        start = time.perf_counter()
        spec = self.spec
        program = sampling(program if program is not None else self._program(k), spec.temperature)
        got = collect_rollouts(
            program,
            examples,
            self.ctx.metric,
            spec.group_size,
            spec.format_failure,
            self.modules,
            self.ctx.recipe.runtime.num_threads,
            seed=(*self.seed, k),
        )
        advantage = _advantages(got, spec.group_size)
        for name, policy in self.policies.items():
            rows = [(row, advantage[i]) for i, r in enumerate(got) for m, row in r.calls if self.names[m] == name]
            figures = policy.update([row for row, _ in rows], [a for _, a in rows])
            self.log.append({"step": k + 1, "adapter": name, **_summary(got), **figures})
        self.rollouts += [_rollout_line(k + 1, r) for r in got]
        self.seconds += time.perf_counter() - start
        for line in self.log[-len(self.policies) :]:
            line["seconds"] = round(self.seconds, 2)
        write_jsonl(self.folder / "train_log.jsonl", self.log)
        write_jsonl(self.folder / "rollouts.jsonl", self.rollouts)
        if (k + 1) % spec.train.save_steps == 0 and k + 1 < self.n_steps:
            for name, policy in self.policies.items():
                policy.checkpoint(self.work(name), k + 1)
        for name in self.policies:  # the engine holds the weights it served: the folder is not needed again
            remove_path(self.work(name) / f"policy-{k}")

    def finish(self) -> dict:
        """The adapters saved (each with training.json), the work folders removed; the figures."""
        out = {}
        for name, policy in self.policies.items():
            lines = [r for r in self.log if r["adapter"] == name]
            figures = {
                "steps": self.n_steps,
                "optimizer_steps": policy.state.step,
                "group_size": self.spec.group_size,
                "rollouts": len(self.rollouts),
                "rollout_tokens": {
                    "in": sum(r["rollout_tokens_in"] for r in lines),
                    "out": sum(r["rollout_tokens_out"] for r in lines),
                },
                "train_tokens": sum(r["tokens"] for r in lines) * self.spec.iterations,
                "seconds": round(self.seconds, 2),
                "reward_curve": [r["reward"] for r in lines],
                "parsed_curve": [r["parsed"] for r in lines],
                "device": policy.job.device,
                "dtype": policy.job.dtype,
            }
            policy.save_adapter(self.folder / "adapters" / name, {"training.json": figures})
            remove_path(self.work(name))
            out[name] = figures
        write_json(self.folder / "reward_curve.json", {n: f["reward_curve"] for n, f in out.items()})
        return out


def _advantages(rollouts: list[Rollout], group_size: int) -> list[float]:
    """Each rollout's advantage within its example's group (rollouts in example-major order)."""
    out = []
    for g in range(0, len(rollouts), group_size):
        out += advantages([r.reward for r in rollouts[g : g + group_size]])
    return out


def _summary(rollouts: list[Rollout]) -> dict:
    rewards = [r.reward for r in rollouts]
    return {
        "reward": round(statistics.fmean(rewards), 4),
        "parsed": round(sum(r.parsed for r in rollouts) / len(rollouts), 4),
        "rollout_tokens_in": sum(r.tokens[0] for r in rollouts),
        "rollout_tokens_out": sum(r.tokens[1] for r in rollouts),
    }


def _rollout_line(step: int, r: Rollout) -> dict:
    return {
        "step": step,
        "example": r.example,
        "sample": r.sample,
        "reward": r.reward,
        "answer": r.answer,
        "error": r.error,
    }


def _lines(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []
