"""Model-based evaluation: position swapping cancels order bias, Elo by hand, and
Bradley-Terry recovering known strengths; a real judge model end to end."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab import load_model, load_tokenizer
from lmlab.eval.judge import bradley_terry, compare, elo, model_judge, outcomes, tournament

pytestmark = pytest.mark.usefixtures("one_thread")


def test_position_swap_cancels_a_judge_that_always_prefers_the_first():
    first_bias = lambda q, x, y: 0.9  # noqa: E731
    v = compare(first_bias, "q", {"m1": "yes", "m2": "no"}, "m1", "m2")
    assert v.p_a == pytest.approx(0.5) and v.winner == "tie"
    assert v.p_a_first == 0.9 and v.p_a_second == pytest.approx(0.1)


def test_a_consistent_judge_picks_the_longer_answer_in_either_order():
    longer = lambda q, x, y: 0.8 if len(x) > len(y) else 0.2  # noqa: E731
    answers = {"short": ["a", "b"], "long": ["a long answer", "another long one"]}
    verdicts = tournament(longer, ["q1", "q2"], answers)
    assert [v.winner for v in verdicts] == ["long", "long"]
    assert outcomes(verdicts) == [("short", "long", 0.0), ("short", "long", 0.0)]


def test_elo_by_hand():
    r = elo([("a", "b", 1.0)], k=32, permutations=1)
    assert r == {"a": 1016.0, "b": 984.0}
    r = elo([("a", "b", 1.0), ("a", "b", 0.0)], k=32, permutations=1)
    # second match: expected score of a is 1/(1+10^(-32/400))
    e = 1 / (1 + 10 ** (-32 / 400))
    assert r["a"] == pytest.approx(1016 - 32 * e)
    assert r["a"] + r["b"] == pytest.approx(2000)


def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(0)
    true = {"x": 1200.0, "y": 1000.0, "z": 800.0}
    matches = []
    for _ in range(3000):
        a, b = rng.choice(list(true), 2, replace=False)
        p = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
        matches.append((str(a), str(b), float(rng.random() < p)))
    bt = bradley_terry(matches)
    for n in true:
        assert bt[n] == pytest.approx(true[n], abs=30)
    e = elo(matches, k=8, permutations=20)
    assert e["x"] > e["y"] > e["z"]


def test_a_real_judge_model_gives_probabilities(smoke_run):
    ckpt = smoke_run / "pretrain" / "model"
    judge = model_judge(load_model(ckpt), load_tokenizer(ckpt))
    p = judge("What does len return?", "the number of items", "a banana")
    assert 0.0 < p < 1.0
    v = compare(judge, "q", {"a": "the number of items", "b": "a banana"}, "a", "b")
    assert v.p_a == pytest.approx((v.p_a_first + v.p_a_second) / 2)


def test_judge_command_rates_checkpoints(smoke_run, tmp_path):
    import json

    from .conftest import lmlab_cmd

    qs = tmp_path / "q.jsonl"
    qs.write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in ("What is len?", "What is os?"))
    )
    out = tmp_path / "judge.json"
    base, sft = smoke_run / "pretrain" / "model", smoke_run / "sft" / "model"
    p = lmlab_cmd(
        "judge",
        "--judge",
        str(sft),
        "--model",
        str(base),
        "--model",
        str(sft),
        "--questions",
        str(qs),
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
        cwd=tmp_path,
        check=True,
    )
    res = json.loads(out.read_text())
    assert len(res["verdicts"]) == 2  # one pair, two questions
    for v in res["verdicts"]:
        assert v["p_a"] == pytest.approx((v["p_a_first"] + v["p_a_second"]) / 2)
    games = sum(r["wins"] + r["ties"] + r["losses"] for r in res["record"].values())
    assert games == 4 and set(res["elo"]) == {str(base), str(sft)}
    assert "Bradley-Terry" in p.stdout
    bad = lmlab_cmd(
        "judge", "--judge", str(sft), "--model", str(base), "--questions", str(qs), cwd=tmp_path
    )
    assert bad.returncode == 2 and "two" in bad.stderr
