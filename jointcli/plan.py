"""`jointopt plan`: what each step of a recipe's schedule will cost, before it runs.

    from jointcli.recipe import load_recipe
    from jointcli.plan import build_plan
    plan = build_plan(load_recipe("recipes/sst2.yaml"), probe=False)   # counts only: no weights read
    [(s.step, s.phases["dev"].calls.expected) for s in plan.steps[:2]]  # [('00-baseline', 100), ('01-p', 100)]

Steps: the baseline, each step of `schedule.strategy`, the final test evaluation. For each phase of a
step (a prompt optimizer's calls, a weight step's bootstrap and training, the dev or test evaluation):
- LM calls: evaluations and bootstraps run every example through every predictor (exact); a prompt
  optimizer's count comes from DSPy 3.4's own formulas at its settings (`Calls`: a range where the
  count depends on what the model answers, `approximate` where DSPy's own estimate is one);
- tokens: each predictor's prompt as its adapter formats it, with the demos the program holds at
  that step (taken from the training split), counted by its model's tokenizer (characters / 4
  without one: approximate); completions at most `max_tokens`;
- weight steps: the LoRA parameters PEFT trains (the model built from config.json on the `meta`
  device: no weights are read) and the memory of LoRA against full fine-tuning, with a warning when
  it exceeds what this machine has;
- with a probe (local models), seconds: a few dozen real generations, batched as an evaluation runs
  them, one alone as BootstrapFewShot's teacher runs them, and a real LoRA optimizer step on rows
  like the first weight step's, extrapolated by calls, prompt tokens and training steps.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError
from .recipe import LocalModel, PromptOptimizer, Recipe, SimultaneousOptimizer, WeightOptimizer

GB = 2**30
SAMPLE = 20  # examples whose prompts are tokenized; a split's tokens are their mean x its size
# The probe's concurrency (runtime.num_threads, at most this) and LM calls per timed evaluation: up to
# twice as many examples as threads, so that finished rows make room for new ones as in a long
# evaluation (sst2 on 2 loaded cores: 1.0 s an example with 8 examples on 8 threads, 0.85 with 16 on 16,
# 0.65 with 32 on 16), and no more calls than PROBE_CALLS (a pipeline's examples make several)
PROBE_THREADS, PROBE_CALLS = 16, 32
FILLER_TOKENS = 32  # tokens assumed for a field no example holds (an earlier module's output, reasoning)
# Activation bytes per token per layer, Korthikanti et al. 2022 ("Reducing activation recomputation"):
# 34 h + 5 a s in 16-bit (h hidden size, a heads, s row length); x2 in fp32. An estimate.
ACT_HIDDEN, ACT_ATTENTION = 34, 5


# ---------------------------------------------------------------- what a plan holds
@dataclass
class Calls:
    """LM calls of a phase: at least `low`, at most `high`, `expected` the estimate."""

    low: int
    high: int
    expected: int
    approximate: bool = False  # the count is DSPy's estimate, or depends on the model's answers

    @classmethod
    def exact(cls, n: int) -> Calls:
        return cls(n, n, n)

    def __str__(self) -> str:
        if self.low == self.high and not self.approximate:
            return f"{self.low:,}"
        if self.low == self.high:
            return f"~{self.expected:,}"
        return f"{self.low:,}-{self.high:,} (~{self.expected:,})"


@dataclass
class Phase:
    calls: Calls
    tokens_in: int  # prompt tokens (training: tokens trained on)
    tokens_out: int  # completion tokens, at most
    seconds: float | None = None  # with a probe


@dataclass
class StepPlan:
    step: str  # the folder the step will have (00-baseline, 01-p, 02-w, ...), or "test"
    kind: str  # baseline, p, w or test
    optimizer: str | None = None  # its key under `optimizers`
    method: str | None = None  # the DSPy optimizer, or LoRA
    demos: dict[str, int] = field(default_factory=dict)  # demos per module in the program it evaluates
    phases: dict[str, Phase] = field(default_factory=dict)  # optimizer, bootstrap, train, dev, test
    train: dict[str, dict] = field(default_factory=dict)  # w: per adapter: rows, steps, LoRA, memory
    warnings: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        times = [p.seconds for p in self.phases.values()]
        return None if None in times else sum(times)


@dataclass
class Plan:
    recipe: str
    strategy: str
    machine: dict  # cpu kind, device, memory available
    modules: dict[str, dict]  # module -> model key, type, path, architecture, parameters
    steps: list[StepPlan]
    probe: dict | None = None

    @property
    def seconds(self) -> float | None:
        times = [s.seconds for s in self.steps]
        return None if None in times else sum(times)

    @property
    def warnings(self) -> list[str]:
        return [f"{s.step}: {w}" for s in self.steps for w in s.warnings]

    def to_json(self) -> dict:
        steps = [{**asdict(s), "seconds": s.seconds} for s in self.steps]
        return {
            "recipe": self.recipe,
            "strategy": self.strategy,
            "machine": self.machine,
            "modules": self.modules,
            "steps": steps,
            "seconds": self.seconds,
            "probe": self.probe,
            "warnings": self.warnings,
        }


# ---------------------------------------------------------------- models: config.json, the meta device
def _meta_model(checkpoint: Path):
    """The checkpoint's model built from its config.json on the meta device: shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:  # an encoder, a model_type this transformers does not know
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"model {checkpoint}: transformers cannot build a causal LM from its config.json ({reason})"
        ) from None


def model_facts(checkpoint: Path) -> dict:
    """Architecture, parameter count and the sizes the memory estimate needs, read from config.json."""
    model = _meta_model(checkpoint)
    config = model.config.get_text_config()
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
    }


def lora_parameters(checkpoint: Path, lora) -> int:
    """The parameters PEFT trains for the recipe's LoRA settings (as lora.load_for_training sets it up)."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=targets,
    )
    with torch.device("meta"):
        model = get_peft_model(_meta_model(checkpoint), config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _module_models(recipe: Recipe, names: list[str]) -> dict[str, dict]:
    from .program import model_of
    from .weights.checkpoint import resolve_checkpoint

    facts: dict[str, dict] = {}
    for key, spec in recipe.models.items():
        if isinstance(spec, LocalModel):
            checkpoint = resolve_checkpoint(spec.path)
            facts[key] = {"type": "local", "path": spec.path, "checkpoint": str(checkpoint), **model_facts(checkpoint)}
        else:
            facts[key] = {"type": "remote", "path": spec.model, "architecture": None, "parameters": None}
    return {m: {"model": model_of(recipe, m), **facts[model_of(recipe, m)]} for m in names}


def available_memory(device: str) -> tuple[int, str]:
    """(bytes this process could still use, what was read): the GPU's free memory, or MemAvailable
    capped by the cgroup's limit."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0], "cuda free"
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, KeyError, ValueError):
        pass
    return free, "MemAvailable"


def training_memory(facts: dict, trainable: int, rows_per_step: int, row_tokens: int, device: str, dtype: str) -> dict:
    """Bytes to train, LoRA against full fine-tuning: weights, gradients, AdamW's two moments (fp32),
    activations of one micro-batch (lora.TOKEN_BUDGET computed tokens; one row when longer)."""
    from .training.lora import TOKEN_BUDGET

    width = 2 if dtype == "bfloat16" else 4
    tokens = min(rows_per_step * row_tokens, max(TOKEN_BUDGET[device][dtype], row_tokens))
    per_token = ACT_HIDDEN * facts["hidden_size"] + ACT_ATTENTION * facts["heads"] * row_tokens
    activations = tokens * facts["layers"] * per_token * width // 2
    n = facts["parameters"]
    return {
        "lora": n * width + trainable * 16 + activations,
        "full": n * 16 + activations,
        "activations": activations,
        "micro_batch_tokens": tokens,
    }


# ---------------------------------------------------------------- prompts and their tokens
class Prompts:
    """Tokens of each predictor's calls, formatted by its adapter (demos: the first training examples),
    counted by its model's tokenizer; fields no example holds are FILLER_TOKENS words."""

    def __init__(self, recipe: Recipe, program, names: list[str], modules: dict[str, dict], train: list):
        from .program import predictors_of

        self.recipe, self.train = recipe, train
        self.predictors = [(m, p) for m in names for p in predictors_of(program, m)]
        self.tokenizers = {m: _tokenizer(info.get("checkpoint")) for m, info in modules.items()}
        self.max_tokens = {m: recipe.models[info["model"]].max_tokens for m, info in modules.items()}
        self.approximate = None in self.tokenizers.values()

    def _fill(self, example, names) -> dict:
        return {n: example.get(n, " ".join(["good"] * FILLER_TOKENS)) for n in names}

    def demos(self, predictor, k: int) -> list:
        """`k` training examples, spread over the split, as a predictor's demos."""
        import dspy

        fields = list(predictor.signature.input_fields) + list(predictor.signature.output_fields)
        spread = [self.train[i * len(self.train) // k] for i in range(min(k, len(self.train)))]  # as a random draw
        return [dspy.Example(**self._fill(e, fields)) for e in spread]

    def per_example(self, examples: list, demos: dict[str, int], only: list[str] | None = None) -> tuple[float, int]:
        """(prompt tokens, at most completion tokens) of one example through every predictor (of `only`)."""
        from .program import module_adapter

        sample, tokens_in, tokens_out = examples[:SAMPLE], 0.0, 0
        for module, p in (x for x in self.predictors if only is None or x[0] in only):
            shots = self.demos(p, demos.get(module, 0))
            counts = [
                self._count(
                    module, module_adapter(p).format(p.signature, shots, self._fill(e, p.signature.input_fields))
                )
                for e in sample
            ]
            tokens_in += sum(counts) / max(1, len(counts))
            tokens_out += self.max_tokens[module]
        return tokens_in, tokens_out

    def rows(self, module: str, demos: int, count: int) -> list[dict]:
        """`count` fine-tune rows of `module` as a bootstrap writes them: its prompt, the gold answer."""
        from .program import module_adapter

        rows = []
        for _, p in (x for x in self.predictors if x[0] == module):
            for e in (self.train[i % len(self.train)] for i in range(count)):
                data = module_adapter(p).format_finetune_data(
                    signature=p.signature,
                    demos=self.demos(p, demos),
                    inputs=self._fill(e, p.signature.input_fields),
                    outputs=self._fill(e, p.signature.output_fields),
                )
                rows.append({"messages": data["messages"]})
        return rows[:count]

    def _count(self, module: str, messages: list[dict]) -> int:
        tokenizer = self.tokenizers[module]
        if tokenizer is None:
            return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)
        from .weights.chat import chat_ids  # the checkpoint's template, as the engine applies it

        return len(chat_ids(tokenizer, messages, add_generation_prompt=True))


def _tokenizer(checkpoint: str | None):
    """The checkpoint's tokenizer, or None (a LiteLLM model; a folder with a config and no tokenizer)."""
    if checkpoint is None or not any(
        (Path(checkpoint) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    from .weights.checkpoint import load_tokenizer

    return load_tokenizer(Path(checkpoint))


# ---------------------------------------------------------------- prompt optimizers: DSPy 3.4's arithmetic
def optimizer_settings(spec: PromptOptimizer) -> dict:
    """The optimizer's constructor and compile() arguments: the recipe's, else DSPy's defaults."""
    from .steps.prompts import optimizer_class, parameters

    cls = optimizer_class(spec.optimizer)
    defaults: dict = {}
    for fn in (cls.__init__, cls.compile):  # compile's None means "the constructor's" (MIPROv2's demos)
        defaults.update(
            {
                n: p.default
                for n, p in parameters(fn).items()
                if p.default is not p.empty and (p.default is not None or n not in defaults)
            }
        )
    return {**defaults, **spec.args, **spec.compile_args}


def bootstrap_runs(s: dict, train: int, pass_rate: float | None) -> Calls:
    """Program runs of BootstrapFewShot's teacher: examples in order until max_bootstrapped_demos pass,
    each tried up to max_rounds times; the expected count from a pass rate (else the bound)."""
    need, rounds = s["max_bootstrapped_demos"], s["max_rounds"]
    if not need:
        return Calls.exact(0)
    low, high = min(need, train), train * rounds
    if not pass_rate:
        return Calls(low, high, high)
    tried = min(train, math.ceil(need / pass_rate))
    return Calls(low, high, min(high, round(tried * (1 + (rounds - 1) * (1 - pass_rate)))))


def optimizer_calls(spec: PromptOptimizer, train: int, predictors: int, pass_rate: float | None) -> Calls:
    """LM calls of a prompt optimizer's compile() on `train` examples (jointopt passes no valset)."""
    s, name = optimizer_settings(spec), spec.optimizer
    if name == "LabeledFewShot":
        return Calls.exact(0)
    if name == "BootstrapFewShot":
        runs, extra = bootstrap_runs(s, train, pass_rate), 0
    elif name == "BootstrapFewShotWithRandomSearch":  # n+3 candidates scored on the trainset, n+1 bootstrapped
        n = s["num_candidate_programs"]
        runs, extra = _scaled(bootstrap_runs(s, train, pass_rate), n + 1, (n + 3) * train), 0
    elif name == "MIPROv2":
        runs, extra = _mipro_runs(s, train, predictors, pass_rate)
    elif name == "GEPA":  # its metric-call budget; the reflection model's calls come on top
        from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS, GEPA

        budget = (
            GEPA.auto_budget(None, predictors, AUTO_RUN_SETTINGS[s["auto"]]["n"], train)
            if s.get("auto")
            else s.get("max_metric_calls") or s["max_full_evals"] * train
        )
        runs, extra = Calls(budget, budget, budget, True), 0
    elif name == "COPRO":  # breadth candidates per predictor per depth, each scored on the trainset
        n = predictors * s["depth"] * s["breadth"] * train
        runs, extra = Calls(n, n, n, True), predictors * s["depth"]
    else:  # SIMBA: per step, bsize examples x num_candidates trajectories, then the candidates on the batch
        n = s["max_steps"] * s["bsize"] * s["num_candidates"] * 2
        runs, extra = Calls(n, n, n, True), 0
    return Calls(
        runs.low * predictors + extra,
        runs.high * predictors + extra,
        runs.expected * predictors + extra,
        runs.approximate or extra > 0,
    )


def _scaled(boot: Calls, times: int, plus: int) -> Calls:
    return Calls(boot.low * times + plus, boot.high * times + plus, boot.expected * times + plus, True)


def _mipro_runs(s: dict, train: int, predictors: int, pass_rate: float | None) -> tuple[Calls, int]:
    """MIPROv2 (mipro_optimizer_v2.py): trainset split 20/80 into train/val; auto sets n, the val size
    and num_trials; minibatches of minibatch_size with a full eval every minibatch_full_eval_steps."""
    from dspy.teleprompt.mipro_optimizer_v2 import AUTO_RUN_SETTINGS, MIN_MINIBATCH_SIZE

    val = min(1000, max(1, int(train * 0.8)))
    zeroshot = s["max_bootstrapped_demos"] == 0 and s["max_labeled_demos"] == 0
    if s["auto"]:
        n, val = AUTO_RUN_SETTINGS[s["auto"]]["n"], min(val, AUTO_RUN_SETTINGS[s["auto"]]["val_size"])
        minibatch, instruct = val > MIN_MINIBATCH_SIZE, n if zeroshot else int(n * 0.5)
        trials = int(max(2 * predictors * (1 if zeroshot else 2) * math.log2(n), 1.5 * n))
    else:
        n, trials, minibatch, instruct = s["num_candidates"], s["num_trials"], s["minibatch"], s["num_candidates"]
    size, every = s["minibatch_size"], s["minibatch_full_eval_steps"]
    evals = size * trials + val * (trials // every + 1) if minibatch else val * trials
    boot = bootstrap_runs(
        {"max_rounds": 1, **s, "max_bootstrapped_demos": s["max_bootstrapped_demos"] or 3}, train - val, pass_rate
    )
    return _scaled(boot, n + 1, evals), 10 + instruct * predictors + predictors + 1


def demos_after(spec: PromptOptimizer, before: int, train: int) -> int:
    """Demos per predictor after a prompt step (COPRO and GEPA change instructions only)."""
    s = optimizer_settings(spec)
    if spec.optimizer == "LabeledFewShot":
        return min(train, s["k"])
    if spec.optimizer == "SIMBA":
        return min(train, s["max_demos"])
    if spec.optimizer in ("COPRO", "GEPA"):
        return before
    return min(train, max(s["max_labeled_demos"], s["max_bootstrapped_demos"]))


# ---------------------------------------------------------------- the probe: a short measurement here
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
        from .metrics import build_metric
        from .models import build_lm
        from .program import model_of

        self.recipe, self.splits, self.prompts, self.names = recipe, splits, prompts, names
        self.metric = build_metric(recipe.metric, recipe.label_field)
        self.model_of = {m: model_of(recipe, m) for m in names}
        self.lms = {key: build_lm(key, recipe.models[key], cache=False) for key in set(self.model_of.values())}
        self.pool = splits.dev + splits.test + splits.train
        self.threads = min(PROBE_THREADS, recipe.runtime.num_threads)
        self.size = max(2, min(2 * self.threads, PROBE_CALLS // len(prompts.predictors)))
        self.trained, self.tuned = None, None  # the module the LoRA step trained, its LM with that adapter

    def batch(self, first: int, count: int | None = None) -> list:
        return [self.pool[(first + i) % len(self.pool)] for i in range(count or self.size)]

    def program(self, k: int, lms: dict | None = None):
        """The recipe's program with `k` demos per predictor, on the probe's LMs (or `lms`, by module)."""
        from .program import build_program, predictors_of

        program = build_program(self.recipe)
        for m in self.names:
            for p in predictors_of(program, m):
                p.lm, p.demos = (lms or {}).get(m) or self.lms[self.model_of[m]], self.prompts.demos(p, k)
        return program

    def timed(self, program, examples: list, k: int) -> tuple[tuple[float, float], float]:
        """((prompt tokens, seconds) per example, score) of an evaluation of `examples`."""
        import dspy

        from .steps.evaluate import evaluate

        clock = time.perf_counter()
        with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
            result = evaluate(program, examples, self.metric, self.threads, label="probe")
        seconds = (time.perf_counter() - clock) / len(examples)
        return (self.prompts.per_example(examples, {m: k for m in self.names})[0], seconds), result.score

    def train(self, probe: Probe, spec: WeightOptimizer, demos: dict[str, int]) -> None:
        """One LoRA optimizer step on rows of the weight step's first module; its adapter joins the engine."""
        from .files import read_jsonl
        from .inference.model_id import adapter_model_id
        from .training.lora import train_lora
        from .weights.checkpoint import resolve_checkpoint

        module = self.trained = _trained(self.recipe, spec, self.names)[0]
        model, k = self.recipe.models[self.model_of[module]], demos[module]
        rows = self.prompts.rows(module, k, spec.train.batch_size * spec.train.grad_accum)  # one optimizer step
        with tempfile.TemporaryDirectory() as tmp:
            result = train_lora(
                resolve_checkpoint(model.path),
                rows,
                Path(tmp) / "adapter",
                spec.lora,
                spec.train.model_copy(update={"epochs": 1.0}),
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


# ---------------------------------------------------------------- the steps
def _trained(recipe: Recipe, spec: WeightOptimizer, names: list[str]) -> list[str]:
    """The modules a weight step fine-tunes: those it names (or all) on local models."""
    from .program import model_of

    chosen = names if spec.modules == "all" else spec.modules
    return [m for m in chosen if isinstance(recipe.models[model_of(recipe, m)], LocalModel)]


def demos_by_step(recipe: Recipe, keys: list[str], names: list[str], train: int) -> list[dict[str, int]]:
    """Demos per module of the program after the baseline and after each step."""
    walk = [{m: 0 for m in names}]
    for key in keys:
        spec, demos = recipe.optimizers[key], dict(walk[-1])
        if isinstance(spec, PromptOptimizer):
            for m in names if spec.modules == "all" else spec.modules:
                demos[m] = demos_after(spec, demos[m], train)
        walk.append(demos)
    return walk


class Estimator:
    """The phases of each step: calls and tokens from the recipe, seconds from the probe."""

    def __init__(
        self,
        recipe: Recipe,
        splits,
        prompts: Prompts,
        names: list[str],
        modules: dict[str, dict],
        probe: Probe | None,
        memory: tuple[int, str],
    ):
        self.recipe, self.splits, self.prompts, self.names, self.modules = recipe, splits, prompts, names, modules
        self.probe, self.free = probe, memory[0]
        self.predictors = len(prompts.predictors)

    def evaluation(self, split: str, demos: dict[str, int], adapted: bool) -> Phase:
        examples = getattr(self.splits, split)
        tokens_in, tokens_out = self.prompts.per_example(examples, demos)
        seconds = len(examples) * self.probe.per_example(tokens_in, adapted) if self.probe else None
        return Phase(
            Calls.exact(len(examples) * self.predictors),
            round(len(examples) * tokens_in),
            len(examples) * tokens_out,
            seconds,
        )

    def optimizer(self, spec: PromptOptimizer, demos: dict[str, int], adapted: bool) -> Phase:
        train = self.splits.train
        calls = optimizer_calls(spec, len(train), self.predictors, self.probe.pass_rate if self.probe else None)
        teacher = optimizer_settings(spec).get("max_labeled_demos")  # BootstrapFewShot's teacher: labeled demos
        tokens_in, tokens_out = self.prompts.per_example(
            train, demos if teacher is None else {m: min(len(train), teacher) for m in demos}
        )
        runs, seconds = calls.expected / self.predictors, None
        if self.probe and spec.optimizer == "BootstrapFewShot":  # one call at a time
            seconds = runs * self.probe.single * (self.probe.adapter_factor if adapted else 1.0)
        elif self.probe:
            seconds = runs * self.probe.per_example(tokens_in, adapted)
        return Phase(calls, round(runs * tokens_in), round(runs * tokens_out), seconds)

    def training(self, key: str, spec: WeightOptimizer, demos: dict[str, int]) -> tuple[Phase, dict, list[str]]:
        """LoRA on at most one row per training example and trained module; adapters per module or per model."""
        from .training.lora import plan_steps
        from .weights.device import resolve_device, resolve_train_dtype

        groups: dict[str, list[str]] = {}
        for m in _trained(self.recipe, spec, self.names):
            groups.setdefault(self.modules[m]["model"] if spec.adapters == "shared" else m, []).append(m)
        per_step, n_train = spec.train.batch_size * spec.train.grad_accum, len(self.splits.train)
        train, warnings, tokens, seconds = {}, [], 0, 0.0
        for name, members in groups.items():
            info = self.modules[members[0]]
            prompt, completion = self.prompts.per_example(self.splits.train, demos, members)
            virtual = spec.soft_prompt.virtual_tokens if isinstance(spec, SimultaneousOptimizer) else 0
            row_tokens, rows = round((prompt + completion) / len(members)) + virtual, n_train * len(members)
            steps = len(plan_steps(rows, per_step, spec.train.epochs, 0))
            device = resolve_device(self.recipe.models[info["model"]].device)
            dtype = resolve_train_dtype(spec.train.dtype, device)
            trainable = lora_parameters(Path(info["checkpoint"]), spec.lora) + virtual * info["hidden_size"]
            memory = training_memory(info, trainable, per_step, row_tokens, device, dtype)
            train[name] = {
                "model": info["model"],
                "modules": members,
                "rows": rows,
                "steps": steps,
                "row_tokens": row_tokens,
                "parameters": info["parameters"],
                "lora_parameters": trainable,
                "device": device,
                "dtype": dtype,
                "memory_gb": {k: round(v / GB, 2) for k, v in memory.items() if k != "micro_batch_tokens"},
                "micro_batch_tokens": memory["micro_batch_tokens"],
            }
            if memory["lora"] > self.free:
                warnings.append(
                    f"{key} ({name}): LoRA training needs about {memory['lora'] / GB:.1f} GB, more than "
                    f"the {self.free / GB:.1f} GB of {device} memory available; it will not fit"
                )
            tokens += round(rows * row_tokens * spec.train.epochs)
            if self.probe and self.probe.step_seconds:
                seconds += steps * self.probe.step_seconds * row_tokens / self.probe.row_tokens
        probed = self.probe is not None and self.probe.step_seconds is not None
        return Phase(Calls.exact(0), tokens, 0, seconds if probed else None), train, warnings

    def steps(self, keys: list[str]) -> list[StepPlan]:
        walk = demos_by_step(self.recipe, keys, self.names, len(self.splits.train))
        baseline = self.evaluation("dev", walk[0], False)
        out = [StepPlan("00-baseline", "baseline", demos=walk[0], phases={"dev": baseline})]
        adapted = False
        for i, key in enumerate(keys, 1):
            spec = self.recipe.optimizers[key]
            if isinstance(spec, PromptOptimizer):
                step = StepPlan(
                    f"{i:02d}-p",
                    "p",
                    key,
                    spec.optimizer,
                    walk[i],
                    {"optimizer": self.optimizer(spec, walk[i - 1], adapted)},
                )
            else:
                bootstrap = (
                    Phase(Calls.exact(0), 0, 0, 0.0 if self.probe else None)
                    if spec.traces.source == "labels"
                    else self.evaluation("train", walk[i], adapted)
                )
                train, info, warnings = self.training(key, spec, walk[i])
                kind = "s" if isinstance(spec, SimultaneousOptimizer) else "w"
                step = StepPlan(
                    f"{i:02d}-{kind}",
                    kind,
                    key,
                    "LoRA + soft prompt" if kind == "s" else "LoRA",
                    walk[i],
                    {"bootstrap": bootstrap, "train": train},
                    info,
                    warnings,
                )
                adapted = True
            step.phases["dev"] = self.evaluation("dev", walk[i], adapted)
            out.append(step)
        test = self.evaluation("test", walk[-1], adapted)  # the best step by dev, and the last if it is another
        test.calls = Calls(test.calls.low, test.calls.low * (2 if keys else 1), test.calls.low)
        return out + [StepPlan("test", "test", demos=walk[-1], phases={"test": test})]


def build_plan(recipe: Recipe, probe: bool | None = None) -> Plan:
    """The plan of the recipe's schedule (checks.check_recipe first). `probe`: time it on this machine;
    None: when every module runs on a local model."""
    from .data import load_splits
    from .program import build_program, model_of, module_names
    from .schedule import parse_strategy
    from .weights.device import cpu_kind, resolve_device

    program = build_program(recipe)
    names = module_names(recipe, program)
    remote = [m for m in names if not isinstance(recipe.models[model_of(recipe, m)], LocalModel)]
    if probe and remote:
        raise InputError(
            f"--probe: it times local models, and {', '.join(remote)} run(s) on a LiteLLM model; use --no-probe"
        )
    splits = load_splits(recipe.data)
    modules = _module_models(recipe, names)
    keys = parse_strategy(recipe.schedule.strategy, recipe.optimizers)
    local = [spec for spec in recipe.models.values() if isinstance(spec, LocalModel)]
    device = resolve_device(local[0].device if local else "cpu")
    memory = available_memory(device)  # before the probe loads anything
    prompts = Prompts(recipe, program, names, modules, splits.train)
    measured = None
    if probe or (probe is None and not remote):
        walk = demos_by_step(recipe, keys, names, len(splits.train))
        weights = [
            (recipe.optimizers[k], walk[i])
            for i, k in enumerate(keys, 1)
            if isinstance(recipe.optimizers[k], WeightOptimizer)
        ]
        first = weights[0] if weights else None
        measured = run_probe(recipe, splits, prompts, names, max(max(d.values()) for d in walk), first)
    steps = Estimator(recipe, splits, prompts, names, modules, measured, memory).steps(keys)
    machine = {
        "cpu": cpu_kind(),
        "device": device,
        "memory_available_gb": round(memory[0] / GB, 1),
        "memory_source": memory[1],
        "tokens_approximate": prompts.approximate,
    }
    return Plan(recipe.name, recipe.schedule.strategy, machine, modules, steps, asdict(measured) if measured else None)


# ---------------------------------------------------------------- output
def print_plan(plan: Plan, out) -> None:
    """The plan as tables on `out` (a rich console): models, then one row per phase of each step."""
    from rich.console import Console
    from rich.table import Table

    out = out if out.is_terminal else Console(file=out.file, width=max(out.width, 160))  # a log: no wrapping

    models = Table(title=f"{plan.recipe}: modules and their models")
    for col in ("module", "model", "type", "path", "architecture", "parameters"):
        models.add_column(col, justify="right" if col == "parameters" else "left")
    for module, m in plan.modules.items():
        count = f"{m['parameters']:,}" if m.get("parameters") else ""
        models.add_row(module, m["model"], m["type"], m["path"], m.get("architecture") or "", count)
    out.print(models)
    probed = "seconds from a probe on this machine" if plan.probe else "no probe: no seconds"
    table = Table(title=f"plan: {plan.strategy} ({probed}; {plan.machine['cpu']})")
    for col in ("step", "phase", "LM calls", "tokens in", "tokens out (at most)", "seconds"):
        table.add_column(col, justify="left" if col in ("step", "phase") else "right")
    secs = lambda v: "" if v is None else f"{v:,.0f}"  # noqa: E731
    for s in plan.steps:
        for i, (name, phase) in enumerate(s.phases.items()):
            label = {"optimizer": s.method, "train": "LoRA training (tokens trained)", "bootstrap": "bootstrap"}.get(
                name, f"{name} eval"
            )
            table.add_row(
                s.step if i == 0 else "",
                label,
                "" if name == "train" else str(phase.calls),
                f"{phase.tokens_in:,}",
                "" if name == "train" else f"{phase.tokens_out:,}",
                secs(phase.seconds),
            )
    table.add_row("total", "", "", "", "", secs(plan.seconds))
    out.print(table)
    for s in plan.steps:
        for name, t in s.train.items():
            mem = t["memory_gb"]
            what = "LoRA and the soft prompt train" if s.kind == "s" else "LoRA trains"
            out.print(
                f"{s.step} {name}: {what} {t['lora_parameters']:,} of {t['parameters']:,} parameters "
                f"({t['lora_parameters'] / t['parameters']:.2%}); {t['rows']} rows of ~{t['row_tokens']} tokens "
                f"at most, {t['steps']} optimizer steps; memory ({t['device']}, {t['dtype']}; activations of "
                f"{t['micro_batch_tokens']}-token micro-batches): LoRA ~{mem['lora']:.1f} GB, full fine-tuning "
                f"~{mem['full']:.1f} GB, {plan.machine['memory_available_gb']} GB available",
                highlight=False,
            )
    if p := plan.probe:
        (t0, s0), (t1, s1) = p["batched"]
        lora = (
            f"; a LoRA optimizer step {p['step_seconds']:.1f} s on rows of ~{p['row_tokens']:.0f} tokens, then "
            f"evaluation x{p['adapter_factor']:.2f} with the adapter"
            if p["step_seconds"]
            else ""
        )
        out.print(
            f"probe ({p['seconds']:.0f} s): {s0:.2f} s an example batched at ~{t0:.0f} prompt tokens, {s1:.2f} s "
            f"at ~{t1:.0f}, {p['single']:.2f} s alone; pass rate {p['pass_rate']:.2f}{lora}",
            highlight=False,
        )
    out.print(
        "LM calls: a-b (~n) is a range and its estimate, ~n approximate (DSPy's own formula); the test "
        "evaluation scores the best step by dev, and the last too when it is another",
        highlight=False,
    )
    for warning in plan.warnings:
        out.print(f"[yellow]warning[/]: {warning}", highlight=False, soft_wrap=True)
