"""The probe: a short measurement on this machine that gives a plan its seconds. A few dozen real
generations, batched as an evaluation runs them and one alone as BootstrapFewShot's teacher runs
them, and a real LoRA optimizer step on rows like the first weight step's."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dspy

from ..files import read_jsonl
from ..inference.model_id import adapter_model_id
from ..metrics import build_metric
from ..models import build_lm
from ..program import build_program, model_of, predictors_of
from ..recipe import Recipe, WeightOptimizer
from ..steps.evaluate import evaluate
from ..training.lora import train_lora
from ..weights.checkpoint import resolve_checkpoint
from .prompts import Prompts
from .sizes import trained_modules

# The probe's concurrency (runtime.num_threads, at most this) and LM calls per timed evaluation: up to
# twice as many examples as threads, so that finished rows make room for new ones as in a long
# evaluation (sst2 on 2 loaded cores: 1.0 s an example with 8 examples on 8 threads, 0.85 with 16 on 16,
# 0.65 with 32 on 16), and no more calls than PROBE_CALLS (a pipeline's examples make several)
PROBE_THREADS, PROBE_CALLS = 16, 32


@dataclass
class Probe:
    """What a short run on this machine measured."""

    batched: list[tuple[float, float]]  # (prompt tokens, seconds) per example, batched: zero-shot, with demos
    single: float  # seconds per example alone, with demos (BootstrapFewShot's teacher runs one at a time)
    pass_rate: float  # the program with labeled demos on the probe's examples: BootstrapFewShot's expected runs
    adapter_factor: float = 1.0  # an evaluation's seconds with a LoRA adapter / without
    step_seconds: float | None = None  # one LoRA optimizer step
    row_tokens: float | None = None  # the length of its rows, as Prompts estimates it
    peak_rss_gb: float | None = None  # this process's peak memory after those steps
    seconds: float = 0.0  # the probe's own wall time

    def per_example(self, tokens: float, adapted: bool) -> float:
        """Seconds per example in a batched evaluation: linear in prompt tokens between the two points."""
        (t0, s0), (t1, s1) = self.batched[0], self.batched[-1]
        slope = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
        return max(min(s0, s1), s0 + slope * (tokens - t0)) * (self.adapter_factor if adapted else 1.0)


def run_probe(
    recipe: Recipe,
    splits,
    prompts: Prompts,
    names: list[str],
    demos: int,
    weight: tuple[WeightOptimizer, dict[str, int]] | None,
) -> Probe:
    """Time real generations (a few dozen calls zero-shot and with `demos` labeled demos, batched as an
    evaluation batches them, and one example alone) and, for `weight` (the first weight step and the demos
    then), a LoRA optimizer step on rows like its own, then the demos batch with that adapter.
    DSPy's cache is off."""
    start = time.perf_counter()
    prober = _Prober(recipe, splits, prompts, names)
    # untimed calls first: the first calls after loading are several times slower, and a batch's
    # shared prompt prefix (the system message, the demos) is computed once per evaluation, not per batch
    prober.timed(prober.program(0), prober.batch(0, 2), 0)
    zero, _ = prober.timed(prober.program(0), prober.batch(2), 0)
    prober.timed(prober.program(demos), prober.batch(0, 1), demos)
    shots, pass_rate = prober.timed(prober.program(demos), prober.batch(2 + prober.size), demos)
    (_, single), _ = prober.timed(prober.program(demos), prober.batch(2 + 2 * prober.size, 1), demos)
    probe = Probe([zero, shots], single, pass_rate)
    if weight is not None:
        prober.train(probe, *weight)
        tuned = prober.program(demos, {prober.trained: prober.tuned})
        prober.timed(tuned, prober.batch(0, 1), demos)
        (_, adapted), _ = prober.timed(tuned, prober.batch(2 + prober.size), demos)
        probe.adapter_factor = adapted / shots[1]
    probe.seconds = time.perf_counter() - start
    return probe


class _Prober:
    """The probe's programs on the recipe's local models (DSPy's cache off), its examples, its timer."""

    def __init__(self, recipe: Recipe, splits, prompts: Prompts, names: list[str]):
        self.recipe, self.splits, self.prompts, self.names = recipe, splits, prompts, names
        self.metric = build_metric(recipe.metric, recipe.label_field)
        self.model_of = {m: model_of(recipe, m) for m in names}
        self.lms = {key: build_lm(key, recipe.models[key], cache=False) for key in set(self.model_of.values())}
        self.pool = splits.dev + splits.test + splits.train
        self.threads = min(PROBE_THREADS, recipe.runtime.num_threads)
        self.size = max(2, min(2 * self.threads, PROBE_CALLS // len(prompts.predictors)))
        self.trained, self.tuned = None, None  # the module the LoRA step trained, its LM with that adapter

    def batch(self, first: int, count: int | None = None) -> list:
        """`count` (default: the probe's size) examples from the pool, from `first` on, wrapping round."""
        return [self.pool[(first + i) % len(self.pool)] for i in range(count or self.size)]

    def program(self, k: int, lms: dict | None = None):
        """The recipe's program with `k` demos per predictor, on the probe's LMs (or `lms`, by module)."""
        program = build_program(self.recipe)
        for m in self.names:
            for p in predictors_of(program, m):
                p.lm, p.demos = (lms or {}).get(m) or self.lms[self.model_of[m]], self.prompts.demos(p, k)
        return program

    def timed(self, program, examples: list, k: int) -> tuple[tuple[float, float], float]:
        """((prompt tokens, seconds) per example, score) of an evaluation of `examples`."""
        clock = time.perf_counter()
        with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
            result = evaluate(program, examples, self.metric, self.threads, label="probe")
        seconds = (time.perf_counter() - clock) / len(examples)
        return (self.prompts.per_example(examples, {m: k for m in self.names})[0], seconds), result.score

    def train(self, probe: Probe, spec: WeightOptimizer, demos: dict[str, int]) -> None:
        """One LoRA optimizer step on rows of the weight step's first module; its adapter joins the engine."""
        module = self.trained = trained_modules(self.recipe, spec, self.names)[0]
        model, k = self.recipe.models[self.model_of[module]], demos[module]
        rows = self.prompts.rows(module, k, spec.train.batch_size * spec.train.grad_accum)  # one optimizer step
        with tempfile.TemporaryDirectory() as tmp:
            result = train_lora(
                resolve_checkpoint(model.path),
                rows,
                Path(tmp) / "adapter",
                spec.lora,
                spec.train.model_copy(update={"epochs": None, "steps": 1}),
                seed=self.recipe.seed,
                log_path=Path(tmp) / "log.jsonl",
                device=model.device,
                resume=False,
                dtype=spec.train.dtype,
            )
            # the first step is no slower than the next (sst2 and the pipeline: 16.9 then 18.3 s, 20.0 then 20.6 s)
            probe.step_seconds = read_jsonl(Path(tmp) / "log.jsonl")[0]["seconds"]
            probe.row_tokens = sum(self.prompts.per_example(self.splits.train, {module: k}, [module]))
            probe.peak_rss_gb = result.peak_rss_mb / 1024
            base = self.lms[self.model_of[module]]
            base.engine.add_adapter("plan-probe", Path(tmp) / "adapter")
        self.tuned = base.copy(model=adapter_model_id(base.model, "plan-probe"))
