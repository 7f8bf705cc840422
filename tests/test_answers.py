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


def test_parse_failures_do_not_hide_a_collapse():
    rows = _rows([("positive", "positive"), ("negative", None), ("negative", "positive"), ("positive", None)])
    assert answer_warnings(answer_summary(rows, "sentiment"), [1.0, 0.0, 0.0, 0.0])[0].startswith("answers 'positive'")
