"""Every prompt optimizer of the catalogue as `jointopt optimize-prompts` on a tiny sst2 split: the real
DSPy optimizer on the embedded model, its program saved, loaded back and scored.

The arguments are the smallest that still run each optimizer's whole algorithm (docs/recipes/optimizers.md
lists them). The 135M model rarely writes a proposal in DSPy's format: an optimizer that asks it for
instructions (MIPROv2, COPRO, InferRules) must then keep the current instruction and say so in one line.
"""

from __future__ import annotations

import json

import pytest

from .conftest import RECIPES, cli, manifest, tiny

OPTIMIZERS = {
    "LabeledFewShot": ("{k: 2}", "{}"),
    "BootstrapFewShot": ("{max_bootstrapped_demos: 1, max_labeled_demos: 2, max_errors: 100}", "{}"),
    "BootstrapFewShotWithRandomSearch": (
        "{max_bootstrapped_demos: 1, max_labeled_demos: 2, num_candidate_programs: 1, max_errors: 100}",
        "{}",
    ),
    "BootstrapFewShotWithOptuna": (
        "{max_bootstrapped_demos: 1, max_labeled_demos: 2, num_candidate_programs: 2}",
        "{max_demos: 2}",
    ),
    "MIPROv2": (
        "{auto: null, num_candidates: 2, max_bootstrapped_demos: 1, max_labeled_demos: 2, max_errors: 100}",
        "{num_trials: 2, minibatch: false}",
    ),
    "COPRO": ("{breadth: 2, depth: 1}", "{}"),
    "SIMBA": ("{bsize: 2, num_candidates: 2, max_steps: 1, max_demos: 1}", "{}"),
    "InferRules": ("{num_candidates: 2, num_rules: 2, max_errors: 100}", "{}"),
    "GEPA": ("{max_metric_calls: 12}", "{}"),
}
PROPOSERS = ("MIPROv2", "COPRO", "InferRules")  # they ask the prompt model to write instructions


@pytest.mark.model
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_runs_as_a_prompt_step(name, runs, capsys):
    args, compile_args = OPTIMIZERS[name]
    overrides = [f"optimizers.p.optimizer={name}", f"optimizers.p.args={args}"]
    overrides += [f"optimizers.p.compile_args={compile_args}", "optimizers.p.reflection_model=small"]
    code = cli("optimize-prompts", RECIPES / "sst2.yaml", *tiny(4, 2, 2), *overrides, "--runs-dir", runs)
    err = capsys.readouterr().err
    assert code == 0, err
    run = runs / "sst2"
    (step,) = manifest(run)["steps"]
    assert (step["kind"], step["status"], step["info"]["name"]) == ("p", "done", name)
    assert 0 <= step["scores"]["dev"] <= 1
    state = json.loads((run / "00-p" / "state.json").read_text())
    program = json.loads((run / state["program"]).read_text())
    demos = program["classify"]["demos"]
    if name == "LabeledFewShot":
        assert len(demos) == 2
    if name in PROPOSERS:  # a proposal that parsed changed the instruction; one that did not is reported
        kept = step["info"].get("proposals", {}).get("kept_current", 0)
        assert kept == 0 or "kept the current instruction" in err
    # the saved program is the one a later command runs: evaluating it again gives the step's dev score
    assert cli("eval", RECIPES / "sst2.yaml", *tiny(4, 2, 2), *overrides, "--runs-dir", runs) == 0
    assert manifest(run)["steps"][-1]["scores"]["dev"] == step["scores"]["dev"]
