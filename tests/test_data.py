import json

from lmlab.data.filters import normalize
from lmlab.data.pipeline import load_config, prepare, split_of
from lmlab.data.sources import module_name, read_stdlib


def _words(n: int, word: str = "alpha") -> str:
    return " ".join(f"{word}{i % 7}" for i in range(n))


def test_normalize_unifies_newlines_trailing_space_and_nfc():
    assert normalize("a  \r\nb\t\r\n\n\n\n\nc") == "a\nb\n\n\nc\n"
    assert normalize("cafe\u0301") == "caf\u00e9\n"
    assert normalize("  \n \n") == ""


def test_stdlib_corpus_has_modules_and_topics():
    docs = read_stdlib()
    first = [next(docs) for _ in range(5)]
    assert all(d.id.startswith("stdlib:") and d.metadata["module"] for d in first)
    ids = {d.id for d in read_stdlib(include_topics=True)}
    assert "stdlib:json/decoder.py" in ids
    assert any(i.startswith("pydoc:") for i in ids)
    assert not any("/test/" in i or "site-packages" in i for i in ids)
    assert module_name(__import__("pathlib").Path("json/__init__.py")) == "json"


def test_split_is_deterministic_by_id():
    assert split_of("stdlib:a.py", 0.5) == split_of("stdlib:a.py", 0.5)
    vals = sum(split_of(f"doc{i}", 0.2) == "val" for i in range(2000))
    assert 300 < vals < 500


def test_prepare_writes_documents_removed_and_stats_and_counts_bad_lines(tmp_path):
    src = tmp_path / "in.jsonl"
    good = _words(80)
    rows = [
        {"id": "a", "text": good},
        {"id": "b", "text": good},  # exact duplicate
        {"id": "c", "text": "too short"},
        {"id": "d", "text": _words(90, "beta")},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    cfg = load_config(
        {
            "sources": [{"name": "in", "paths": [str(src)]}],
            "steps": [{"gopher_quality": {"min_doc_words": 20}}, "dedup_exact"],
            "profile": "code",
            "workers": 1,
        },
        "test",
    )
    stats = prepare(cfg, tmp_path / "out")
    kept = [
        json.loads(x) for x in (tmp_path / "out/documents/train.jsonl").read_text().splitlines()
    ]
    assert [d["id"] for d in kept] == ["a", "d"]
    removed = [
        json.loads(x) for x in (tmp_path / "out/removed/removed.jsonl").read_text().splitlines()
    ]
    assert {d["id"]: d["metadata"]["reason"] for d in removed} == {
        "b": "dedup_exact:duplicate",
        "c": "gopher_quality:min_words",
    }
    assert stats["read"]["skipped"] == {"malformed_json": 1}
    assert stats["read"]["examples"]["malformed_json"] == [f"{src}:5"]
    on_disk = json.loads((tmp_path / "out/stats.json").read_text())
    assert on_disk["kept"]["train"]["documents"] == 2
