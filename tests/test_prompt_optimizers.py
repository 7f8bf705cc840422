"""Every prompt optimizer of the catalogue as `jointopt optimize-prompts` on a tiny sst2 split: the real
DSPy optimizer on the embedded model, its program saved, loaded back and scored.

The arguments are the smallest that still run each optimizer's whole algorithm (docs/recipes/optimizers.md
lists them). The 135M model rarely writes a proposal in DSPy's format: an optimizer that asks it for
instructions (MIPROv2, COPRO, InferRules) must then keep the current instruction and say so in one line.
KNNFewShot's program looks its demos up per call: its state records the lookup, which a later step and
`jointopt eval` rebuild, and export refuses.
"""

from __future__ import annotations

import json

import pytest

from .conftest import RECIPES, cli, manifest, run_cli, tiny

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
    "KNNFewShot": ("{k: 2}", "{}"),
    "GEPA": ("{max_metric_calls: 12}", "{}"),
}
PROPOSERS = ("MIPROv2", "COPRO", "InferRules")  # they ask the prompt model to write instructions


def answers(folder) -> list[tuple]:
    """Each dev example's prediction and the LM calls and prompt tokens it took, from predictions.jsonl."""
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return [(r["prediction"], r["calls"], r["tokens_in"]) for r in rows]


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
    if name == "KNNFewShot":  # the lookup is in the state: the step's 4 training examples, by row
        assert state["knn"]["args"] == {"k": 2} and len(state["knn"]["examples"]) == 4
    if name == "COPRO":  # DSPy prints the prompt model's history to build a debug message: not on the console
        assert "System message:" not in err
    if name in PROPOSERS:  # a proposal that parsed changed the instruction; one that did not is reported
        kept = step["info"].get("proposals", {}).get("kept_current", 0)
        assert kept == 0 or "kept the current instruction" in err
    # the saved program is the one a later command runs: evaluating it again gives the step's dev score
    assert cli("eval", RECIPES / "sst2.yaml", *tiny(4, 2, 2), *overrides, "--runs-dir", runs) == 0
    assert manifest(run)["steps"][-1]["scores"]["dev"] == step["scores"]["dev"]
    if name == "KNNFewShot":  # the same calls too (k bootstrapping runs and the answer), in a fresh process too
        assert answers(run / "01-eval") == answers(run / "00-p")
        again = run_cli("eval", str(RECIPES / "sst2.yaml"), *tiny(4, 2, 2), *overrides, "--runs-dir", str(runs))
        assert again.returncode == 0, again.stderr
        assert answers(run / "02-eval") == answers(run / "00-p")


@pytest.mark.model
def test_knn_lookup_is_rebuilt_by_the_next_step_and_refused_by_export(runs, capsys):
    knn = ["optimizers.p.optimizer=KNNFewShot", "optimizers.p.args={k: 2}", "schedule.strategy=p -> w"]
    knn += ["optimizers.w.train.batch_size=4"]  # 4 rows: one optimizer step
    assert cli("joint", RECIPES / "sst2.yaml", *tiny(4, 2, 2), *knn, "--runs-dir", runs) == 0, capsys.readouterr().err
    run = runs / "sst2"
    p, w = [s for s in manifest(run)["steps"] if s["kind"] in ("p", "w")]
    assert (p["status"], w["status"]) == ("done", "done")
    # the weight step trained on the KNN program's traces and kept the lookup
    assert json.loads((run / f"{w['index']:02d}-w" / "state.json").read_text())["knn"]["args"] == {"k": 2}
    assert cli("eval", RECIPES / "sst2.yaml", *tiny(4, 2, 2), *knn, "--runs-dir", runs) == 0
    assert manifest(run)["steps"][-1]["scores"]["dev"] == w["scores"]["dev"]
    assert answers(run / f"{manifest(run)['steps'][-1]['index']:02d}-eval") == answers(run / f"{w['index']:02d}-w")
    capsys.readouterr()
    assert cli("export", run, "--step", f"{w['index']:02d}-w", "--out", runs / "exported") == 2
    assert "(KNNFewShot), which program.json cannot hold; export a step without KNNFewShot" in capsys.readouterr().err


@pytest.mark.model
def test_the_embedder_gives_each_text_one_unit_vector_whatever_it_is_embedded_with(monkeypatch):
    import numpy as np

    from jointcli.models import embedder as module
    from jointcli.models.build import build_lm
    from jointcli.recipe import load_recipe

    recipe = load_recipe(RECIPES / "sst2.yaml", [])
    embedder = module.local_embedder(build_lm("small", recipe.models["small"]))
    texts = ["sentence: a charming , often affecting journey .", "sentence: dull and " * 40]
    monkeypatch.setattr(module, "_VECTORS", {})  # computed, not remembered from another test
    together = embedder(texts)
    monkeypatch.setattr(module, "_VECTORS", {})
    alone = embedder([texts[1]])
    assert together.shape == (2, 576) and np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    assert np.array_equal(together[1], alone[0])
