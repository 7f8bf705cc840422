"""Recipe validation: good recipes load, each kind of bad input is one clear InputError."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jointcli.checks import check_recipe
from jointcli.errors import InputError
from jointcli.recipe import did_you_mean, load_recipe, recipe_to_yaml

from .conftest import RECIPES


@pytest.mark.parametrize("name", ["sst2", "iris", "sst2-pipeline"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    check_recipe(recipe)
    assert recipe.name == name
    assert recipe.models and recipe.program.modules
    assert set(recipe.schedule.strategy.replace("->", " ").split()) <= set(recipe.optimizers)


def test_overrides_are_typed_and_dotted():
    recipe = load_recipe(
        RECIPES / "sst2.yaml",
        ["data.split.train=16", "seed=3", "runtime.cache=false", "program.modules.classify.instructions=Be brief."],
    )
    assert recipe.data.split.train == 16 and recipe.seed == 3 and recipe.runtime.cache is False
    assert recipe.program.modules[0].instructions == "Be brief."
    # an override may set a key the YAML leaves to its default
    assert load_recipe(RECIPES / "sst2.yaml", ["schedule.patience=2"]).schedule.patience == 2


def test_resolved_recipe_round_trips(tmp_path: Path):
    recipe = load_recipe(RECIPES / "sst2-pipeline.yaml")
    path = tmp_path / "frozen.yaml"
    path.write_text(recipe_to_yaml(recipe))
    assert load_recipe(path) == recipe


def _write(tmp_path: Path, tree) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return path


def _base() -> dict:
    return yaml.safe_load((RECIPES / "sst2.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, overrides, expected",
    [
        (lambda t: t["data"].update(splt=1), [], "data.splt: unknown key"),
        (lambda t: t["data"]["split"].update(train="many"), [], "data.split.train: Input should be a valid integer"),
        (lambda t: t["program"]["modules"][0].update(model="big"), [], "unknown model 'big'"),
        (lambda t: t["program"]["modules"][0].update(signature="text -> sentiment"), [], "inputs ['text']"),
        (lambda t: t["data"].update(source="data.txt"), [], "must end in .jsonl or .csv"),
        (
            lambda t: t["metric"].update(name="my metric"),
            [],
            "must be a built-in metric's name or package.module:function",
        ),
        (lambda t: t["models"]["small"].update(type="vllm"), [], "models.small"),
        (
            lambda t: t["models"].update(big={"type": "litellm", "model": "openai/x", "api_key_env": "sk-abc123-xyz"}),
            [],
            "NAME of an environment variable",
        ),
        (lambda t: None, ["data.split.train=abc"], "override data.split.train=abc"),
        (lambda t: None, ["data.nosuch.key=1"], "data.nosuch: unknown key"),
        (lambda t: None, ["program.modules.other.model=small"], "no list item 'other'"),
        (lambda t: None, ["novalue"], "expected key.path=value"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, mutate, overrides, expected):
    tree = _base()
    mutate(tree)
    with pytest.raises(InputError) as info:
        load_recipe(_write(tmp_path, tree), overrides)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert message.startswith(str(tmp_path / "r.yaml"))


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(InputError, match=r"line \d+ malformed YAML"):
        load_recipe(_write(tmp_path, "name: x\ndata: [unclosed\n"))
    with pytest.raises(InputError, match="must be a YAML mapping"):
        load_recipe(_write(tmp_path, "- a list\n"))
    with pytest.raises(InputError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_program_class_needs_exactly_one_kind(tmp_path):
    tree = _base()
    tree["program"]["class"] = "mypkg.mod:Prog"
    with pytest.raises(InputError, match="exactly one"):
        load_recipe(_write(tmp_path, tree))


@pytest.mark.parametrize(
    "name, override, expected",
    [
        (
            "sst2",
            "data.source=builtin:mnist",
            "data.source: unknown built-in data set 'builtin:mnist'; choose one of builtin:sst2",
        ),
        ("sst2", "metric.name=accuracy", "metric.name: unknown metric 'accuracy'; use one of exact_match"),
        ("sst2", "models.small.path=builtin:smollm3", "models.small.path: unknown built-in model 'builtin:smollm3'"),
        (
            "sst2",
            "models.small.path=/no/such/folder",
            "models.small.path: model path '/no/such/folder': no such folder",
        ),
        ("sst2", "models.small.path=recipes", "models.small.path: model path 'recipes': not a Hugging Face checkpoint"),
        (
            "sst2-pipeline",
            "optimizers.w.traces.source=labels",
            "optimizers.w.traces.source: labels works for a program of one `predict` module",
        ),
        (
            "sst2",
            "optimizers.w.modules=[nope]",
            "optimizers.w.modules: unknown modules ['nope']; the program has classify",
        ),
    ],
)
def test_validate_catches_what_a_step_would_find_later(name, override, expected):
    """Errors that depend only on the recipe are raised by `validate` (checks.check_recipe), before any
    step: the lists of built-ins live in data.py, metrics.py and weights/checkpoint.py, which it asks.
    tests/test_bad_inputs.py runs many more through the command line."""
    recipe = load_recipe(RECIPES / f"{name}.yaml", [override])  # the form is fine: the recipe loads
    with pytest.raises(InputError) as info:
        check_recipe(recipe)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "optimizers.p.optimizer=MIPROv2",
            "optimizers.p.compile_args={num_trials: 2, minibatch: false}",
            "optimizers.p.args={auto: null, num_candidates: 3, init_temperature: 1, verbose: true, teacher_settings: {}}",
        ],
        [
            "optimizers.p.optimizer=GEPA",
            "optimizers.p.reflection_model=small",
            "optimizers.p.args={max_metric_calls: 50, candidate_selection_strategy: current_best}",
        ],
        ["optimizers.p.optimizer=SIMBA", "optimizers.p.args={bsize: 4, temperature_for_sampling: 0.5}"],
        [
            "optimizers.p.optimizer=LabeledFewShot",
            "optimizers.p.args={k: 2}",
            "optimizers.p.compile_args={sample: false}",
        ],
    ],
)
def test_optimizer_arguments_of_the_right_type_pass(overrides):
    """The type rule (checks.py: annotation, else default) accepts what the optimizers take: null where
    the annotation allows it, an integer for a number, a literal of the annotation's."""
    check_recipe(load_recipe(RECIPES / "sst2.yaml", overrides))


def test_did_you_mean_ignores_case_and_stays_quiet_when_nothing_is_close():
    assert did_you_mean("miprov2", ["BootstrapFewShot", "MIPROv2"]) == "; did you mean 'MIPROv2'?"
    assert did_you_mean("zzz", ["args", "modules"]) == ""


def test_an_override_value_is_a_section_or_list_only_in_braces_or_brackets():
    recipe = load_recipe(
        RECIPES / "sst2.yaml",
        [
            "program.modules.classify.instructions=Answer: positive or negative",
            "program.modules.classify.signature=sentence: str -> sentiment",
        ],
    )
    assert recipe.program.modules[0].instructions == "Answer: positive or negative"
    assert recipe.program.modules[0].signature == "sentence: str -> sentiment"


def test_a_recipe_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes((RECIPES / "sst2.yaml").read_text().replace("SST-2", "SST-2 caf\u00e9").encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.yaml: not UTF-8 text \(invalid") as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
