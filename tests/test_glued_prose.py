"""The chapters' prose stays true for every seed: each sentence with glued values is rendered with the
values seeds 0, 1 and 2 gave (``make spread``: book/_static/seed_spread*.json) and checked by rules
that can read it: counts ("3 of 5"), "at most" distances, rises and falls, interval ends, and signed
gains.  A sentence whose glued names the spread does not hold is checked as far as it is rendered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPREADS = [ROOT / "book" / "_static" / name for name in ("seed_spread.json", "seed_spread_real.json")]
GLUE = re.compile(r"\{glue:text\}`([^`]+)`")
WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
UNSIGNED = r"\d[\d,]*(?:\.\d+)?"
NUMBER = rf"[-+−]?{UNSIGNED}"


def _number(text: str) -> float:
    return float(text.replace(",", "").replace("−", "-"))


def _count(text: str) -> float:
    return float(WORDS[text.lower()]) if text.lower() in WORDS else _number(text)


def _count_rule(sentence):
    count = rf"({UNSIGNED}|{'|'.join(WORDS)})"  # unsigned numbers or number words
    for m in re.finditer(rf"\b{count} of (?:the |its |their |all |these )?{count}\b", sentence, re.I):
        if _count(m.group(1)) > _count(m.group(2)):
            yield f"{m.group(0)!r}: a part larger than its whole"


def _at_most_rule(sentence):
    for m in re.finditer(rf"\bat (?:most|least) ({NUMBER})(?: points?)? (?:below|above|behind|ahead)", sentence):
        if _number(m.group(1)) < 0:
            yield f"{m.group(0)!r}: a distance below zero"


def _trend_rule(sentence):
    up, down = r"rises|rose|grows|grew|increases|climbs", r"falls|fell|drops|dropped|decreases|shrinks"
    # "falls from 0.76 teacher-forced to 0.40 generated": up to two words after each number
    for m in re.finditer(rf"\b({up}|{down}) from ({NUMBER})%?(?: [a-z-]+){{0,2}} to ({NUMBER})", sentence):
        a, b = _number(m.group(2)), _number(m.group(3))
        if (re.fullmatch(up, m.group(1)) and b < a) or (re.fullmatch(down, m.group(1)) and b > a):
            yield f"{m.group(0)!r}: the numbers move the other way"


def _interval_rule(sentence):
    for m in re.finditer(rf"\[({NUMBER}), ({NUMBER})\]|interval,? ({NUMBER}) to ({NUMBER})", sentence):
        low, high = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if _number(low) > _number(high):
            yield f"{m.group(0)!r}: the interval's low end is above its high end"


def _sign_rule(sentence):
    for m in re.finditer(rf"\ba (gain|rise|loss|drop|fall) of ({NUMBER})", sentence, re.I):
        if _number(m.group(2)) < 0:  # the word carries the direction: "a gain of -3", "a drop of -2"
            yield f"{m.group(0)!r}: a signed amount that contradicts its word"


RULES = (_count_rule, _at_most_rule, _trend_rule, _interval_rule, _sign_rule)


def violations(sentence: str) -> list[str]:
    return [problem for rule in RULES for problem in rule(sentence)]


def _render(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def sentences(markdown: str) -> list[str]:
    """The sentences of a markdown cell that glue a value, on one line each."""
    text = " ".join(markdown.split())
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z*(])", text) if GLUE.search(s)]


def rendered(spread: dict) -> list[tuple[str, int, str]]:
    """(chapter, seed, sentence) for every glued sentence of every chapter the spread measured."""
    values: dict[tuple[str, str], dict] = {(q["chapter"], q["name"]): q["values"] for q in spread["quantities"]}
    out = []
    for chapter in sorted({c for c, _ in values}):
        nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
        for cell in (c for c in nb.cells if c.cell_type == "markdown"):
            for sentence in sentences(cell.source):
                for seed in spread["seeds"]:
                    def value(m, seed=str(seed)):
                        by_seed = values.get((chapter, m.group(1)), {})
                        return _render(by_seed[seed]) if seed in by_seed else f"<{m.group(1)}>"
                    out.append((chapter, seed, GLUE.sub(value, sentence)))
    return out


def test_the_rules_catch_what_they_should():
    """Not vacuous: each rule flags its kind of false sentence and passes the true one."""
    false = ["InstructEdit wins at least 9 of its six tasks.", "Their reliability is at most -0.3 points below.",
             "Reliability rises from 0.52 to 0.31 with more tasks.", "The 95% interval [0.4, -0.1] is wide.",
             "A gain of -3.0 points, within the noise.", "The overlap falls from 0.2 to 0.5.",
             "Portability falls from 0.40 teacher-forced to 0.76 generated."]
    true = ["InstructEdit wins 6 of its nine tasks.", "Their reliability is at most 0.3 points below.",
            "Reliability rises from 0.31 to 0.52.", "The 95% interval [-0.1, 0.4] is wide.",
            "A gain of +3.0 points.", "The overlap falls from 0.5 to 0.2.", "Chapter 5 of 10 tables."]
    assert all(violations(s) for s in false), [s for s in false if not violations(s)]
    assert not any(violations(s) for s in true), [violations(s) for s in true]


def test_sentences_are_split_and_rendered(tmp_path):
    text = "The first has {glue:text}`n` of {glue:text}`m` cases.\nA plain one. It rises from {glue:text}`a` to 2."
    assert sentences(text) == ["The first has {glue:text}`n` of {glue:text}`m` cases.",
                               "It rises from {glue:text}`a` to 2."]
    assert _render(1300) == "1,300" and _render(0.25) == "0.25" and _render("partly") == "partly"


@pytest.mark.parametrize("path", SPREADS, ids=lambda p: p.stem)
def test_glued_sentences_hold_for_every_recorded_seed(path):
    spread = json.loads(path.read_text())
    checked = rendered(spread)
    assert len(checked) > 100, "the spread should cover the chapters' glued prose"
    problems = [f"{chapter}, seed {seed}: {p}\n  {sentence}" for chapter, seed, sentence in checked
                for p in violations(sentence)]
    assert not problems, "\n".join(problems)
