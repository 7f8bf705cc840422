"""A corpus of bad input. Each case is one command line that must exit with code 2 and print one line
on stderr, the error (no traceback), before any model loads: these run in the fast tier, which fails
if anything imports transformers. Files a case needs are written into its tmp_path, its working
directory; `{tmp}`, `{sst2}` and `{pipeline}` in arguments are that folder and the shipped recipes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jointcli.files import write_json, write_jsonl
from jointcli.recipe import load_recipe
from jointcli.rundir import RunDir

from .conftest import RECIPES, cli

SST2 = "{sst2}"
RUNS = ["--runs-dir", "{tmp}/runs"]

# a recipe over a data file `d.jsonl` (fields text, label), for the data cases
FILE_RECIPE = """\
name: files
data: {source: d.jsonl, inputs: [text], labels: [label], split: {train: 2, dev: 1, test: 1}}
program:
  modules: [{name: classify, signature: "text -> label", model: small}]
models: {small: {type: local}}
optimizers: {p: {type: prompt, optimizer: LabeledFewShot, args: {k: 2}}}
schedule: {strategy: p}
"""
ROWS = "".join(f'{{"text": "sentence {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(5))
CSV_ROWS = "text,label\n" + "".join(f"sentence {i},{'ab'[i % 2]}\n" for i in range(5))

# a user's program classes, one module each (a module is imported once per process: one name each)
PROGRAMS = {
    "prog_plain.py": "class Plain:\n    pass\n",
    "prog_boom.py": (
        "import dspy\nclass Boom(dspy.Module):\n    def __init__(self):\n        raise RuntimeError('boom')\n"
    ),
    "prog_empty.py": "import dspy\nclass Empty(dspy.Module):\n    def forward(self, sentence):\n        return None\n",
    "prog_args.py": (
        "import dspy\nclass WrongArgs(dspy.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.judge = dspy.Predict('text -> sentiment')\n"
        "    def forward(self, text):\n        return self.judge(text=text)\n"
    ),
    "prog_ok.py": (
        "import dspy\nclass Judge(dspy.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.judge = dspy.Predict('sentence -> sentiment')\n"
        "    def forward(self, sentence):\n        return self.judge(sentence=sentence)\n"
    ),
}
LITELLM = "models.big={type: litellm, model: openai/gpt-4o-mini}"


def finished_runs(tmp: Path) -> None:
    """Two finished zero-shot runs `a` and `b` under {tmp}/runs, as compare reads them."""
    recipe = load_recipe(RECIPES / "sst2.yaml", ["schedule.strategy=none"])
    for name, scores in (("a", [1.0] * 8), ("b", [1.0, 0.0] * 4)):
        run = RunDir.open(tmp / "runs", name, recipe)
        run.set_manifest_field("data_fingerprint", "one-split")
        step = run.begin("baseline")
        rows = [
            {"index": i, "score": s, "tokens_in": 10, "tokens_out": 2, "seconds": 0.1} for i, s in enumerate(scores)
        ]
        for split, suffix in (("dev", ""), ("test", "-test")):
            write_jsonl(run.step_dir(step) / f"predictions{suffix}.jsonl", rows)
            write_json(run.step_dir(step) / f"eval{suffix}.json", {"split": split, "score": sum(scores) / 8})
            step.scores[split] = sum(scores) / 8
        run.finish(step, 1.0)
        run.set_manifest_field("best", step.folder)
        run.unlock()


def run_of_seed_0(tmp: Path) -> None:
    """{tmp}/runs/old: a run made by recipes/sst2.yaml as shipped (seed 0)."""
    RunDir.open(tmp / "runs", "old", load_recipe(RECIPES / "sst2.yaml")).unlock()


def source_run(tmp: Path, *overrides: str, adapter: bool = False) -> None:
    """{tmp}/runs/src: a run of recipes/sst2.yaml + `overrides` whose one p step saved the recipe's
    program (and, with `adapter`, names an adapter of `classify`), for --init-from."""
    from jointcli.program import build_program
    from jointcli.state import ModuleState, ProgramState, save_state

    recipe = load_recipe(RECIPES / "sst2.yaml", list(overrides))
    run = RunDir.open(tmp / "runs", "src", recipe)
    step = run.begin("p")
    program = build_program(recipe)
    state = ProgramState.initial(recipe, program)
    if adapter:
        state.modules["classify"] = ModuleState("small", "00-p/adapters/classify")
    save_state(run, run.step_dir(step), program, state)
    run.finish(step, 1.0)
    run.set_manifest_field("best", step.folder)
    run.unlock()


CHECKPOINT = '{"model_type": "llama"}'
OTHER_SIGNATURE = [
    "data.inputs=[text]",
    "data.labels=[label]",
    "metric.field=label",
    'program.modules=[{name: classify, signature: "text -> label", model: small}]',
]


def case(name: str, expected: str, *argv: str, files: dict | None = None, setup=None):
    return pytest.param(list(argv), files or {}, setup, expected, id=name)


CASES = [
    # ------------------------------------------------ the recipe file
    case("recipe-missing", "error: {tmp}/nope.yaml: no such recipe file", "validate", "{tmp}/nope.yaml"),
    case("recipe-is-a-folder", "error: {tmp}: a folder, not a recipe file", "validate", "{tmp}"),
    case(
        "yaml-unclosed-bracket",
        "error: {tmp}/r.yaml: line 4 malformed YAML: expected ',' or ']', but got '<stream end>'",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": "name: x\ndata: [a,\nseed: 1\n"},
    ),
    case(
        "yaml-tab-indent",
        "error: {tmp}/r.yaml: line 2 malformed YAML: found character '\\t' that cannot start",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": "name: x\n\tseed: 1\n"},
    ),
    case(
        "yaml-a-list",
        "error: {tmp}/r.yaml: the recipe must be a YAML mapping of keys to values",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": "- name\n- seed\n"},
    ),
    case(
        "yaml-empty",
        "error: {tmp}/r.yaml: the recipe must be a YAML mapping of keys to values",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": ""},
    ),
    case(
        "yaml-duplicate-key",
        "error: {tmp}/r.yaml: line 3 malformed YAML: duplicate key 'seed'",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": "name: x\nseed: 1\nseed: 2\n"},
    ),
    case(
        "yaml-python-tag",
        "malformed YAML: could not determine a constructor for the tag",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": "name: !!python/object/apply:os.system [ls]\n"},
    ),
    case(
        "recipe-not-utf8",
        "error: {tmp}/r.yaml: not UTF-8 text (invalid start byte at byte 8)",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": b"name: x\n\xff\xfe\n"},
    ),
    # ------------------------------------------------ wrong types and values
    case(
        "type-int",
        "error: {sst2}: data.split.train: Input should be a valid integer, unable to parse string as an "
        "integer (override data.split.train=many)",
        "validate",
        SST2,
        "data.split.train=many",
    ),
    case(
        "type-fraction",
        "seed: Input should be a valid integer, got a number with a fractional part",
        "validate",
        SST2,
        "seed=1.5",
    ),
    case("type-bool", "runtime.cache: Input should be a valid boolean", "validate", SST2, "runtime.cache=maybe"),
    case(
        "type-list",
        "data.inputs: Input should be a valid list (override data.inputs=sentence)",
        "validate",
        SST2,
        "data.inputs=sentence",
    ),
    case(
        "type-union",
        "optimizers.p.modules: Input should be a valid list or 'all' (override optimizers.p.modules=5)",
        "validate",
        SST2,
        "optimizers.p.modules=5",
    ),
    case("negative-seed", "seed: Input should be greater than or equal to 0", "validate", SST2, "seed=-1"),
    case(
        "negative-temperature",
        "models.small.temperature: Input should be greater than or equal to 0",
        "validate",
        SST2,
        "models.small.temperature=-1",
    ),
    case(
        "dropout-1",
        "optimizers.w.lora.dropout: Input should be less than 1",
        "validate",
        SST2,
        "optimizers.w.lora.dropout=1.5",
    ),
    # a run's name, in the recipe or as --name: one folder under the runs root (recipe.schema.run_name_problem)
    case("name-with-space", "error: {sst2}: name: 'my run' has ' '; a run name is", "validate", SST2, "name=my run"),
    case(
        "name-a-path",
        "error: {sst2}: name: '../../escaped' has '/'; a run name is letters, digits, '_', '-' and '.', at most "
        "100 characters, not starting with '.' and without '..' (override name=../../escaped)",
        "validate",
        SST2,
        "name=../../escaped",
    ),
    case("name-dot-dot", "error: {sst2}: name: 'a..b' has '..'", "validate", SST2, "name=a..b"),
    case("name-hidden", "error: {sst2}: name: '.runs' starts with '.'", "validate", SST2, "name=.runs"),
    case("name-too-long", f"name: '{'n' * 101}' is 101 characters long", "validate", SST2, f"name={'n' * 101}"),
    case("flag-name-a-path", "error: --name: '../../escaped' has '/'", "eval", SST2, *RUNS, "--name", "../../escaped"),
    case("flag-name-absolute", "error: --name: '/tmp/x' has '/'", "joint", SST2, *RUNS, "--name", "/tmp/x"),
    case("flag-name-backslash", "error: --name: 'a\\\\b' has '\\\\'", "eval", SST2, *RUNS, "--name", "a\\b"),
    case("flag-name-dot-dot", "error: --name: '..' has '..'", "sweep", SST2, *RUNS, "--name", ".."),
    case("flag-name-hidden", "error: --name: '.x' starts with '.'", "optimize-prompts", SST2, *RUNS, "--name", ".x"),
    case("flag-name-empty", "error: --name: '' is empty", "finetune", SST2, *RUNS, "--name", ""),
    case("flag-name-too-long", "is 101 characters long", "bootstrap", SST2, *RUNS, "--name", "n" * 101),
    case(
        "model-type",
        "models.small.type: 'vllm' is not one of 'local', 'litellm'",
        "validate",
        SST2,
        "models.small.type=vllm",
    ),
    case(
        "optimizer-type",
        "optimizers.p.type: 'prompts' is not one of 'prompt', 'weight', 'simultaneous', 'reinforce'; did you mean 'prompt'?",
        "validate",
        SST2,
        "optimizers.p.type=prompts",
    ),
    case(
        "optimizer-without-type", "optimizers.w.type: Field required", "validate", SST2, "optimizers.w={lora: {r: 4}}"
    ),
    case(
        "signature-form",
        "program.modules.0.signature: signature 'sentence' must look like",
        "validate",
        SST2,
        "program.modules.classify.signature=sentence",
    ),
    case(
        "signature-unknown-type",
        "error: program.modules.classify.signature: DSPy cannot use 'sentence: foo -> sentiment': Unknown name: foo",
        "validate",
        SST2,
        "program.modules.classify.signature=sentence: foo -> sentiment",
    ),
    case(
        "text-adapter-two-outputs",
        "error: program.modules.summarize.adapter: text needs exactly one output field, "
        "the whole answer; summarize has 2 (opinion, mood)",
        "validate",
        "{pipeline}",
        "program.modules.summarize.signature=sentence -> opinion, mood",
    ),
    case(
        "text-adapter-chain-of-thought",
        "error: program.modules.summarize.adapter: text works for a `predict` "
        "module; a chain_of_thought module answers its reasoning first",
        "validate",
        "{pipeline}",
        "program.modules.summarize.type=chain_of_thought",
    ),
    case(
        "not-a-number",
        "optimizers.w.traces.threshold: Input should be a finite number",
        "validate",
        SST2,
        "optimizers.w.traces.threshold=nan",
    ),
    case(
        "input-twice",
        "data.inputs: names a field twice: ['sentence', 'sentence']",
        "validate",
        SST2,
        "data.inputs=[sentence, sentence]",
    ),
    case(
        "label-is-an-input",
        "data: ['sentence'] are both inputs and labels: the program would be given the answer",
        "validate",
        SST2,
        "data.labels=[sentence]",
    ),
    case(
        "lora-no-target-modules",
        "optimizers.w.lora.target_modules: must name at least one module, or be all-linear",
        "validate",
        SST2,
        "optimizers.w.lora.target_modules=[]",
    ),
    # ------------------------------------------------ unknown keys, with a suggestion when one is close
    case(
        "key-top",
        "error: {sst2}: schedul: unknown key; did you mean 'schedule'? (override schedul.strategy=p)",
        "validate",
        SST2,
        "schedul.strategy=p",
    ),
    case(
        "key-optimizer",
        "optimizers.p.argz: unknown key; did you mean 'args'?",
        "validate",
        SST2,
        "optimizers.p.argz={}",
    ),
    case("key-model", "models.small.pth: unknown key; did you mean 'path'?", "validate", SST2, "models.small.pth=x"),
    case(
        "key-module",
        "program.modules.0.instruction: unknown key; did you mean 'instructions'?",
        "validate",
        SST2,
        "program.modules.classify.instruction=Be brief.",
    ),
    case(
        "key-traces",
        "optimizers.w.traces.sorce: unknown key; did you mean 'source'?",
        "validate",
        SST2,
        "optimizers.w.traces.sorce=labels",
    ),
    case(
        "key-far-from-any",
        "error: {sst2}: data.nosuch: unknown key (override data.nosuch.key=1)",
        "validate",
        SST2,
        "data.nosuch.key=1",
    ),
    # ------------------------------------------------ overrides
    case(
        "override-index-out-of-range",
        "error: {sst2}: override program.modules.5.name=x: no list item '5'; its items "
        "are 0 to 0, or by name: classify",
        "validate",
        SST2,
        "program.modules.5.name=x",
    ),
    case(
        "override-no-such-name",
        "override program.modules.other.model=small: no list item 'other'",
        "validate",
        SST2,
        "program.modules.other.model=small",
    ),
    case(
        "override-into-a-value",
        "override name.first=x: name is a value, not a section",
        "validate",
        SST2,
        "name.first=x",
    ),
    case(
        "override-without-value",
        "error: {sst2}: override 'novalue': expected key.path=value",
        "validate",
        SST2,
        "novalue",
    ),
    case("override-empty-key", "override 'a..b=1': expected key.path=value", "validate", SST2, "a..b=1"),
    # ------------------------------------------------ names that must exist
    case(
        "unknown-model-ref",
        "program.modules.classify.model: unknown model 'smal'; models are small; did you mean 'small'?",
        "validate",
        SST2,
        "program.modules.classify.model=smal",
    ),
    case(
        "unknown-teacher",
        "optimizers.w.traces.teacher: unknown model 'big'; models are small",
        "validate",
        SST2,
        "optimizers.w.traces.teacher=big",
    ),
    case(
        "unknown-prompt-optimizer",
        "error: optimizers.p.optimizer: unknown prompt optimizer 'MiproV2'; available: "
        "LabeledFewShot, BootstrapFewShot, BootstrapFewShotWithRandomSearch, BootstrapFewShotWithOptuna, MIPROv2, "
        "COPRO, SIMBA, InferRules, KNNFewShot, GEPA; "
        "did you mean 'MIPROv2'?",
        "validate",
        SST2,
        "optimizers.p.optimizer=MiproV2",
    ),
    case(
        "unknown-builtin-data",
        "error: data.source: unknown built-in data set 'builtin:mnist'",
        "validate",
        SST2,
        "data.source=builtin:mnist",
    ),
    case(
        "unknown-metric",
        "error: metric.name: unknown metric 'accuracy'; use one of exact_match",
        "validate",
        SST2,
        "metric.name=accuracy",
    ),
    case(
        "metric-not-importable",
        "error: metric.name: cannot import 'nosuchmod:score'",
        "validate",
        SST2,
        "metric.name=nosuchmod:score",
    ),
    case(
        "metric-wrong-arguments",
        "error: metric.name: os:getcwd must take (example, prediction, trace=None)",
        "validate",
        SST2,
        "metric.name=os:getcwd",
    ),
    case(
        "unknown-builtin-model",
        "error: models.small.path: unknown built-in model 'builtin:smollm3'",
        "validate",
        SST2,
        "models.small.path=builtin:smollm3",
    ),
    case(
        "model-folder-missing",
        "error: models.small.path: model path '{tmp}/none': no such folder",
        "validate",
        SST2,
        "models.small.path={tmp}/none",
    ),
    case(
        "model-folder-not-a-checkpoint",
        "error: models.small.path: model path '{tmp}/ckpt': not a Hugging Face checkpoint (no config.json in it)",
        "validate",
        SST2,
        "models.small.path={tmp}/ckpt",
        files={"ckpt/weights.txt": "not a model"},
    ),
    case(
        "model-name-with-at",
        "error: models.a@b: model name 'a@b': '@' is reserved",
        "validate",
        SST2,
        "models.a@b={type: local}",
    ),
    # ------------------------------------------------ optimizer arguments: names and types
    case(
        "arg-name",
        "error: optimizers.p.args: BootstrapFewShot does not accept ['max_labled_demos']; it accepts: "
        "max_bootstrapped_demos, max_errors, max_labeled_demos, max_rounds, metric_threshold, teacher_settings; "
        "did you mean 'max_labeled_demos'?",
        "validate",
        SST2,
        "optimizers.p.args={max_labled_demos: 2}",
    ),
    # types DSPy declares only in a docstring, a string annotation, or on another optimizer's same argument
    case(
        "arg-type-from-docstring",
        "error: optimizers.p.args.max_errors: BootstrapFewShot expects an integer or null, got 'many'",
        "validate",
        SST2,
        "optimizers.p.args={max_errors: many}",
    ),
    case(
        "arg-type-from-docstring-optional",
        "error: optimizers.p.args.metric_threshold: BootstrapFewShot expects a number or null, got 'high'",
        "validate",
        SST2,
        "optimizers.p.args={metric_threshold: high}",
    ),
    case(
        "arg-type-from-a-string-annotation",
        "error: optimizers.p.args.teacher_settings: SIMBA expects a mapping or null, got 'gpt'",
        "validate",
        SST2,
        "optimizers.p.optimizer=SIMBA",
        "optimizers.p.args={teacher_settings: gpt}",
    ),
    case(
        "arg-type-from-the-same-argument-elsewhere",
        "error: optimizers.p.args.max_errors: BootstrapFewShotWithRandomSearch expects an integer or null, got 'many'",
        "validate",
        SST2,
        "optimizers.p.optimizer=BootstrapFewShotWithRandomSearch",
        "optimizers.p.args={max_errors: many}",
    ),
    case(
        "compile-arg-type-from-the-same-argument-elsewhere",
        "error: optimizers.p.compile_args.valset: InferRules expects a list or null, got 'dev'",
        "validate",
        SST2,
        "optimizers.p.optimizer=InferRules",
        "optimizers.p.compile_args={valset: dev}",
    ),
    case(
        "max-error-rate-above-1",
        "runtime.max_error_rate: Input should be less than or equal to 1",
        "validate",
        SST2,
        "runtime.max_error_rate=1.5",
    ),
    case(
        "arg-supplied-by-jointopt",
        "error: optimizers.p.args: BootstrapFewShot does not accept ['metric']",
        "validate",
        SST2,
        "optimizers.p.args={metric: 1}",
    ),
    case(
        "ensemble-is-no-step",
        "error: optimizers.p.optimizer: Ensemble combines several programs into one (compile(programs));",
        "validate",
        SST2,
        "optimizers.p.optimizer=Ensemble",
    ),
    case(
        "knn-modules-all",
        "error: optimizers.p.modules: KNNFewShot sets the demos of every module on each call; use all",
        "validate",
        SST2,
        "optimizers.p.optimizer=KNNFewShot",
        "optimizers.p.args={k: 2}",
        "optimizers.p.modules=[classify]",
    ),
    case(
        "knn-needs-k",
        "error: optimizers.p.args: KNNFewShot needs k",
        "validate",
        SST2,
        "optimizers.p.optimizer=KNNFewShot",
        "optimizers.p.args={}",
    ),
    case(
        "required-compile-arg",
        "error: optimizers.p.compile_args: BootstrapFewShotWithOptuna needs max_demos",
        "validate",
        SST2,
        "optimizers.p.optimizer=BootstrapFewShotWithOptuna",
        "optimizers.p.args={}",
    ),
    case(
        "model-as-an-arg",
        "error: optimizers.p.args.prompt_model: jointopt supplies it; name a model in optimizers.p.prompt_model",
        "validate",
        SST2,
        "optimizers.p.optimizer=MIPROv2",
        "optimizers.p.args={prompt_model: big}",
    ),
    case(
        "prompt-model-unknown",
        "optimizers.p.prompt_model: unknown model 'big'; models are small",
        "validate",
        SST2,
        "optimizers.p.optimizer=MIPROv2",
        "optimizers.p.args={auto: light}",
        "optimizers.p.prompt_model=big",
    ),
    case(
        "arg-type-str-for-int",
        "error: optimizers.p.args.max_labeled_demos: BootstrapFewShot expects an integer, got 'many'",
        "validate",
        SST2,
        "optimizers.p.args={max_labeled_demos: many}",
    ),
    case(
        "arg-type-bool-for-int",
        "optimizers.p.args.max_labeled_demos: BootstrapFewShot expects an integer, got True",
        "validate",
        SST2,
        "optimizers.p.args={max_labeled_demos: true}",
    ),
    case(
        "arg-literal",
        "error: optimizers.p.args.auto: MIPROv2 expects 'light' or 'medium' or 'heavy' or null, got 'fast'",
        "validate",
        SST2,
        "optimizers.p.optimizer=MIPROv2",
        "optimizers.p.args={auto: fast}",
    ),
    case(
        "compile-arg-type",
        "error: optimizers.p.compile_args.minibatch: MIPROv2 expects true or false, got 'yes'",
        "validate",
        SST2,
        "optimizers.p.optimizer=MIPROv2",
        "optimizers.p.args={}",
        "optimizers.p.compile_args={minibatch: 'yes'}",
    ),
    case(
        "gepa-without-reflection",
        "error: optimizers.p.reflection_model: GEPA needs a reflection model",
        "validate",
        SST2,
        "optimizers.p.optimizer=GEPA",
        "optimizers.p.args={auto: light}",
    ),
    case(
        "gepa-without-budget",
        "error: optimizers.p.args: GEPA needs exactly one of auto, max_full_evals, max_metric_calls",
        "validate",
        SST2,
        "optimizers.p.optimizer=GEPA",
        "optimizers.p.args={}",
        "optimizers.p.reflection_model=small",
    ),
    case(
        "optimizer-named-none",
        "optimizers.none: the name means zero-shot in a strategy",
        "validate",
        SST2,
        "optimizers.none={type: prompt}",
    ),
    case(
        "optimizer-no-modules",
        "error: optimizers.p.modules: empty; name modules, or write all",
        "validate",
        SST2,
        "optimizers.p.modules=[]",
    ),
    case(
        "optimizer-unknown-module",
        "error: optimizers.w.modules: unknown modules ['clasify']; the program has classify; did you mean 'classify'?",
        "validate",
        SST2,
        "optimizers.w.modules=[clasify]",
    ),
    # ------------------------------------------------ strategies and what their steps need
    case(
        "strategy-empty",
        "error: schedule.strategy: empty; write steps like 'p -> w -> p', or 'none' for zero-shot",
        "validate",
        SST2,
        "schedule.strategy=",
    ),
    case("strategy-blank", "error: schedule.strategy: empty", "validate", SST2, "schedule.strategy='  '"),
    case(
        "strategy-empty-step",
        "error: schedule.strategy: 'p -> -> w' has an empty step",
        "validate",
        SST2,
        "schedule.strategy=p -> -> w",
    ),
    case(
        "strategy-trailing-arrow",
        "schedule.strategy: 'p ->' has an empty step",
        "validate",
        SST2,
        "schedule.strategy=p ->",
    ),
    case(
        "strategy-unknown-step",
        "error: schedule.strategy: unknown step 'P' in 'P -> w'; steps are the keys of "
        "optimizers: p, w, s, g; did you mean 'p'?",
        "validate",
        SST2,
        "schedule.strategy=P -> w",
    ),
    case("strategy-in-joint", "unknown step 'q'", "joint", SST2, "schedule.strategy=p -> q", *RUNS),
    case(
        "steps-without-train",
        "error: data.split.train: 0 examples; the prompt step 'p' needs training examples",
        "validate",
        SST2,
        "data.split.train=0",
    ),
    case(
        "weight-step-on-litellm-only",
        "error: optimizers.w: no module runs on a local model; nothing to fine-tune",
        "validate",
        SST2,
        LITELLM,
        "program.modules.classify.model=big",
    ),
    case(
        "weight-modules-on-litellm",
        "error: optimizers.w.modules: ['summarize'] run on LiteLLM models",
        "validate",
        "{pipeline}",
        LITELLM,
        "program.modules.summarize.model=big",
        "optimizers.w.modules=[summarize]",
    ),
    case(
        "teacher-source-without-teacher",
        "error: optimizers.w.traces.teacher: source=teacher needs a model name",
        "validate",
        SST2,
        "optimizers.w.traces.source=teacher",
    ),
    case(
        "labels-source-on-a-pipeline",
        "optimizers.w.traces.source: labels works for a program of one `predict` module",
        "validate",
        "{pipeline}",
        "optimizers.w.traces.source=labels",
    ),
    case(
        "finetune-without-train",
        "error: data.split.train: 0 examples; the weight step 'w' needs training examples",
        "finetune",
        SST2,
        "data.split.train=0",
        "schedule.strategy=none",
        *RUNS,
    ),
    # ------------------------------------------------ data files
    case(
        "data-field-missing",
        "error: d.jsonl: field 'label' missing (fields are: text, answer)",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": FILE_RECIPE, "d.jsonl": '{"text": "a", "answer": "b"}\n' * 5},
    ),
    case(
        "data-field-missing-later",
        "error: d.jsonl: row 3 has no field 'label' (its fields are: text)",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": FILE_RECIPE, "d.jsonl": ROWS.replace('"sentence 2", "label": "a"', '"x"')},
    ),
    case(
        "data-null-label",
        "error: d.jsonl: row 2: field 'label' is empty",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": FILE_RECIPE, "d.jsonl": ROWS.replace('"label": "b"', '"label": null', 1)},
    ),
    case(
        "data-empty-file",
        "error: d.jsonl: no rows",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": FILE_RECIPE, "d.jsonl": ""},
    ),
    case(
        "data-csv-header-only",
        "error: d.csv: no rows",
        "validate",
        "{tmp}/r.yaml",
        "data.source=d.csv",
        files={"r.yaml": FILE_RECIPE, "d.csv": "text,label\n"},
    ),
    case(
        "data-duplicate-example",
        "error: d.jsonl: rows 1 and 6 are the same example (it could land in both train and test); remove one",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": FILE_RECIPE, "d.jsonl": ROWS + ROWS.splitlines(keepends=True)[0]},
    ),
    case(
        "data-contradicting-labels",
        "error: d.csv: rows 2 and 6 have the same inputs but different labels; keep one",
        "validate",
        "{tmp}/r.yaml",
        "data.source=d.csv",
        files={"r.yaml": FILE_RECIPE, "d.csv": CSV_ROWS + "sentence 1,a\n"},
    ),
    case(
        "data-not-utf8-jsonl",
        "error: d.jsonl: not UTF-8 text (invalid continuation byte at byte 198)",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": FILE_RECIPE, "d.jsonl": ROWS.encode() + b'{"text": "caf\xe9"}\n'},
    ),
    case(
        "data-not-utf8-csv",
        "error: d.csv: not UTF-8 text (invalid continuation byte",
        "validate",
        "{tmp}/r.yaml",
        "data.source=d.csv",
        files={"r.yaml": FILE_RECIPE, "d.csv": CSV_ROWS.encode() + b"caf\xe9 au lait,a\n"},
    ),
    case(
        "data-split-too-large",
        "error: d.jsonl: split train=2 + dev=1 + test=3 = 6 examples, but only 5 rows are available",
        "validate",
        "{tmp}/r.yaml",
        "data.split.test=3",
        files={"r.yaml": FILE_RECIPE, "d.jsonl": ROWS},
    ),
    case(
        "data-split-too-large-builtin",
        "builtin:sst2: split train=120 + dev=100 + test=5000 = 5220 examples, but only 872 rows",
        "eval",
        SST2,
        "data.split.test=5000",
        *RUNS,
    ),
    case(
        "data-malformed-json",
        "error: d.jsonl: line 6: malformed JSON",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": FILE_RECIPE, "d.jsonl": ROWS + '{"text": "x",\n'},
    ),
    case(
        "data-csv-ragged",
        "error: d.csv: line 7: 3 values, the header has 2",
        "validate",
        "{tmp}/r.yaml",
        "data.source=d.csv",
        files={"r.yaml": FILE_RECIPE, "d.csv": CSV_ROWS + "a,b,c\n"},
    ),
    case(
        "data-csv-header-twice",
        "error: {tmp}/d.csv: line 1: the header names 'text' more than once",
        "validate",
        "{tmp}/r.yaml",
        "data.source={tmp}/d.csv",
        files={"r.yaml": FILE_RECIPE, "d.csv": "text,text\na,b\n"},
    ),
    case(
        "data-file-missing",
        "error: d.jsonl: no such data file",
        "validate",
        "{tmp}/r.yaml",
        files={"r.yaml": FILE_RECIPE},
    ),
    case(
        "data-file-suffix",
        "data.source: data file 'd.txt' must end in .jsonl or .csv",
        "validate",
        "{tmp}/r.yaml",
        "data.source=d.txt",
        files={"r.yaml": FILE_RECIPE},
    ),
    # ------------------------------------------------ program.class
    case(
        "class-not-a-module",
        "error: program.class: prog_plain:Plain is not a dspy.Module",
        "validate",
        SST2,
        "program={class: 'prog_plain:Plain'}",
    ),
    case(
        "class-not-importable",
        "error: program.class: cannot import 'prog_nowhere:Prog': ModuleNotFoundError",
        "validate",
        SST2,
        "program={class: 'prog_nowhere:Prog'}",
    ),
    case(
        "class-constructor-fails",
        "error: program.class: prog_boom:Boom() failed: boom",
        "validate",
        SST2,
        "program={class: 'prog_boom:Boom'}",
    ),
    case(
        "class-without-predictors",
        "error: program.class: prog_empty:Empty has no predictors",
        "validate",
        SST2,
        "program={class: 'prog_empty:Empty'}",
    ),
    case(
        "class-forward-arguments",
        "error: program.class: prog_args:WrongArgs.forward cannot take the data inputs sentence as keywords",
        "validate",
        SST2,
        "program={class: 'prog_args:WrongArgs'}",
    ),
    case(
        "class-unknown-predictor",
        "error: program.models: no predictors ['judges'] in prog_ok:Judge",
        "validate",
        SST2,
        "program={class: 'prog_ok:Judge', models: {judges: small}}",
    ),
    case(
        "class-predictor-without-model",
        "error: program.models: predictor 'judge' has no model and program.default_model is unset",
        "validate",
        SST2,
        "program={class: 'prog_ok:Judge'}",
        "models.other={type: local}",
    ),
    # ------------------------------------------------ run directories
    case(
        "run-made-by-another-recipe",
        "error: {tmp}/runs/old: made by a different recipe (seed: 0 -> 5)",
        "eval",
        SST2,
        "seed=5",
        *RUNS,
        "--name",
        "old",
        setup=run_of_seed_0,
    ),
    case(
        "run-is-a-file",
        "error: {tmp}/runs/afile: exists and is not a run directory",
        "eval",
        SST2,
        *RUNS,
        "--name",
        "afile",
        files={"runs/afile": "not a folder"},
    ),
    case("status-not-a-run", "error: {tmp}/nowhere: not a run directory", "status", "{tmp}/nowhere"),
    case(
        "init-from-not-a-run",
        "error: --init-from: {tmp}/runs/nowhere: not a run directory",
        "joint",
        SST2,
        *RUNS,
        "--init-from",
        "nowhere",
    ),
    case(
        "init-from-other-signature",
        "error: --init-from: module 'classify': signature 'sentence -> sentiment' "
        "here, 'text -> label' in {tmp}/runs/src",
        "joint",
        SST2,
        *RUNS,
        "--init-from",
        "src",
        setup=lambda tmp: source_run(tmp, *OTHER_SIGNATURE),
    ),
    case(
        "init-from-no-module-matches",
        "error: --init-from: no module of {tmp}/runs/src (judge) matches this "
        "recipe's (classify) by name and signature",
        "joint",
        SST2,
        *RUNS,
        "--init-from",
        "src",
        setup=lambda tmp: source_run(
            tmp, 'program.modules=[{name: judge, signature: "sentence -> sentiment", model: small}]'
        ),
    ),
    case(
        "init-from-adapter-of-another-model",
        "error: --init-from: module 'classify': its adapter in {tmp}/runs/src "
        "was trained on models.small ({tmp}/m1), here it runs on models.small ({tmp}/m2)",
        "joint",
        SST2,
        "models.small.path={tmp}/m2",
        *RUNS,
        "--init-from",
        "src",
        files={"m1/config.json": CHECKPOINT, "m2/config.json": CHECKPOINT},
        setup=lambda tmp: source_run(tmp, f"models.small.path={tmp}/m1", adapter=True),
    ),
    case(
        "traces-not-a-file",
        "error: --traces: {tmp}/none.jsonl is not a file",
        "finetune",
        SST2,
        *RUNS,
        "--traces",
        "{tmp}/none.jsonl",
    ),
    case(
        "optimizer-of-the-wrong-type",
        "error: optimizers.p: is a prompt optimizer; this command needs a weight one",
        "bootstrap",
        SST2,
        *RUNS,
        "--optimizer",
        "p",
    ),
    case(
        "reinforce-optimizer-in-finetune",
        "error: optimizers.g: is a reinforce optimizer, which trains on its own rollouts, not on traces; "
        "run it in a schedule: jointopt joint RECIPE 'schedule.strategy=g'",
        "finetune",
        SST2,
        *RUNS,
        "--optimizer",
        "g",
    ),
    case(
        "optimizer-not-in-recipe",
        "error: optimizers.q: no such optimizer in the recipe (it has p, w, s, g)",
        "optimize-prompts",
        SST2,
        *RUNS,
        "--optimizer",
        "q",
    ),
    # ------------------------------------------------ flags
    case(
        "seeds-not-integers",
        "error: --seeds: '0,x' is not a comma-separated list of integers",
        "joint",
        SST2,
        *RUNS,
        "--seeds",
        "0,x",
    ),
    case("seeds-negative", "error: --seeds: '-1': seeds are integers from 0", "joint", SST2, *RUNS, "--seeds=-1"),
    case(
        "seeds-twice",
        "error: --seeds: '1,1' must name at least one seed, each once",
        "joint",
        SST2,
        *RUNS,
        "--seeds",
        "1,1",
    ),
    case(
        "seeds-none",
        "error: --seeds: ' , ' must name at least one seed, each once",
        "sweep",
        SST2,
        *RUNS,
        "--seeds",
        " , ",
    ),
    case("seeds-empty", "error: --seeds: '' must name at least one seed, each once", "joint", SST2, *RUNS, "--seeds="),
    case("sweep-seeds-empty", "error: --seeds: '' must name at least one seed", "sweep", SST2, *RUNS, "--seeds", ""),
    case(
        "sweep-seeds-twice",
        "error: --seeds: '0,1,0' must name at least one seed, each once",
        "sweep",
        SST2,
        *RUNS,
        "--seeds",
        "0,1,0",
    ),
    case(
        "sweep-strategies-empty",
        "error: --strategies: empty; write steps like 'p -> w -> p', or 'none' for zero-shot",
        "sweep",
        SST2,
        *RUNS,
        "--strategies",
        "",
    ),
    case("sweep-strategies-blank", "error: --strategies: empty", "sweep", SST2, *RUNS, "--strategies", " , "),
    case(
        "sweep-strategy-twice",
        "error: --strategies: 'p, p' names a strategy twice",
        "sweep",
        SST2,
        *RUNS,
        "--strategies",
        "p, p",
    ),
    case("eval-split", "error: --split: 'train' is not dev or test", "eval", SST2, *RUNS, "--split", "train"),
    case("compare-no-run", "error: nope: no run directory at {tmp}/runs/nope", "compare", "nope", *RUNS),
    case(
        "min-score-above-1",
        "error: --min-score '2': a test score is between 0 and 1",
        "compare",
        "a",
        "b",
        *RUNS,
        "--min-score",
        "2",
        setup=finished_runs,
    ),
    case(
        "min-score-not-a-number",
        "error: --min-score 'abc': write a number, or NAME=number",
        "compare",
        "a",
        "b",
        *RUNS,
        "--min-score",
        "abc",
        setup=finished_runs,
    ),
    case(
        "min-score-nan",
        "error: --min-score 'a=nan': a test score is between 0 and 1",
        "compare",
        "a",
        "b",
        *RUNS,
        "--min-score",
        "a=nan",
        setup=finished_runs,
    ),
    case(
        "require-syntax",
        "error: --require 'a >> b': write it as 'A > B' or 'A >= B' with run names",
        "compare",
        "a",
        "b",
        *RUNS,
        "--require",
        "a >> b",
        setup=finished_runs,
    ),
    case(
        "require-syntax-no-spaces",
        "error: --require 'a>>b': write it as",
        "compare",
        "a",
        "b",
        *RUNS,
        "--require",
        "a>>b",
        setup=finished_runs,
    ),
    case(
        "require-itself",
        "error: --require 'a > a': compares 'a' with itself",
        "compare",
        "a",
        "b",
        *RUNS,
        "--require",
        "a > a",
        setup=finished_runs,
    ),
    case(
        "require-unknown-run",
        "error: --require 'a > c': no run named 'c' (runs: a, b)",
        "compare",
        "a",
        "b",
        *RUNS,
        "--require",
        "a > c",
        setup=finished_runs,
    ),
    # ------------------------------------------------ schedule.select: the step to ship
    case(
        "select-unknown-objective",
        "error: schedule.select.maximize: unknown objective 'scor'; write one of score, "
        "-tokens, -seconds, -parameters; did you mean 'score'?",
        "validate",
        SST2,
        "schedule.select={maximize: scor}",
    ),
    case(
        "select-wrong-direction",
        "error: schedule.select.maximize: 'tokens' would choose the step with the most tokens; write '-tokens'",
        "validate",
        SST2,
        "schedule.select={maximize: tokens}",
    ),
    case(
        "select-unknown-constraint",
        "error: schedule.select.constraints: unknown cost 'toknes'; constraints are "
        "upper bounds on tokens, seconds, parameters; did you mean 'tokens'?",
        "validate",
        SST2,
        "schedule.select={constraints: {toknes: 300}}",
    ),
    case(
        "select-unknown-weight",
        "error: schedule.select.weights: unknown objective 'scores'; objectives are score, "
        "tokens, seconds, parameters; did you mean 'score'?",
        "validate",
        SST2,
        "schedule.select={weights: {scores: 1}}",
    ),
    case(
        "select-weight-sign",
        "error: schedule.select.weights.tokens: 0.001 would prefer more tokens; a cost's weight "
        "is negative (e.g. -0.001)",
        "validate",
        SST2,
        "schedule.select={weights: {score: 1.0, tokens: 0.001}}",
    ),
    case(
        "select-maximize-and-weights",
        "error: {sst2}: schedule.select: give maximize or weights, not both",
        "validate",
        SST2,
        "schedule.select={maximize: score, weights: {score: 1.0}}",
    ),
    case(
        "select-negative-bound",
        "schedule.select.constraints.tokens: Input should be greater than or equal to 0",
        "validate",
        SST2,
        "schedule.select={constraints: {tokens: -1}}",
    ),
    case(
        "select-key",
        "schedule.select.maximise: unknown key; did you mean 'maximize'?",
        "validate",
        SST2,
        "schedule.select.maximise=score",
    ),
    case(
        "select-in-joint",
        "error: schedule.select.maximize: unknown objective 'cost'",
        "joint",
        SST2,
        "schedule.select={maximize: cost}",
        *RUNS,
    ),
]


def _fill(text: str, places: dict[str, Path]) -> str:
    """`{tmp}`, `{sst2}`, `{pipeline}` -> their paths (str.format would trip on YAML's own braces)."""
    for name, path in places.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def _write(tmp: Path, files: dict, places: dict[str, Path]) -> None:
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(_fill(content, places))


@pytest.mark.parametrize("argv, files, setup, expected", CASES)
def test_bad_input_exits_2_with_one_line(argv, files, setup, expected, tmp_path, monkeypatch, capsys):
    places = {"tmp": tmp_path, "sst2": RECIPES / "sst2.yaml", "pipeline": RECIPES / "sst2-pipeline.yaml"}
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path, {**PROGRAMS, **files}, places)
    if setup is not None:
        setup(tmp_path)
    model_loaded_before = "transformers" in sys.modules

    code = cli(*(_fill(arg, places) for arg in argv))

    err = capsys.readouterr().err
    assert (code, _fill(expected, places) in err) == (2, True), err
    assert err.count("\n") == 1 and err.startswith("error: "), err  # the error line, nothing else
    assert model_loaded_before or "transformers" not in sys.modules, "a bad input loaded the model"


def test_the_corpus_is_large():
    assert len(CASES) >= 50
