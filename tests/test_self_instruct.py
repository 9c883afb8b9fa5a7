"""Self-instruct: the paper's novelty filter (ROUGE-L, as rouge-score computes it), the
seed formats, and the command writing Alpaca records that `lmlab sft --data` reads."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from lmlab.adapt.instruct import read_examples
from lmlab.adapt.self_instruct import read_seeds, why_rejected
from tests.conftest import lmlab_here
from tests.serving import scripted_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_filter():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = ["Write a short poem about the sea.", "List three uses of a paper clip."]
    assert why_rejected("Write a short poem about the ocean.", pool, scorer, 0.7) == "similar"
    f = scorer.score(pool[0], "Write a short poem about the ocean.")["rougeL"].fmeasure
    assert f >= 0.7  # the reason is the score rouge-score gives
    assert why_rejected("Explain how a bicycle gear works.", pool, scorer, 0.7) is None
    assert why_rejected("Hi", pool, scorer, 0.7) == "length"
    assert why_rejected("Draw a picture of a happy cat please.", pool, scorer, 0.7) == "unsuitable"


def test_seeds_and_the_command(tmp_path, monkeypatch, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        json.dumps({"instruction": "Write a short poem about the sea."}) + "\n"
        + "List three uses of a paper clip.\n"
    )  # fmt: skip
    assert read_seeds(seeds) == [
        "Write a short poem about the sea.",
        "List three uses of a paper clip.",
    ]
    # a model whose every reply is one fixed new task: kept once, then too similar
    reply = ["Explain ", "how a bicycle ", "gear works ", "in two sentences."]
    ckpt = scripted_checkpoint(tmp_path / "m", reply)
    out = tmp_path / "new.jsonl"
    code, stdout, err = lmlab_here(
        monkeypatch, capsys, "self-instruct", str(ckpt), "--seeds", str(seeds), "--out", str(out),
        "--n", "3", "--batch", "2", "--max-new-tokens", "12",
    )  # fmt: skip
    assert code == 0, err
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["instruction"] for r in recs] == ["".join(reply)]  # the repeats were rejected
    assert "too similar" in err
    assert read_examples(out)[0][0]["content"] == "".join(reply)  # what sft --data reads
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "x"}\n')
    code, _, err = lmlab_here(
        monkeypatch,
        capsys,
        "self-instruct",
        str(ckpt),
        "--seeds",
        str(bad),
        "--out",
        str(tmp_path / "o.jsonl"),
    )
    assert code == 2 and "bad.jsonl:1: field 'instruction'" in err
