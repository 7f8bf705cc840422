"""`joint --init-from` across recipes: modules matched by name and signature, their prompts and adapters
copied, the rest kept as the recipe has them. The refusals (another signature, no module matches, an
adapter of another base model) are cases of test_bad_inputs.py: they need no model."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

from jointcli.context import open_run
from jointcli.files import write_json
from jointcli.program import build_program
from jointcli.recipe import load_recipe
from jointcli.rundir import RunDir
from jointcli.state import ModuleState, ProgramState, save_state
from jointcli.steps.init_step import init_step

from .conftest import RECIPES, cli, manifest, tiny

# another task than recipes/sst2.yaml's: another name, another split of the data, and a second module
OTHER = tiny(
    4,
    1,
    1,
    "name=sst2-notes",
    "data.split.seed=1",
    "models.small.max_tokens=8",
    "schedule.strategy=none",
    'program.modules=[{name: classify, signature: "sentence -> sentiment", model: small}, '
    '{name: note, signature: "sentence, sentiment -> note", instructions: "Say why.", model: small}]',
)


def hand_made_source(root: Path) -> Path:
    """root/source: a run of recipes/sst2.yaml whose w step holds one demo and an adapter of `classify`."""
    recipe = load_recipe(RECIPES / "sst2.yaml")
    run = RunDir.open(root, "source", recipe)
    step = run.begin("w")
    program = build_program(recipe)
    program.classify.demos = [dspy.Example(sentence="a gem", sentiment="positive")]
    adapter = f"{step.folder}/adapters/classify"
    write_json(run.path / adapter / "adapter_config.json", {"r": 8})
    save_state(run, run.step_dir(step), program, ProgramState(None, {"classify": ModuleState("small", adapter)}))
    run.finish(step, 1.0)
    run.set_manifest_field("best", step.folder)
    run.unlock()
    return run.path


def test_init_from_another_recipe_copies_the_matching_module(tmp_path, capsys):
    source = hand_made_source(tmp_path)
    with open_run(RECIPES / "sst2.yaml", OTHER, "warm", tmp_path) as ctx:
        step = init_step(ctx, source)
    assert "--init-from: note not in" in capsys.readouterr().err
    assert step.info["copied"] == {"classify": ["prompts", "adapter"]} and step.info["kept"] == ["note"]
    folder = tmp_path / "warm" / "00-init"
    theirs = json.loads((source / "00-w" / "program.json").read_text())
    mine = json.loads((folder / "program.json").read_text())
    assert mine["classify"]["demos"] == theirs["classify"]["demos"] and len(mine["classify"]["demos"]) == 1
    assert mine["note"]["demos"] == [] and mine["note"]["signature"]["instructions"] == "Say why."
    assert json.loads((folder / "state.json").read_text())["modules"] == {
        "classify": {"model": "small", "adapter": "00-init/adapters/classify"},
        "note": {"model": "small", "adapter": None},
    }
    assert (folder / "adapters" / "classify" / "adapter_config.json").is_file()


@pytest.mark.model
def test_a_warm_start_from_another_recipe_runs(tmp_path):
    """A real source run (one labeled demo) starts the other task's schedule: its program runs there."""
    runs = ["--runs-dir", tmp_path]
    source = tiny(4, 1, 1, "optimizers.p.optimizer=LabeledFewShot", "optimizers.p.args={k: 1}")
    assert cli("optimize-prompts", RECIPES / "sst2.yaml", *source, "--name", "source", *runs) == 0
    assert cli("joint", RECIPES / "sst2.yaml", *OTHER, "--name", "warm", "--init-from", "source", *runs) == 0
    steps = manifest(tmp_path / "warm")["steps"]
    assert [(s["kind"], s["status"]) for s in steps] == [("init", "done"), ("baseline", "done")]
    assert steps[0]["info"]["copied"] == {"classify": ["prompts"]}
    demos = json.loads((tmp_path / "warm" / "00-init" / "program.json").read_text())["classify"]["demos"]
    assert len(demos) == 1
