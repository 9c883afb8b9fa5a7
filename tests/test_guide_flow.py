"""Yang et al. 2023 Fig. 2 as lmlab walks it: every leaf of the figure reached by its own
path, the figure's questions in the figure's order, and answers checked."""

from __future__ import annotations

import json

import pytest

from lmlab.errors import UsageError
from lmlab.guide.flow import decide, load_flow
from tests.conftest import lmlab_here

ORDER = [
    "mimic_human", "emergent", "multiple_tasks", "far_from_lm", "few_labels", "ood",
    "creative", "knowledge", "context_knowledge", "counterfactual",
]  # fmt: skip


def path_to(last: str, yes_at_last: bool) -> dict:
    """Answers that say no until `last`, then `yes_at_last` there."""
    answers: dict = {}
    for qid in ORDER:
        if qid == last:
            answers[qid] = yes_at_last
            return answers
        # knowledge-intensive and context questions lead on only by their other branch
        answers[qid] = qid == "knowledge"
    raise AssertionError(last)


# (last question, its answer) -> (leaf, Remark): the eleven leaves of Fig. 2
LEAVES = [
    (("mimic_human", True), ("llm", 6)),
    (("emergent", True), ("llm", 5)),
    (("multiple_tasks", True), ("llm", 7)),
    (("far_from_lm", True), ("fine-tuned", 6)),
    (("few_labels", True), ("llm", 1)),
    (("ood", True), ("llm", 1)),
    (("creative", True), ("llm", 3)),
    (("knowledge", False), ("fine-tuned", 2)),
    (("context_knowledge", True), ("fine-tuned", 4)),
    (("counterfactual", True), ("none", 4)),
    (("counterfactual", False), ("llm", 4)),
]


@pytest.mark.parametrize(("where", "expected"), LEAVES, ids=[f"{w[0]}-{w[1]}" for w, _ in LEAVES])
def test_every_leaf_of_fig_2(where, expected):
    last, answer = where
    answers = path_to(last, answer)
    if last == "knowledge":
        answers["knowledge"] = False
    rec = decide(answers)
    assert (rec.recommendation, rec.remark) == expected
    assert [s.id for s in rec.path] == list(answers)  # the questions asked, in order
    assert rec.path[-1].answer is answer
    assert rec.commands and all(c.startswith("lmlab ") for c in rec.commands)
    assert "§" in rec.remark_text


def test_the_flow_follows_the_figures_order_and_every_question_is_reached():
    flow = load_flow()
    assert list(flow["questions"]) == ORDER and flow["start"] == ORDER[0]
    figure = [q["figure"] for q in flow["questions"].values()]
    assert figure[0] == "Mimicking human (e.g. chatbot)"
    assert figure[-1] == "Required knowledge inconsistent with the real world"
    leaves = [
        (qid, b) for qid, q in flow["questions"].items() for b in (True, False)
        if isinstance(q[b], dict)
    ]  # fmt: skip
    assert len(leaves) == len(LEAVES)


def test_cost_sensitive_answers_bring_remark_8_peft_and_the_cost_estimate():
    answers = {**path_to("knowledge", False), "knowledge": False, "cost_sensitive": "yes"}
    rec = decide(answers)
    assert any(n.startswith("Remark 8") for n in rec.notes)
    assert any("--peft lora:r=8" in c for c in rec.commands)
    assert any(c.startswith("lmlab guide cost") for c in rec.commands)
    plain = decide({**answers, "cost_sensitive": False})
    assert not any("--peft" in c for c in plain.commands)


def test_missing_answers_are_asked_then_refused_without_a_terminal():
    asked = []

    def ask(qid, question):
        asked.append(qid)
        return qid == "creative"

    rec = decide({"mimic_human": False}, ask)
    assert rec.recommendation == "llm" and rec.remark == 3
    assert asked == ORDER[1:7] + ["cost_sensitive"]
    with pytest.raises(UsageError, match="no answer for 'emergent'"):
        decide({"mimic_human": False})
    with pytest.raises(UsageError, match="unknown key 'mimic'"):
        decide({"mimic": True})
    with pytest.raises(UsageError, match="expected yes/no"):
        decide({"mimic_human": "perhaps"})


def test_lmlab_guide_answers_json(tmp_path, monkeypatch, capsys):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(path_to("ood", True)))
    code, out, err = lmlab_here(monkeypatch, capsys, "guide", "--answers", str(f), "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["recommendation"] == "llm" and rec["remark"] == 1
    assert [s["id"] for s in rec["path"]] == ORDER[:6]
    f.write_text("[1, 2]")
    code, _, err = lmlab_here(monkeypatch, capsys, "guide", "--answers", str(f))
    assert code == 2 and "JSON object" in err
