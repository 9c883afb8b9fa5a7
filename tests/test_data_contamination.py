"""Contamination: n-gram overlap between training documents and evaluation items."""

import json
import random

import pytest
from pydantic import TypeAdapter, ValidationError

from lmlab.data.contamination import (
    ContaminationConfig,
    build_index,
    find,
    load_index,
    save_index,
    summarize,
    words,
)
from lmlab.errors import UsageError

QUESTION = (
    "Which planet in the solar system has the largest number of confirmed moons "
    "orbiting it as of the most recent survey by astronomers?"
)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def eval_file(tmp_path):
    return _write(
        tmp_path / "eval.jsonl",
        [
            {"id": "q1", "question": QUESTION, "answer": "Saturn"},
            {
                "id": "q2",
                "prompt": "Translate 'good morning' into French.",
                "completion": "Bonjour",
            },
            {"question": "What is two plus two?", "choices": ["3", "4", "5"]},  # short item
        ],
    )


def test_planted_13gram_is_found_despite_case_and_punctuation(eval_file):
    index = build_index([eval_file], ContaminationConfig())
    w = QUESTION.split()
    planted = " ".join(w[3:16]).upper().replace(" ", ", ")  # 13 words, other case, commas
    doc = f"Some unrelated preamble text.\n{planted}!\nAnd an unrelated ending."
    (m,) = find(doc, index)
    assert (m.item_id, m.eval_file, m.ngram_count) == ("q1", str(eval_file), 1)
    assert doc[m.first_offset :].startswith("THE, SOLAR, SYSTEM")
    assert m.snippet.startswith("THE, SOLAR") and m.snippet.endswith("IT, AS")
    # 12 shared words are not enough; the whole question shares all its 13-grams
    assert find(" ".join(w[3:15]), index) == []
    assert find(QUESTION, index)[0].ngram_count == len(w) - 13 + 1


def test_short_items_are_indexed_whole(eval_file):
    index = build_index([eval_file], ContaminationConfig())
    assert index.lengths == (6, 8, 13)  # "translate good morning ... bonjour", "what ... 5"
    (m,) = find("quiz: WHAT is two-plus-two? 3, 4... 5.", index)
    assert m.item_id == "eval.jsonl:3"


def test_matches_a_brute_force_reference(tmp_path):
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(30)]
    items = [" ".join(rng.choices(vocab, k=rng.randint(3, 25))) for _ in range(40)]
    docs = [
        " ".join(rng.choices(vocab, k=60) + items[i].split() + rng.choices(vocab, k=5))
        for i in range(0, 40, 3)
    ] + [" ".join(rng.choices(vocab, k=200)) for _ in range(5)]
    n = 6

    def grams(ws, k):
        return [tuple(ws[i : i + k]) for i in range(len(ws) - k + 1)]

    def reference(doc):
        dw = doc.split()
        out = {}
        for i, item in enumerate(items):
            iw = item.split()
            mine = set(grams(iw, min(n, len(iw))))
            count = sum(g in mine for g in grams(dw, min(n, len(iw))))
            if count:
                out[f"i{i}"] = count
        return out

    rows = [{"id": f"i{i}", "text": t} for i, t in enumerate(items)]
    index = build_index([_write(tmp_path / "e.jsonl", rows)], ContaminationConfig(ngram=n))
    for doc in docs:
        assert {m.item_id: m.ngram_count for m in find(doc, index)} == reference(doc)


def test_index_round_trip(eval_file, tmp_path):
    index = build_index([eval_file], ContaminationConfig(ngram=8))
    save_index(index, tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert (loaded.hashes == index.hashes).all() and (loaded.items == index.items).all()
    assert loaded.vocab == index.vocab and loaded.item_ids == index.item_ids
    assert loaded.lengths == index.lengths and loaded.n == 8
    doc = "notes: " + QUESTION.lower() + " Translate 'good morning' into French. Bonjour!"
    assert find(doc, loaded) == find(doc, index) and len(find(doc, index)) == 2
    with pytest.raises(UsageError, match="not a contamination index"):
        load_index(tmp_path / "nothing")


def test_bad_lines_are_skipped_with_a_warning_naming_the_line(tmp_path, capsys):
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"id": "ok", "question": QUESTION},
            "{not json",
            {"id": "nofield", "label": 3},
            "[1, 2]",
            {"id": "ok", "answer": "a duplicate id gets the file and line as its id"},
        ],
    )
    index = build_index([path], ContaminationConfig())
    err = capsys.readouterr().err
    assert f"{path}:2" in err and "malformed JSON" in err
    assert f"{path}:3" in err and f"{path}:4" in err
    assert index.item_ids == ["ok", f"{path}:5"]
    with pytest.raises(UsageError, match="does not exist"):
        build_index([tmp_path / "missing.jsonl"], ContaminationConfig())
    with pytest.raises(UsageError, match="no usable items"):
        build_index([_write(tmp_path / "empty.jsonl", ["{}"])], ContaminationConfig())


def test_summarize_lists_documents_per_item(eval_file):
    index = build_index([eval_file], ContaminationConfig())
    by_doc = {
        "d1": find(QUESTION, index),
        "d2": find("x " + QUESTION + " what is two plus two 3 4 5", index),
        "d3": find("nothing in common", index),
    }
    s = summarize(by_doc)
    assert list(s) == ["q1", "eval.jsonl:3"]
    assert s["q1"]["documents"] == ["d1", "d2"]
    assert s["q1"]["ngram_count"] == 2 * (len(QUESTION.split()) - 12)
    assert s["eval.jsonl:3"] == {"eval_file": str(eval_file), "documents": ["d2"], "ngram_count": 1}


def test_normalisation_and_config():
    assert words("Don't STOP—the_end, 3.14!") == ["don", "t", "stop", "the", "end", "3", "14"]
    TypeAdapter(ContaminationConfig).validate_python({"ngram": 8, "action": "drop"})
    for bad in ({"action": "remove"}, {"ngram": 0}, {"fieldz": ["q"]}):
        with pytest.raises(ValidationError):
            TypeAdapter(ContaminationConfig).validate_python(bad)
