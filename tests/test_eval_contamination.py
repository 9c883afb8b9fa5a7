"""Evaluation-time contamination: items found in training documents by the data stage's
n-gram index, and metrics on all items versus the clean subset."""

from __future__ import annotations

import json

import pytest

from lmlab.errors import UsageError
from lmlab.eval.contamination import contaminated_items, split_by_contamination

LEAK = "what does the function frobnicate return when the widget queue is empty and closed"
ITEMS = [
    ("q1", LEAK + " answer: none"),
    ("q2", "which module parses command line arguments in the standard library answer argparse"),
    ("q3", "short item"),
]


def write_docs(path, docs):
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    return path


def test_items_found_in_training_documents(tmp_path):
    train = write_docs(
        tmp_path / "train.jsonl",
        [
            ("d1", "Intro text. " + LEAK.upper() + " and more text after it."),
            ("d2", "nothing to see here, just some unrelated words about cooking pasta"),
            ("d3", "the test said: short item, then moved on"),  # a short item matches whole
        ],
    )
    found = contaminated_items(ITEMS, [train], ngram=13)
    assert found == {"q1": ["d1"], "q3": ["d3"]}
    # a stricter overlap requirement drops the one-n-gram match of the short item
    assert "q3" not in contaminated_items(ITEMS, [train], ngram=13, min_overlaps=2)


def test_metrics_on_all_and_clean_items():
    records = [{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}, {"acc": 0.0}]
    ids = ["a", "b", "c", "d"]
    out = split_by_contamination(records, ids, {"a": ["doc"], "c": ["doc"]}, "acc")
    assert out["all"]["value"] == 0.5 and out["all"]["n"] == 4
    assert out["clean"]["value"] == 0.0 and out["clean"]["n"] == 2
    assert out["contaminated"]["value"] == 1.0 and out["contaminated"]["n"] == 2


def test_missing_or_malformed_training_files(tmp_path):
    with pytest.raises(UsageError, match="do not exist"):
        contaminated_items(ITEMS, [tmp_path / "nope.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "x"}\n{oops\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        contaminated_items(ITEMS, [bad])
