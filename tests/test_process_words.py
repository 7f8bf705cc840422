"""The product speaks of what is, not of how it came to be: no words of the development process in the
README, the documentation or the code ("stop 22", "(was 4)", "now the default", "the old recipe",
"trainer 2", "this session", "I saw"). A result says when and where it was measured; how it evolved
belongs to the commit log.

Each pattern names one habit and is narrow enough to leave ordinary prose alone: a past tense with a
number ("fp32 alone was 3.4x the naive engine") is a result, "(was 4)" is history.
"""

from __future__ import annotations

import re

import pytest

from .conftest import ROOT

PATTERNS = {
    "a numbered stop of the work": re.compile(r"\b[Ss]top \d{1,2}\b"),
    "a former value in parentheses": re.compile(r"\(was\b[^)]*\)"),
    "a former value after a comma": re.compile(r"[,;] was \d"),
    "a change of default": re.compile(r"\b[Nn]ow the default\b"),
    "a former recipe, quickstart or trainer": re.compile(r"\b[Tt]he old (recipe|quickstart|trainer|table)\b"),
    "a numbered trainer": re.compile(r"\b[Tt]rainers? v?\d\b"),
    "a work session": re.compile(
        r"\bsession \d+\b|\b(this|that|last|previous|next|an earlier|a later) session\b", re.I
    ),
    "a first-person observation": re.compile(r"\bI saw\b"),
}

HITS = [
    "Measured again (stop 22) after the change",
    "Stop 19 computed the prefix once",
    "`runtime.num_threads` 16 by default (was 4)",
    "419 s, was 657 s",
    "balance (now the default) is for",
    "2 epochs at 1e-3 (the old recipe's)",
    "the plan and the gradient are those of trainer 2",
    "measured in this session",
    "as session 12 found",
    "I saw the test score",
]
LEGITIMATE = [
    "schedule.patience: N stops after N steps in a row",
    "fp32 alone was 3.4-4.1x the naive engine",
    "bf16 training was 1.7x faster, but its adapters scored 0.72",
    "the test score of one tuning run was seen during tuning",
    "loaded once per test session",
    "requests.Session() keeps the connection",
    "the former recipe is kept as recipe.N.yaml",
    "each row stops at its own end (eos, stop string, max_tokens)",
    "a stop string or max_tokens 24",
    "the trainer computes the shared prefix once",
]


def scanned_files() -> list:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "docs").rglob("*.py"))]
    return docs + sorted((ROOT / "jointcli").rglob("*.py"))


def hits_in(text: str) -> list[str]:
    return [habit for habit, pattern in PATTERNS.items() if pattern.search(text)]


@pytest.mark.parametrize("text", HITS)
def test_each_pattern_finds_its_habit(text):
    assert hits_in(text), f"no pattern finds {text!r}"


@pytest.mark.parametrize("text", LEGITIMATE)
def test_no_pattern_finds_ordinary_prose(text):
    assert not hits_in(text), f"{hits_in(text)} finds ordinary prose: {text!r}"


def test_no_process_words_in_the_product():
    found = []
    for path in scanned_files():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for habit in hits_in(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {habit}: {line.strip()[:100]}")
    assert not found, "words of the development process:\n" + "\n".join(found)
