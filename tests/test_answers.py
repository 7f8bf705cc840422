"""answers.py: what a program answers on label-like fields, the majority class, and the warnings."""

from __future__ import annotations

from jointcli.answers import NO_ANSWER, answer_summary, answer_warnings


def _rows(pairs):
    return [{"gold": {"sentiment": g}, "prediction": None if p is None else {"sentiment": p}} for g, p in pairs]


def test_summary_counts_answers_as_exact_match_compares_them():
    rows = _rows(
        [
            ("positive", "Positive."),
            ("positive", "positive"),
            ("negative", None),
            ("negative", "negative"),
            ("positive", " 'positive' "),
        ]
    )
    s = answer_summary(rows, "sentiment")
    assert s.answers == {"positive": 3, NO_ANSWER: 1, "negative": 1}
    assert (s.majority_label, s.majority_score, s.labels) == ("positive", 0.6, 2)


def test_majority_ties_go_to_the_first_label_in_sorted_order():
    s = answer_summary(_rows([("positive", "x"), ("negative", "x")] * 3), "sentiment")
    assert (s.majority_label, s.majority_score) == ("negative", 0.5)


def test_free_text_and_numbers_are_not_label_like():
    numbers = [{"gold": {"answer": str(i)}, "prediction": {"answer": str(i)}} for i in range(20)]
    assert answer_summary(numbers, "answer") is None
    assert answer_summary(_rows([("positive", "positive")]), None) is None
    assert answer_summary([{"score": 1.0}], "sentiment") is None  # rows without gold values


def test_a_collapsed_program_is_flagged_and_a_reader_is_not():
    gold = ["positive"] * 30 + ["negative"] * 20
    constant = answer_summary(_rows([(g, "positive") for g in gold]), "sentiment")
    scores = [1.0] * 30 + [0.0] * 20
    warnings = answer_warnings(constant, scores)
    assert warnings[0] == "answers 'positive' to every example it answers"
    assert warnings[1].startswith("0.600 is within the 95% interval") and warnings[1].endswith("'positive' (0.600)")
    reader = answer_summary(_rows([(g, g) for g in gold]), "sentiment")
    assert answer_warnings(reader, [1.0] * 50) == []


def test_a_score_significantly_below_the_majority_class_is_flagged():
    """A program that answers, and answers worse than a constant would: its interval lies under the
    majority-class score. One whose answers never parse is told apart by its answers, not warned twice."""
    gold = ["positive"] * 70 + ["negative"] * 30
    contrary = answer_summary(_rows([(g, "negative" if g == "positive" else "positive") for g in gold]), "sentiment")
    (warning,) = answer_warnings(contrary, [0.0] * 100)
    assert warning.startswith("0.000 is below always answering 'positive' (0.700): its 95% interval [0.000, 0.000]")
    unparsed = answer_summary(_rows([(g, None) for g in gold]), "sentiment")
    assert answer_warnings(unparsed, [0.0] * 100) == []


def test_parse_failures_do_not_hide_a_collapse():
    rows = _rows([("positive", "positive"), ("negative", None), ("negative", "positive"), ("positive", None)])
    assert answer_warnings(answer_summary(rows, "sentiment"), [1.0, 0.0, 0.0, 0.0])[0].startswith("answers 'positive'")


# ---------------------------------------------------------------- what to try
def test_likely_causes_name_what_the_step_shows_with_an_override_each():
    from jointcli.answers import StepFacts, likely_causes

    balanced = ["pos", "neg"] * 30
    named = {"program.modules.0.instructions": "Classify the review as pos or neg."}
    # a weight step with enough steps, trained on balanced rows, instructions that name the labels: the model
    fine = StepFacts("w", balanced, "label", 24, 60, 24, trained=balanced, instructions=named, model="small")
    assert likely_causes(fine) == [
        "likely cause: none of those jointopt checks (24 optimizer steps on 60 rows, trained rows as balanced as "
        "the split, instructions that name the labels): the task may be beyond the model; test: a larger one, "
        "models.small.path=<a Hugging Face checkpoint folder>"
    ]
    assert likely_causes(StepFacts("p", balanced, "label", instructions=named)) == []  # no training to judge
    few = StepFacts("w", balanced, "label", steps=8, rows=60, floor=24, trained=balanced, instructions=named)
    assert likely_causes(few) == [
        "likely cause: 8 optimizer steps on 60 rows are too few to learn more than one answer; "
        "test: optimizers.w.train.steps=24"
    ]
    skewed = StepFacts("w", balanced, "label", steps=30, rows=49, floor=24, trained=["pos"] * 49, instructions=named)
    assert likely_causes(skewed) == [
        "likely cause: the weight step trained on rows that are 49 of 49 'pos' (1.00; the training split: 0.50); "
        "test: optimizers.w.traces.source=labels"
    ]


def test_instructions_that_do_not_name_the_labels_are_a_cause():
    from jointcli.answers import StepFacts, likely_causes

    gold = ["entailment", "not_entailment"] * 10
    half = {"program.modules.1.instructions": "Answer entailment when the second sentence follows."}
    (line,) = likely_causes(StepFacts("p", gold, "label", instructions=half))
    assert line == (
        "likely cause: the instructions do not name the labels (entailment, not_entailment); test: "
        "'program.modules.1.instructions=Answer entailment when the second sentence follows. Answer with one "
        "of: entailment, not_entailment.'"
    )
    both = {"program.modules.0.instructions": "Answer Entailment or not_entailment."}
    assert likely_causes(StepFacts("p", gold, "label", instructions=both)) == []
    own = {"the docstring of classify's signature in your program class": "Given the fields `a`, produce `label`."}
    (line,) = likely_causes(StepFacts(None, gold, "label", instructions=own))
    assert line.endswith("name them in the docstring of classify's signature in your program class")
    free_text = [f"answer {i}" for i in range(20)]  # not label-like: no label to name
    assert likely_causes(StepFacts("p", free_text, "label", instructions=own)) == []


def test_a_prompt_step_on_trained_weights_that_nothing_explains_points_at_the_model():
    from jointcli.answers import StepFacts, likely_causes

    gold = ["equivalent", "not_equivalent"] * 20
    named = {"program.modules.0.instructions": "Give the label: equivalent or not_equivalent."}
    assert likely_causes(StepFacts("p", gold, "label", instructions=named)) == []  # zero-shot: nothing trained
    (line,) = likely_causes(StepFacts("p", gold, "label", instructions=named, model="small", tuned=True))
    assert line.startswith("likely cause: none of those jointopt checks (training length, ")
    assert line.endswith(
        "the task may be beyond the model; test: a larger one, models.small.path=<a Hugging Face checkpoint folder>"
    )
