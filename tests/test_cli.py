"""The CLI on the real embedded model and real files: run directories, chained steps, exit codes.

Commands run in-process through `jointcli.cli.main` (as the console script does) so that the model
loads once for the whole file; a few run in a subprocess where the process boundary matters.
"""

from __future__ import annotations

import json
import math
import re

import dspy
import pytest

from jointcli.rundir import RunDir

from .conftest import RECIPES, ROOT, cli, manifest, run_cli, tiny

TINY = tiny()


@pytest.mark.model
def test_eval_writes_a_complete_run_directory(runs, capsys):
    # without DSPy's cache, so that tokens are generated (cache hits cost, and count, no tokens)
    assert cli("eval", RECIPES / "sst2.yaml", *TINY, "runtime.cache=false", "--runs-dir", runs) == 0
    run = runs / "sst2"
    assert (run / "recipe.yaml").is_file() and not list(run.rglob("*.tmp"))
    (step,) = manifest(run)["steps"]
    assert step["kind"] == "baseline" and step["status"] == "done" and step["seconds"] > 0
    assert step["tokens"]["in"] > 0 and step["tokens"]["out"] > 0
    report = json.loads((run / "00-baseline" / "eval.json").read_text())
    assert report["n"] == 4 and len(report["scores"]) == 4 and 0 <= report["score"] <= 1
    assert {"parse_failures", "seconds", "tokens_in", "tokens_out"} <= set(report)
    rows = [json.loads(line) for line in (run / "00-baseline" / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and all("gold" in r for r in rows)
    assert "00-baseline" in capsys.readouterr().err  # the rich table

    # status reads it back, as a table and as JSON on stdout
    assert cli("status", run, "--json") == 0
    assert json.loads(capsys.readouterr().out)["steps"][0]["kind"] == "baseline"

    # the same run with a different recipe is refused, with --force accepted
    changed = [*TINY, "runtime.cache=false", "seed=5", "--runs-dir", runs]
    assert cli("eval", RECIPES / "sst2.yaml", *changed) == 2
    assert "different recipe (seed: 0 -> 5)" in capsys.readouterr().err
    assert cli("eval", RECIPES / "sst2.yaml", *changed, "--force") == 0
    assert [s["kind"] for s in manifest(run)["steps"]] == ["baseline", "eval"]
    assert (run / "recipe.1.yaml").is_file()  # the recipe the run had before --force is kept


@pytest.mark.model
def test_prompt_then_weight_steps_chain_state(runs, capsys):
    args = [
        *TINY,
        "optimizers.p.optimizer=LabeledFewShot",
        "optimizers.p.args={k: 2}",
        "optimizers.w.traces.source=labels",
        "optimizers.w.train.epochs=1",
        "optimizers.w.train.batch_size=3",
        "--runs-dir",
        runs,
        "--name",
        "chain",
    ]
    assert cli("optimize-prompts", RECIPES / "sst2.yaml", *args) == 0
    run = runs / "chain"
    p = run / "00-p"
    state = json.loads((p / "state.json").read_text())
    assert state["program"] == "00-p/program.json" and state["modules"]["classify"]["adapter"] is None

    # plain DSPy loads the saved program back into the same program, demos included
    class Plain(dspy.Module):
        def __init__(self):
            super().__init__()
            self.classify = dspy.Predict("sentence -> sentiment")

    plain = Plain()
    plain.load(str(p / "program.json"))
    assert len(plain.classify.demos) == 2

    assert cli("bootstrap", RECIPES / "sst2.yaml", *args) == 0
    counts = json.loads((run / "01-bootstrap" / "traces.json").read_text())
    assert counts["run"] == 6 and counts["passed"] == 6 and counts["per_module"] == {"classify": 6}
    trace = json.loads((run / "01-bootstrap" / "traces.jsonl").read_text().splitlines()[0])
    roles = [m["role"] for m in trace["messages"]]
    assert (
        roles[0] == "system"
        and roles[-1] == "assistant"
        and "[[ ## sentiment ## ]]" in trace["messages"][-1]["content"]
    )
    # the demos of the prompt step are in the recorded prompt: the traces are of the current program
    assert roles.count("user") == 3

    assert cli("finetune", RECIPES / "sst2.yaml", *args) == 0
    w = run / "02-w"
    state = json.loads((w / "state.json").read_text())
    assert state["modules"]["classify"]["adapter"] == "02-w/adapters/classify"
    assert state["program"] == "02-w/program.json"
    carried = Plain()
    carried.load(str(w / "program.json"))
    assert carried.classify.demos == plain.classify.demos  # prompts carried over from the p step
    assert (w / "adapters" / "classify" / "adapter_config.json").is_file()
    log = [json.loads(line) for line in (w / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))  # every optimizer step, once
    assert all(r["adapter"] == "classify" and math.isfinite(r["loss"]) for r in log)
    steps = manifest(run)["steps"]
    assert [s["kind"] for s in steps] == ["p", "bootstrap", "w"]
    assert steps[2]["info"]["traces"]["from"].endswith("01-bootstrap/traces.jsonl")
    training = steps[2]["info"]["training"]["classify"]
    assert training["tokens_per_second"] > 0 and training["peak_rss_mb"] > 0
    assert "dev" in steps[2]["scores"]


def test_optimizer_names_and_arguments_are_checked(runs, capsys):
    assert (
        cli("optimize-prompts", RECIPES / "sst2.yaml", *TINY, "optimizers.p.optimizer=Magic", "--runs-dir", runs) == 2
    )
    err = capsys.readouterr().err
    assert "unknown prompt optimizer 'Magic'" in err and "MIPROv2" in err and "Traceback" not in err
    assert (
        cli(
            "optimize-prompts",
            RECIPES / "sst2.yaml",
            *TINY,
            "optimizers.p.args={max_labeled_demos: 2, bogus: 1}",
            "--runs-dir",
            runs,
        )
        == 2
    )
    assert "does not accept ['bogus']" in capsys.readouterr().err


def test_the_docs_list_the_optimizer_arguments_validate_cannot_check():
    from jointcli.steps.arguments import unchecked_arguments

    page = (ROOT / "docs" / "commands.md").read_text()
    listed = page.split("DSPy says nothing of these")[1].split("\n\n")[1]
    documented = {
        line[2:].split(":")[0]: re.findall(r"`([\w.]+)`", line) for line in listed.splitlines() if line.startswith("- ")
    }
    assert documented == unchecked_arguments()


@pytest.mark.model
def test_an_unchecked_argument_is_named_by_the_error_it_causes(runs, capsys):
    # stop_at_score has no type DSPy declares: validate takes it, and the optimizer's comparison fails
    args = [
        *tiny(2, 2, 2),
        "optimizers.p.optimizer=BootstrapFewShotWithRandomSearch",
        "optimizers.p.args={stop_at_score: high, num_candidate_programs: 1, max_bootstrapped_demos: 0}",
        "--runs-dir",
        runs,
    ]
    assert cli("validate", RECIPES / "sst2.yaml", *args[:-2]) == 0
    capsys.readouterr()
    assert cli("optimize-prompts", RECIPES / "sst2.yaml", *args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: step 00-p failed: TypeError: "), err
    assert err.endswith("(optimizers.p.args.stop_at_score='high' went unchecked: DSPy declares no type for it)"), err


@pytest.mark.model
def test_zero_passing_traces_is_a_clear_failure(runs, capsys):
    code = cli(
        "bootstrap",
        RECIPES / "sst2.yaml",
        *TINY,
        "optimizers.w.traces.threshold=2.0",
        "optimizers.w.traces.source=program",
        "--runs-dir",
        runs,
    )
    err = capsys.readouterr().err
    assert code == 1 and "no traces to fine-tune on" in err
    assert "traces.source=program+labels" in err and "prompt step first" in err  # hints that apply here
    step = manifest(runs / "sst2")["steps"][-1]
    assert step["status"] == "failed" and "no traces to fine-tune on" in step["error"]


def test_lock_names_the_holder(runs, capsys):
    run = runs / "locked"
    run.mkdir(parents=True)
    holder = RunDir(run)
    holder.lock()
    try:
        assert cli("eval", RECIPES / "sst2.yaml", *TINY, "--runs-dir", runs, "--name", "locked") == 2
        assert "in use by pid" in capsys.readouterr().err
    finally:
        holder.unlock()


@pytest.mark.parametrize(
    "args, message",
    [
        (["validate", "missing.yaml"], "no such recipe file"),
        (["validate", "recipes/sst2.yaml", "data.split.train=abc"], "data.split.train"),
        (["validate", "recipes/sst2.yaml", "nope.key=1"], "nope: unknown key"),
        (["eval", "recipes/sst2.yaml", "data.split.dev=5000"], "only 872 rows"),
        (["eval", "recipes/sst2.yaml", "--split", "train"], "--split"),
        (["joint", "recipes/sst2.yaml", "schedule.strategy=p -> q"], "unknown step 'q'"),
        (["status", "nowhere"], "not a run directory"),
        (["eval", "recipes/sst2.yaml", "--bogus-flag"], "No such option"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    result = run_cli(*args, "--runs-dir", str(tmp_path)) if args[0] != "validate" else run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_damaged_manifest_is_bad_input(tmp_path):
    run = tmp_path / "sst2"
    run.mkdir()
    (run / "manifest.json").write_text("{not json")
    (run / "recipe.yaml").write_text("name: sst2\n")
    result = run_cli("status", str(run))
    assert result.returncode == 2 and "manifest.json: damaged" in result.stderr


@pytest.mark.model
def test_two_module_pipeline_and_user_program_class(runs, tmp_path, monkeypatch, capsys):
    # the two-module recipe: the second module reads the first one's output
    assert cli("eval", RECIPES / "sst2-pipeline.yaml", "data.split.dev=2", "--runs-dir", runs) == 0
    rows = [
        json.loads(x) for x in (runs / "sst2-pipeline" / "00-baseline" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2
    # a user's own dspy.Module, with a per-predictor model map
    (tmp_path / "userprog.py").write_text(
        "import dspy\n"
        "class Sentiment(dspy.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.judge = dspy.Predict('sentence -> sentiment')\n"
        "    def forward(self, sentence):\n"
        "        return self.judge(sentence=sentence)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "user.yaml"
    recipe.write_text(
        (RECIPES / "sst2.yaml")
        .read_text()
        .replace(
            '  modules:\n    - name: classify\n      signature: "sentence -> sentiment"\n'
            '      instructions: "Classify the sentiment of the movie-review sentence as positive or negative."\n'
            "      model: small\n",
            "  class: userprog:Sentiment\n  models: {judge: small}\n",
        )
    )
    assert "class: userprog:Sentiment" in recipe.read_text()
    assert cli("eval", recipe, "data.split.dev=2", "--runs-dir", runs, "--name", "user") == 0
    (step,) = manifest(runs / "user")["steps"]
    assert step["status"] == "done" and step["info"]["dev_n"] == 2
