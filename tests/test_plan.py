"""`jointopt plan`: the counts of a known recipe, its JSON, the memory warning, the probe, bad input.

The fast tier runs `plan --no-probe` in a process of its own, not pytest's (counting LoRA parameters
builds the model on the meta device, which imports transformers), one for the module, which runs
the plans in turn, as `cli(...)` runs commands in the suite's process; on checkpoint folders that
hold a config.json and nothing else: a plan that read weights would fail there.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jointcli.recipe import EMBEDDED_MODEL, Lora, load_recipe

from .conftest import RECIPES, ROOT, cli, tiny

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
# a model no machine here can train: about 10^12 parameters (config only: nothing is allocated)
HUGE = {
    **LLAMA,
    "vocab_size": 32000,
    "hidden_size": 32768,
    "intermediate_size": 131072,
    "num_hidden_layers": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
TOP_KEYS = {"recipe", "strategy", "machine", "modules", "steps", "seconds", "probe", "warnings"}
STEP_KEYS = {"step", "kind", "optimizer", "method", "demos", "phases", "train", "warnings", "seconds"}
PHASE_KEYS = {"calls", "tokens_in", "tokens_out", "seconds"}
CALLS_KEYS = {"low", "high", "expected", "approximate"}


# The module's planning process: it reads [ARGS, STDOUT FILE, STDERR FILE] lines, runs `jointopt ARGS`
# with its file descriptors 1 and 2 on those files, and answers with the exit code on its own stdout.
_PLANNER = r"""
import json, os, sys, traceback
from jointcli.cli import main

answers = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    args, out, err = json.loads(line)
    with open(out, "w") as out, open(err, "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = ["jointopt", *args]
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    answers.write(json.dumps(code) + "\n")
    answers.flush()
"""


@pytest.fixture(scope="module")
def run_plan(tmp_path_factory):
    """`jointopt ARGS` in the module's planning process: a CompletedProcess, as conftest.run_cli's."""
    folder = tmp_path_factory.mktemp("planner")
    proc = subprocess.Popen(
        [sys.executable, "-c", _PLANNER], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    numbers = itertools.count()

    def run(*args: str) -> subprocess.CompletedProcess:
        out, err = (folder / f"{next(numbers)}.{name}" for name in ("out", "err"))
        proc.stdin.write(json.dumps([list(args), str(out), str(err)]) + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        assert answer, f"the planning process ended with {proc.wait()}"
        return subprocess.CompletedProcess(args, json.loads(answer), out.read_text(), err.read_text())

    try:
        yield run
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def config_only(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def llama_lora(config: dict, r: int) -> int:
    """LoRA parameters on every linear layer of a Llama decoder but the LM head (PEFT's all-linear)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # q o, k v, gate up down
    return per_layer * config["num_hidden_layers"]


def llama_parameters(config: dict) -> int:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # attention, MLP, two norms
    return v * h + per_layer * config["num_hidden_layers"] + h  # tied LM head; the final norm


def test_pipeline_counts_and_json_without_weights(tmp_path, run_plan):
    folder = config_only(tmp_path / "ckpt", LLAMA)
    out = run_plan(
        "plan",
        str(RECIPES / "sst2-pipeline.yaml"),
        f"models.large.path={folder}",
        f"models.small.path={folder}",
        "data.split.train=10",
        "data.split.dev=6",
        "data.split.test=4",
        "--no-probe",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert set(plan) == TOP_KEYS and plan["probe"] is None and plan["seconds"] is None
    assert plan["machine"]["tokens_approximate"] is True  # no tokenizer in the folder: characters / 4
    assert {m: (v["model"], v["parameters"]) for m, v in plan["modules"].items()} == {
        "summarize": ("large", llama_parameters(LLAMA)),
        "classify": ("small", llama_parameters(LLAMA)),
    }
    steps = {s["step"]: s for s in plan["steps"]}
    assert list(steps) == ["00-baseline", "01-p", "02-w", "03-p", "test"]
    for s in plan["steps"]:
        assert set(s) == STEP_KEYS and s["seconds"] is None
        for phase in s["phases"].values():
            assert set(phase) == PHASE_KEYS and set(phase["calls"]) == CALLS_KEYS and phase["seconds"] is None
    calls = lambda step, phase: steps[step]["phases"][phase]["calls"]  # noqa: E731
    # evaluations: examples x modules; the test split once, twice when the best step is not the last
    for step in ("00-baseline", "01-p", "02-w", "03-p"):
        assert calls(step, "dev") == {"low": 12, "high": 12, "expected": 12, "approximate": False}
    assert (calls("test", "test")["low"], calls("test", "test")["high"]) == (8, 16)
    # BootstrapFewShot (max_bootstrapped_demos 2, max_rounds 1): 2 passing examples at best, every one at worst
    assert (calls("01-p", "optimizer")["low"], calls("01-p", "optimizer")["high"]) == (2 * 2, 10 * 2)
    assert calls("02-w", "bootstrap")["expected"] == 10 * 2
    assert steps["01-p"]["demos"] == {"summarize": 3, "classify": 3}  # max(3 labeled, 2 bootstrapped)
    train = steps["02-w"]["train"]
    assert list(train) == ["classify"]  # w.modules: [classify]
    assert (train["classify"]["rows"], train["classify"]["steps"]) == (10, math.ceil(10 / 8))
    assert train["classify"]["lora_parameters"] == llama_lora(LLAMA, r=8)
    # 10 rows at the recipe's 1 epoch: 2 optimizer steps, and the plan says it is short
    assert [w.split(": so few")[0] for w in plan["warnings"]] == [
        "02-w: w (classify): 2 optimizer steps on 10 rows, fewer than 12"
    ]


def test_a_model_that_cannot_fit_warns(tmp_path, run_plan):
    folder = config_only(tmp_path / "huge", HUGE)
    out = run_plan(
        "plan",
        str(RECIPES / "sst2.yaml"),
        f"models.small.path={folder}",
        "data.split.train=8",
        "data.split.dev=2",
        "data.split.test=2",
        "--no-probe",
    )
    assert out.returncode == 0, out.stderr
    lines = [
        line for line in out.stderr.splitlines() if line.startswith("warning:") and "optimizer steps on" not in line
    ]
    assert len(lines) == 1 and "02-w: w (classify): LoRA training needs about" in lines[0], out.stderr
    assert "it will not fit" in lines[0]
    assert f"{llama_lora(HUGE, r=8):,}" in out.stderr.replace("\n", "")  # the LoRA line, in the table's wrap


@pytest.mark.parametrize("engine", ["bfloat16", "float32"])
def test_the_memory_estimate_is_its_formula_on_numbers_the_test_knows(tmp_path, run_plan, engine):
    """LoRA: the frozen weights, 16 bytes a trainable parameter, the activations of a micro-batch
    (Korthikanti et al.: layers x (34 h + 5 heads x row tokens) bytes a token in 16-bit, x2 in fp32).
    The whole process: its base, plus the engine's weights unless the trainer shares them (same dtype)."""
    from jointcli.plan.sizes import PROCESS_BASE
    from jointcli.recipe.optimizers import TOKEN_BUDGET

    folder = config_only(tmp_path / "huge", HUGE)
    out = run_plan(
        "plan",
        str(RECIPES / "sst2.yaml"),
        f"models.small.path={folder}",
        f"models.small.dtype={engine}",
        *("data.split.train=8", "data.split.dev=2", "data.split.test=2", "optimizers.w.train.dtype=float32"),
        "--no-probe",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    t = next(s["train"]["classify"] for s in json.loads(out.stdout)["steps"] if s["train"])
    n, h, gb = llama_parameters(HUGE), HUGE["hidden_size"], 2**30
    tokens = min(8 * t["row_tokens"], max(TOKEN_BUDGET["cpu"]["float32"], t["row_tokens"]))  # 8 rows a step
    assert (t["parameters"], t["dtype"], t["micro_batch_tokens"]) == (n, "float32", tokens)
    per_token = HUGE["num_hidden_layers"] * (34 * h + 5 * HUGE["num_attention_heads"] * t["row_tokens"]) * 2
    activations = t["micro_batch_tokens"] * per_token
    lora = 4 * n + 16 * t["lora_parameters"] + activations
    engine_bytes = 0 if engine == "float32" else 2 * n  # shared with the trainer only in its dtype
    assert t["memory_gb"]["activations"] == pytest.approx(activations / gb, abs=0.006)
    assert t["memory_gb"]["lora"] == pytest.approx(lora / gb, abs=0.006)
    assert t["memory_gb"]["process"] == pytest.approx((PROCESS_BASE + lora + engine_bytes) / gb, abs=0.006)


def test_the_plan_shows_the_optimizer_steps_and_where_they_come_from(tmp_path, run_plan):
    """Three weight steps on 60 rows: the default length (2 epochs, at least train.min_steps), one epoch as
    a recipe may set it (shorter than half the floor: a warning) and train.steps. In the planning process,
    as the other plans without weights: the plan reads the folder's config with transformers."""
    folder = config_only(tmp_path / "ckpt", LLAMA)
    out = run_plan(
        "plan",
        str(RECIPES / "sst2.yaml"),
        f"models.small.path={folder}",
        *("data.split.train=60", "data.split.dev=4", "data.split.test=4"),
        "optimizers.w.train={learning_rate: 3.0e-3, batch_size: 8}",
        "optimizers.one={type: weight, train: {epochs: 1}}",
        "optimizers.fixed={type: weight, train: {steps: 30}}",
        "schedule.strategy=w -> one -> fixed",
        "--no-probe",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    trained = {s["optimizer"]: s["train"]["classify"] for s in plan["steps"] if s["train"]}
    epoch = "60 rows / 8 a step = 8 an epoch"
    assert {k: (t["rows"], t["steps"], t["steps_from"]) for k, t in trained.items()} == {
        "w": (60, 48, f"{epoch}; 2 epochs = 16, less than train.min_steps: 48"),
        "one": (60, 8, f"{epoch}; 1 epoch = 8"),
        "fixed": (60, 30, "train.steps: 30 (3.8 epochs of 60 rows / 8 a step)"),
    }
    assert [w.split(": so few")[0] for w in plan["warnings"]] == [
        "02-w: one (classify): 8 optimizer steps on 60 rows, fewer than 12"
    ]
    assert "try optimizers.one.train.steps=48" in plan["warnings"][0]


def test_a_knn_program_counts_the_bootstrap_behind_each_call(tmp_path, run_plan):
    """KNNFewShot compiles nothing up front; each call of its program bootstraps demos from its k nearest
    training examples (BootstrapFewShot, up to 4 passing, max_rounds 1), then answers: k + 1 calls for
    k <= 4, as DSPy's knn_fewshot.py runs it, in every step that carries the lookup; a later p drops it."""
    folder = config_only(tmp_path / "ckpt", LLAMA)
    out = run_plan(
        "plan",
        str(RECIPES / "sst2.yaml"),
        f"models.small.path={folder}",
        *("data.split.train=12", "data.split.dev=6", "data.split.test=4"),
        "optimizers.p.optimizer=KNNFewShot",
        "optimizers.p.args={k: 3}",
        "optimizers.q={type: prompt, optimizer: LabeledFewShot, args: {k: 2}}",
        "schedule.strategy=p -> w -> q",
        "--no-probe",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    steps = {s["step"]: s["phases"] for s in json.loads(out.stdout)["steps"]}
    expected = lambda phase: phase["calls"]["expected"]  # noqa: E731
    assert {step: {k: expected(p) for k, p in phases.items()} for step, phases in steps.items()} == {
        "00-baseline": {"dev": 6},
        "01-p": {"optimizer": 0, "dev": 6 * 4},
        "02-w": {"bootstrap": 12 * 4, "train": 0, "dev": 6 * 4},  # the traces come from the KNN program
        "03-p": {"optimizer": 0, "dev": 6},
        "test": {"test": 4},
    }
    per_call = steps["01-p"]["dev"]["tokens_in"] / 24  # the k demos of each call's prompt
    assert per_call > steps["00-baseline"]["dev"]["tokens_in"] / 6


def test_miprov2_calls_are_dspys_own_estimate():
    """MIPROv2 auto=light on 120 training examples, against the preview DSPy prints before it runs."""
    import re

    import dspy
    from dspy.teleprompt import MIPROv2
    from dspy.teleprompt.mipro_optimizer_v2 import AUTO_RUN_SETTINGS

    from jointcli.plan import optimizer_calls
    from jointcli.recipe import PromptOptimizer

    calls = optimizer_calls(PromptOptimizer(type="prompt", optimizer="MIPROv2", args={"auto": "light"}), 120, 1, None)
    program, n = dspy.Predict("sentence -> sentiment"), AUTO_RUN_SETTINGS["light"]["n"]
    trials = MIPROv2._set_num_trials_from_num_candidates(None, program, False, n)
    lines = MIPROv2._estimate_lm_calls(None, program, trials, True, 35, 5, [None] * 96, True, n // 2)  # val: 80%
    number = lambda line: int(re.findall(r"= (\d+)", re.sub(r"\x1b\[[0-9;]*m", "", line))[-1])  # noqa: E731
    dspy_calls = sum(number(line) for line in lines)
    # plus n + 1 BootstrapFewShot runs on the other 24 examples: 4 demos pass at best, all 24 run at worst
    assert (calls.low, calls.high, calls.approximate) == (dspy_calls + (n + 1) * 4, dspy_calls + (n + 1) * 24, True)


def test_a_config_transformers_cannot_build_exits_2(tmp_path, run_plan):
    folder = config_only(tmp_path / "odd", {**LLAMA, "model_type": "no-such-model", "architectures": ["NoSuchModel"]})
    out = run_plan("plan", str(RECIPES / "sst2.yaml"), f"models.small.path={folder}", "--no-probe")
    assert out.returncode == 2, out.stderr
    assert (
        out.stderr.startswith(f"error: model {folder}: transformers cannot build a causal LM")
        and out.stderr.count("\n") == 1
    ), out.stderr


LITELLM = "models.big={type: litellm, model: openai/gpt-4o-mini}"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["nothing.yaml"], "nothing.yaml: no such recipe file"),
        (["{sst2}", "schedule.strategy=p -> x"], "schedule.strategy: unknown step 'x'"),
        (["{sst2}", "data.split.train=-1"], "data.split.train: Input should be greater than or equal to 0"),
        (["{sst2}", "optimizers.p.args.max_rounds=two"], "optimizers.p.args.max_rounds: BootstrapFewShot expects"),
        (
            ["{sst2}", LITELLM, "program.modules.classify.model=big", "schedule.strategy=p", "--probe"],
            "--probe: it times local models, and classify run(s) on a LiteLLM model",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, expected, capsys):
    before = "transformers" in sys.modules
    code = cli("plan", *(a.replace("{sst2}", str(RECIPES / "sst2.yaml")) for a in argv))
    err = capsys.readouterr().err
    assert (code, expected in err) == (2, True), err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert before or "transformers" not in sys.modules, "a bad input loaded a model"


# ---------------------------------------------------------------- on the real model
@pytest.mark.model
def test_lora_parameters_are_what_peft_trains_on_the_real_model():
    from jointcli.plan import lora_parameters, model_facts
    from jointcli.training.lora import load_for_training
    from jointcli.weights.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(EMBEDDED_MODEL)
    for lora in (Lora(r=8, alpha=16), Lora(r=4, alpha=8, target_modules=["q_proj", "v_proj"])):
        model = load_for_training(checkpoint, lora, "cpu", "float32", seed=0)  # what a weight step trains
        trainable, total = model.get_nb_trainable_parameters()
        assert lora_parameters(checkpoint, lora) == trainable
    assert model_facts(checkpoint)["parameters"] == total - trainable == 134_515_008


@pytest.mark.model
def test_the_probe_times_every_step_of_a_tiny_recipe():
    from jointcli.plan import build_plan

    recipe = load_recipe(
        RECIPES / "sst2.yaml",
        tiny(6, 4, 4, "runtime.num_threads=1", "models.small.max_tokens=8", "optimizers.w.train.batch_size=2"),
    )
    plan = build_plan(recipe, probe=True)  # 1 thread, 2 examples a timed run (its least), a LoRA step of 2 rows
    probe = plan.probe
    assert probe["step_seconds"] > 0 and probe["row_tokens"] > 0 and probe["adapter_factor"] > 0
    assert 0 <= probe["pass_rate"] <= 1 and len(probe["batched"]) == 2
    assert [s.step for s in plan.steps] == ["00-baseline", "01-p", "02-w", "03-p", "test"]
    assert all(s.seconds > 0 for s in plan.steps)
    assert plan.seconds == pytest.approx(sum(s.seconds for s in plan.steps))
    assert plan.steps[2].train["classify"]["steps"] == 3  # 6 rows, 2 a step


def test_the_floor_on_steps_arithmetic():
    """train.steps, or epochs x the steps of an epoch, or (neither set) 2 epochs and at least min_steps."""
    from jointcli.recipe import Train
    from jointcli.training.microbatch import plan_steps

    rows, floor = 60, Train().min_steps
    assert Train().optimizer_steps(rows) == max(floor, 2 * math.ceil(rows / 8)) == 48
    assert Train().optimizer_steps(400) == 2 * 50  # 2 epochs are more than the floor: the floor adds nothing
    assert Train(epochs=1).optimizer_steps(rows) == 8 and Train(epochs=1.5, batch_size=4).optimizer_steps(rows) == 23
    assert Train(steps=5).optimizer_steps(rows) == 5 and Train(min_steps=1).optimizer_steps(rows) == 16
    assert Train(batch_size=4, grad_accum=2, min_steps=24).optimizer_steps(rows) == 24  # 8 rows a step either way
    planned = plan_steps(rows, 8, 0, seed=0, steps=24)
    assert len(planned) == 24 and sorted(i for step in planned[:8] for i in step) == list(range(rows))
    assert plan_steps(rows, 8, 1.0, seed=0) == plan_steps(rows, 8, 0, seed=0, steps=8)  # epochs as they were


def test_validate_refuses_epochs_and_steps_together(capsys):
    code = cli("validate", RECIPES / "sst2.yaml", "optimizers.w.train.steps=24")  # the recipe sets epochs: 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert "optimizers.w.train: give epochs (1) or steps (24), not both" in lines[0]
