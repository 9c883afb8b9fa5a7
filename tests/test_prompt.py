"""Prompting pieces: templates, few-shot prompts, answer extraction (against lm-eval's
filters where it has one) and self-consistency's one majority vote."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lmlab.errors import UsageError
from lmlab.prompt.answers import (
    INVALID,
    canonical_number,
    extract_answer_is,
    extract_number,
    extract_regex,
    read_answer,
    strip_lower,
)
from lmlab.prompt.fewshot import build_prompt, few_shot_prompt, fewshot_context
from lmlab.prompt.reasoning import ZERO_SHOT_COT, majority_vote
from lmlab.prompt.templates import QUESTION_TEMPLATES, default_template, fill, render_jinja


@dataclass
class Ex:
    question: str
    answer: str
    rationale: str = ""


# --- templates and few-shot prompts ------------------------------------------------------------


def test_templates_fill_only_the_question_slot():
    assert fill("Q: {question} {x}\nA:", "What is {a}?") == "Q: What is {a}? {x}\nA:"
    assert default_template(chat=False) == QUESTION_TEMPLATES[0] == "Q: {question}\nA:"
    assert default_template(chat=True) == "{question}"
    assert all("{question}" in t for t in QUESTION_TEMPLATES)


def test_jinja_is_strict_and_keeps_the_trailing_newline():
    assert render_jinja("{{ q }} -> {{ a|upper }}\n", {"q": "x", "a": "y"}) == "x -> Y\n"
    with pytest.raises(Exception, match="'a' is undefined"):
        render_jinja("{{ a }}", {})


def test_prompts_from_any_question_answer_rationale_object():
    it, d = Ex("2 + 2?", "4"), Ex("1 + 1?", "2", "One and one make two. So the answer is 2.")
    assert build_prompt(it) == "Q: 2 + 2?\nA:"
    assert build_prompt(it, [d]) == "Q: 1 + 1?\nA: The answer is 2.\n\nQ: 2 + 2?\nA:"
    assert build_prompt(it, [d], cot=True).startswith(f"Q: 1 + 1?\nA: {d.rationale}\n\n")
    assert build_prompt(it, cot=True, chat=True) == [
        {"role": "user", "content": f"2 + 2? {ZERO_SHOT_COT}"}
    ]
    with pytest.raises(UsageError, match=r"\{question\}"):
        build_prompt(it, template="Q:")


def test_few_shot_prompt_and_lm_eval_context():
    shots = [{"question": "a?", "answer": "b"}]
    assert few_shot_prompt("c?", shots) == "Question: a?\nAnswer: b\n\nQuestion: c?\nAnswer:"
    assert few_shot_prompt("c?", []) == "Question: c?\nAnswer:"
    assert fewshot_context("q3", [("q1", "a1"), ("q2", "a2")], "D: ") == "D: q1 a1\n\nq2 a2\n\nq3"
    assert fewshot_context("q", [], "D: ", ":", "|") == "D: q"
    assert fewshot_context("q", [("x", "y")], "", ":", "|") == "x:y|q"


# --- answer extraction -------------------------------------------------------------------------


def test_extract_regex_matches_lm_eval_filter():
    extraction = pytest.importorskip("lm_eval.filters.extraction")
    texts = [
        "so 3 + 4 = 7. #### 7",
        "#### 1,234 and later #### -5",
        "no answer here",
        "The answer is (B) or maybe (C)",
        "",
    ]
    cases = [
        (r"#### (\-?[0-9\.\,]+)", 0),
        (r"#### (\-?[0-9\.\,]+)", -1),
        (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1),  # lm-eval gsm8k "flexible-extract"
        (r"\(([A-D])\)", 0),
    ]
    for pattern, group in cases:
        theirs = extraction.RegexFilter(regex_pattern=pattern, group_select=group)
        want = next(iter(theirs.apply([texts], [{}])))
        assert [extract_regex(t, pattern, group) for t in texts] == want, pattern
    assert extract_regex("#### 1", r"#### (\d)", group_select=3, fallback="none") == "none"
    with pytest.raises(UsageError, match="invalid regex"):
        extract_regex("x", "(")


def test_extract_answer_is():
    assert extract_answer_is("3 + 4 is 7. So the answer is 7.") == "7"
    assert extract_answer_is("First the answer is 2. No wait, the answer is 3.5.") == "3.5"
    assert extract_answer_is("The final answer is: **Paris**") == "Paris"
    assert extract_answer_is("Answer: B\nExplanation: because") == "B"
    assert extract_answer_is("I answered nothing") == INVALID
    assert extract_answer_is("no idea", fallback="") == ""


def test_extract_number():
    assert extract_number("She paid $1,234.50 for 3 items") == "1234.5"
    assert extract_number("It dropped to -12 degrees") == "-12"
    assert extract_number("pages 3-4") == "3"
    assert extract_number("x-5 is small") == "5"  # a hyphen inside a word is not a minus
    assert extract_number("0.25 then 42.", which="last") == "42"
    assert extract_number("total: 1,000,000 people") == "1000000"
    assert extract_number("3.0 apples") == "3"
    assert extract_number("no digits") == INVALID
    assert canonical_number("1,000.00") == canonical_number("1000") == "1000"
    assert canonical_number("-0") == "0" and canonical_number(" B ") == "B"
    assert strip_lower("  Paris \n") == "paris"
    with pytest.raises(UsageError, match="which"):
        extract_number("1", which="middle")


def test_read_answer_by_form():
    assert read_answer("So the answer is 1,234. Then 99", "integer") == "1234"
    assert read_answer("I think no... yes", "yes_no") == "yes"
    assert read_answer('So the answer is "t m r". More', "word") == "tmr"
    assert read_answer("The answer is A, b.", "comma_list") == "a, b"
    assert read_answer("Sorted:\nant bee\n\n", "word_list") == "ant bee"
    assert read_answer("nothing here", "integer") is None
    with pytest.raises(UsageError, match="answer form 'date'.*integer"):
        read_answer("x", "date")


# --- self-consistency ----------------------------------------------------------------------------


def test_majority_vote_ties_and_invalid():
    assert majority_vote(["7", "8", "7", "8", "9"]) == "7"  # tie: the first-seen answer wins
    assert majority_vote(["8", "7", "7", "8"]) == "8"
    assert majority_vote([INVALID, INVALID, "3"]) == "3"  # failed extractions do not vote
    assert majority_vote([INVALID, INVALID]) == INVALID
    selection = pytest.importorskip("lm_eval.filters.selection")
    for votes in (["a", "b", "b", "a"], ["x", "y", "z"], ["q", "r", "r"]):
        want = next(iter(selection.MajorityVoteFilter().apply([votes], [{}])))[0]
        assert majority_vote(votes) == want
    with pytest.raises(UsageError):
        majority_vote([])


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_order():
    assert majority_vote(["3", None, "4", "4"]) == "4"
    assert majority_vote(["5", "3", "3", "5"]) == "5"
    assert majority_vote([None, None]) is None


def test_majority_vote_none_and_failed_extractions_together():
    assert majority_vote([None, INVALID, "3", INVALID, None]) == "3"
    assert majority_vote([None, INVALID, None]) == INVALID  # nothing better: the failure
    assert majority_vote(["x", "y", "y"], ignore=("y",)) == "x"
