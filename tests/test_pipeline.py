"""The two-module recipe, recipes/sst2-pipeline.yaml: `summarize` (`adapter: text`) talks plain chat,
`classify` DSPy's ChatAdapter format, at inference, in demos and in fine-tune rows; `joint` runs it."""

from __future__ import annotations

import json

import dspy
import pytest
from dspy.clients.base_lm import GLOBAL_HISTORY
from dspy.utils.dummies import DummyLM

from jointcli.program import build_program, module_adapter
from jointcli.recipe import load_recipe
from jointcli.steps.traces import collect_traces

from .conftest import RECIPES, cli, tiny

PIPELINE = RECIPES / "sst2-pipeline.yaml"
OPINION = "The reviewer is charmed."


class _FormatFollowingLM(DummyLM):
    """Answers as a model that follows each module's format: the text module in plain text (with the
    spaces a model adds around it), the chat module under its field header."""

    def __init__(self):
        super().__init__(
            {"Sentence: ": {"opinion": f"  {OPINION}\n"}, "[[ ## opinion ## ]]": {"sentiment": "positive"}}
        )

    def _format_answer_fields(self, values):
        return values["opinion"] if "opinion" in values else super()._format_answer_fields(values)


def test_each_module_runs_and_is_trained_in_its_own_format():
    recipe = load_recipe(PIPELINE)
    program = build_program(recipe)
    program.summarize.demos = [dspy.Example(sentence="a dull film", opinion="The reviewer is bored.")]
    program.classify.demos = [dspy.Example(sentence="a fine film", opinion="Liked it.", sentiment="positive")]
    trainset = [dspy.Example(sentence="a charming film", sentiment="positive").with_inputs("sentence")]
    lm = _FormatFollowingLM()
    with dspy.context(lm=lm):
        traces = collect_traces(
            program,
            trainset,
            lambda example, prediction, trace=None: 1.0,
            ["summarize", "classify"],
            threshold=1.0,
            num_threads=1,
        )
    rows = {row["module"]: row["messages"] for row in traces.rows}
    summarize, classify = rows["summarize"], rows["classify"]
    # plain: the instructions lead the first user message; a demo, then the input, then the whole answer
    assert [m["role"] for m in summarize] == ["user", "assistant", "user", "assistant"]
    assert summarize[0]["content"] == f"{recipe.program.modules[0].instructions}\n\nSentence: a dull film"
    assert [m["content"] for m in summarize[1:]] == ["The reviewer is bored.", "Sentence: a charming film", OPINION]
    assert "[[ ##" not in json.dumps(summarize)
    # DSPy's format, with the text module's answer as an input
    assert classify[0]["role"] == "system" and f"[[ ## opinion ## ]]\n{OPINION}" in classify[-2]["content"]
    assert classify[-1]["content"].startswith("[[ ## sentiment ## ]]\npositive")
    # what each module was sent at inference is its row without the answer
    assert [entry["messages"] for entry in lm.history] == [summarize[:-1], classify[:-1]]


def test_a_module_without_the_text_adapter_runs_under_the_process_adapter():
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    with dspy.context(adapter=adapter):
        assert module_adapter(dspy.Predict("sentence -> sentiment")) is adapter  # a `class` program's
        assert module_adapter(build_program(load_recipe(PIPELINE)).classify) is adapter


# as small as it gets: the test needs summarize to answer and classify to run, not classify to be right
TINY_PIPELINE = tiny(
    2,
    1,
    1,
    "models.large.max_tokens=8",
    "models.small.max_tokens=12",
    "optimizers.p.optimizer=LabeledFewShot",
    "optimizers.p.args={k: 1}",
    "optimizers.w.train.epochs=1",
    "optimizers.w.train.batch_size=2",
    "schedule.strategy=p -> w",
)


@pytest.mark.model
def test_joint_runs_the_pipeline_and_fine_tunes_classify_only(runs):
    assert cli("joint", PIPELINE, *TINY_PIPELINE, "--runs-dir", runs) == 0
    step = runs / "sst2-pipeline" / "02-w"
    modules = json.loads((step / "state.json").read_text())["modules"]
    assert modules["classify"]["adapter"] and modules["summarize"]["adapter"] is None
    counts = json.loads((step / "traces.json").read_text())["modules"]
    assert counts["summarize"]["parsed"] > 0 and counts["classify"]["ran"] > 0
    rows = [json.loads(line) for line in (step / "traces.jsonl").read_text().splitlines()]
    assert rows and {r["module"] for r in rows} == {"classify"}
    assert all(r["messages"][-1]["content"].startswith("[[ ## sentiment ## ]]") for r in rows)
    instructions = load_recipe(PIPELINE).program.modules[0].instructions
    sent = [entry["messages"] for entry in GLOBAL_HISTORY if instructions in json.dumps(entry["messages"])]
    assert sent and "[[ ##" not in json.dumps(sent)  # summarize's calls, in plain chat
