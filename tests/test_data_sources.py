"""Readers: every format round-trips ids/text/metadata, bad input is counted and warned with
file:line without stopping the read, and memory stays bounded while streaming."""

from __future__ import annotations

import csv
import datetime
import gzip
import json
import pickle
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from lmlab.data import sources
from lmlab.data.sources import (
    ReadStats,
    SourceConfig,
    Task,
    detect_format,
    list_tasks,
    read_all,
    read_path,
    read_stdlib,
    read_task,
)
from lmlab.errors import UsageError


@pytest.fixture(autouse=True)
def warnings(monkeypatch) -> list[str]:
    """Every warning the readers print, in order (and the per-process caps reset)."""
    seen: list[str] = []
    monkeypatch.setattr(sources.base, "warn", seen.append)
    monkeypatch.setattr(sources.base, "_warned_in_process", Counter())
    return seen


def read(*paths: Path | str, **kw) -> tuple[list, ReadStats]:
    cfg = SourceConfig(paths=[str(p) for p in paths], **kw)
    stats = ReadStats()
    return list(read_all(cfg, stats)), stats


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"id": "a1", "text": "first document", "metadata": {"url": "http://a"}, "lang": "en"},
    {"id": 7, "text": "second, int id", "score": 0.5},
    {"text": "third, no id"},
]


# ---------------------------------------------------------------- tasks


def test_detect_format_by_suffix():
    expect = {
        "a.txt": "text",
        "a.md": "text",
        "a.rst": "text",
        "a.py": "text",
        "page.html": "text",
        "page.htm": "text",
        "README": "text",
        "a.jsonl": "jsonl",
        "a.json.gz": "jsonl",
        "a.jsonl.gz": "jsonl",
        "a.jsonl.zst": "jsonl",
        "a.json.zst": "jsonl",
        "a.ndjson": "jsonl",
        "A.JSONL.XZ": "jsonl",
        "a.parquet": "parquet",
        "a.csv": "csv",
        "a.tsv": "csv",
        "a.tsv.gz": "csv",
        "notes.txt.gz": "text",
    }
    assert {name: detect_format(name) for name in expect} == expect


def test_list_tasks_walks_directories_sorted_and_skips_hidden(tmp_path):
    for rel in ["b/2.txt", "b/10.jsonl", "a.csv", "z.parquet", ".hidden.txt", ".git/x.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    tasks = list_tasks(SourceConfig(paths=[str(tmp_path), str(tmp_path / "a.csv")]))
    got = [(Path(t.source_path).relative_to(tmp_path).as_posix(), t.format) for t in tasks]
    # sorted by path parts, hidden entries left out, a path named twice read once
    assert got == [
        ("a.csv", "csv"),
        ("b/10.jsonl", "jsonl"),
        ("b/2.txt", "text"),
        ("z.parquet", "parquet"),
    ]
    forced = list_tasks(SourceConfig(paths=[str(tmp_path / "b")], format="text"))
    assert {t.format for t in forced} == {"text"}


def test_missing_path_and_bad_options_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="nope.jsonl does not exist"):
        list_tasks(SourceConfig(paths=[str(tmp_path / "nope.jsonl")]))
    with pytest.raises(UsageError, match="format must be 'auto' or 'hf'"):
        list_tasks(SourceConfig(paths=["hf:someone/data"], format="jsonl"))
    with pytest.raises(UsageError, match="csv_delimiter"):
        SourceConfig(paths=["x"], csv_delimiter=";;")
    with pytest.raises(UsageError, match="paths must be"):
        SourceConfig(paths=["a.txt"], format="stdlib")
    with pytest.raises(UsageError, match="paths is empty"):
        SourceConfig(paths=[])


def test_source_config_is_validated_strictly():
    from pydantic import TypeAdapter, ValidationError

    ta = TypeAdapter(SourceConfig)
    cfg = ta.validate_python({"paths": ["x.txt"], "unit": "line", "max_line_chars": 5})
    assert cfg.unit == "line" and cfg.max_line_chars == 5
    for bad in ({"paths": ["x"], "unit": "word"}, {"paths": ["x"], "max_line_chars": 0}):
        with pytest.raises(ValidationError):
            ta.validate_python(bad)
    with pytest.raises(ValidationError, match="txt_field"):
        ta.validate_python({"paths": ["x"], "txt_field": "body"})


def test_tasks_and_stats_pickle_for_worker_processes():
    task = Task("a.jsonl", "jsonl")
    assert pickle.loads(pickle.dumps(task)) == task
    stats = ReadStats(documents=3, chars=10, skipped={"malformed_json": 2})
    assert pickle.loads(pickle.dumps(stats)).to_dict() == stats.to_dict()


# ---------------------------------------------------------------- formats


def test_text_units_file_line_paragraph(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_bytes(b"\xef\xbb\xbfpara one\nstill one\n\n\n  \npara two\r\n\nlast\n")
    docs, stats = read(f)
    assert [(d.id, d.text) for d in docs] == [
        (str(f), "para one\nstill one\n\n\n  \npara two\r\n\nlast\n")
    ]
    assert docs[0].metadata == {"source": "text", "path": str(f)}

    docs, _ = read(f, unit="line")
    assert [(d.id, d.text, d.metadata["line"]) for d in docs] == [
        (f"{f}:1", "para one", 1),
        (f"{f}:2", "still one", 2),
        (f"{f}:6", "para two", 6),
        (f"{f}:8", "last", 8),
    ]
    docs, stats = read(f, unit="paragraph")
    assert [(d.id, d.text, d.metadata["line"]) for d in docs] == [
        (f"{f}#0", "para one\nstill one", 1),
        (f"{f}#1", "para two", 6),
        (f"{f}#2", "last", 8),
    ]
    assert stats.documents == 3 and stats.chars == sum(len(d.text) for d in docs)
    assert stats.skipped == {}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.bz2"])
def test_jsonl_round_trip_plain_and_compressed(tmp_path, suffix):
    body = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    f = tmp_path / f"part{suffix}"
    if suffix.endswith(".gz"):
        f.write_bytes(gzip.compress(body))
    elif suffix.endswith(".zst"):
        zstandard = pytest.importorskip("zstandard")

        # two frames: a concatenated .zst is read across frames
        c = zstandard.ZstdCompressor()
        f.write_bytes(c.compress(body[:40]) + c.compress(body[40:]))
    elif suffix.endswith(".bz2"):
        import bz2

        f.write_bytes(bz2.compress(body))
    else:
        f.write_bytes(body)
    docs, stats = read(f)
    assert [d.id for d in docs] == ["a1", "7", f"{f}:3"]  # input ids kept, as strings
    assert [d.text for d in docs] == [r["text"] for r in ROWS]
    assert docs[0].metadata == {
        "source": "jsonl",
        "path": str(f),
        "line": 1,
        "url": "http://a",
        "lang": "en",
    }
    assert docs[1].metadata["score"] == 0.5
    assert stats.documents == 3 and stats.skipped == {}


def test_jsonl_custom_fields_and_row_metadata_wins(tmp_path):
    f = write_jsonl(
        tmp_path / "c.jsonl",
        [{"doc_id": "x", "body": "hello", "metadata": {"source": "stdlib", "path": "json/x.py"}}],
    )
    docs, _ = read(f, text_field="body", id_field="doc_id")
    assert docs[0].id == "x" and docs[0].text == "hello"
    # a re-read of lmlab's own output keeps the original provenance
    assert docs[0].metadata["source"] == "stdlib" and docs[0].metadata["path"] == "json/x.py"


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    f = tmp_path / "p.parquet"
    table = pa.table(
        {
            "id": ["r0", None, "r2"],
            "text": ["alpha", "beta", None],
            "n": [1, 2, 3],
            "when": pa.array([datetime.date(2024, 1, d) for d in (1, 2, 3)]),
            "blob": [b"\x00", b"\x01", b"\x02"],
            "metadata": [{"url": "u0"}, {"url": "u1"}, {"url": "u2"}],
        }
    )
    pq.write_table(table, f, row_group_size=2)
    docs, stats = read(f)
    assert [(d.id, d.text) for d in docs] == [("r0", "alpha"), (f"{f}#1", "beta")]
    assert docs[0].metadata == {
        "source": "parquet",
        "path": str(f),
        "row": 0,
        "n": 1,
        "when": "2024-01-01",
        "url": "u0",
    }  # binary column left out, struct metadata merged, date as a string
    assert stats.skipped == {"non_string_text": 1}
    assert stats.examples["non_string_text"] == [f"{f}#2"]


@pytest.mark.parametrize("suffix,delim", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_round_trip(tmp_path, suffix, delim):
    f = tmp_path / f"t{suffix}"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=delim)
        w.writerow(["id", "text", "lang"])
        w.writerow(["c1", "one line", "en"])
        w.writerow(["", 'two\nlines, "quoted"', "fr"])
        w.writerow(["c3", "tab\there" if delim == "," else "comma, here", "de"])
    docs, stats = read(f)
    assert [d.id for d in docs] == ["c1", f"{f}#1", "c3"]
    assert docs[1].text == 'two\nlines, "quoted"'
    assert [d.metadata["line"] for d in docs] == [2, 3, 5]  # the line each record starts on
    assert docs[0].metadata == {"source": "csv", "path": str(f), "line": 2, "lang": "en"}
    assert stats.skipped == {}
    # an explicit delimiter overrides the suffix
    g = tmp_path / "semi.csv"
    g.write_text("text;id\nsemi;s1\n")
    docs, _ = read(g, csv_delimiter=";")
    assert [(d.id, d.text) for d in docs] == [("s1", "semi")]


def test_hf_save_to_disk_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"id": [10, 11], "text": ["hf one", "hf two"], "lang": ["en", "fr"]}
    )
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([1])}).save_to_disk(
        str(tmp_path / "dd")
    )
    # auto-detected both as a path and inside a directory walk
    tasks = list_tasks(SourceConfig(paths=[str(tmp_path)]))
    assert [(Path(t.source_path).name, t.format) for t in tasks] == [("dd", "hf"), ("single", "hf")]
    docs, stats = read(tmp_path / "single")
    assert [(d.id, d.text, d.metadata["lang"]) for d in docs] == [
        ("10", "hf one", "en"),
        ("11", "hf two", "fr"),
    ]
    docs, _ = read(tmp_path / "dd", hf_split="validation")
    assert [d.id for d in docs] == ["11"]
    with pytest.raises(UsageError, match="no split 'test'"):
        read(tmp_path / "dd", hf_split="test")


def test_hf_local_data_file_and_offline_hub(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    import datasets.config
    import huggingface_hub.constants

    f = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    docs, _ = read(f, format="hf")
    assert [(d.id, d.text) for d in docs] == [("a1", ROWS[0]["text"]), ("7", ROWS[1]["text"])]
    assert docs[0].metadata["url"] == "http://a"  # the metadata object is merged
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        UsageError, match="hf:someone/data:en: cannot load from the Hugging Face hub"
    ):
        read("hf:someone/data:en")


def test_stdlib_tasks_cover_read_stdlib():
    cfg = SourceConfig(paths=["stdlib"])
    tasks = list_tasks(cfg)
    parts = [t.part for t in tasks]
    assert len(tasks) > 10 and parts[0] == "<modules>" and parts[-1] == "<topics>"
    assert "json" in parts and "test" not in parts
    stats = ReadStats()
    by_task = sorted(d.id for t in tasks for d in read_task(t, cfg, stats))
    assert by_task == sorted(d.id for d in read_stdlib())
    assert "stdlib:json/decoder.py" in by_task and stats.skipped == {}


def test_read_path_keeps_working_for_existing_callers(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    (tmp_path / "b.txt").write_text("plain text file")
    docs = list(read_path(tmp_path))
    assert [d.id for d in docs] == ["a1", str(tmp_path / "b.txt")]


# ---------------------------------------------------------------- bad input


def test_bad_jsonl_lines_are_counted_warned_and_reading_goes_on(tmp_path, warnings):
    f = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"id": "ok1", "text": "good"}).encode(),  # 1
        b'{"id": "u", "text": "caf\xe9"}',  # 2 invalid UTF-8
        b'{"id": "m", "text": ',  # 3 malformed
        b"",  # 4 blank: not a record
        json.dumps({"id": "nt", "body": "x"}).encode(),  # 5 missing text field
        json.dumps({"id": "ns", "text": 42}).encode(),  # 6 non-string text
        json.dumps({"id": "big", "text": "x" * 500}).encode(),  # 7 too long
        b"[1, 2]",  # 8 not an object
        b'{"id": "s", "text": "lone \\ud800 surrogate"}',  # 9
        json.dumps({"id": "ok2", "text": "pair \U0001f600 is fine"}).encode(),  # 10 (escaped)
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    docs, stats = read(f, max_line_chars=200)
    assert [d.id for d in docs] == ["ok1", "ok2"]
    assert docs[1].text == "pair \U0001f600 is fine"
    assert stats.skipped == {
        "invalid_utf8": 2,
        "malformed_json": 2,
        "missing_text_field": 1,
        "non_string_text": 1,
        "line_too_long": 1,
    }
    assert stats.examples["invalid_utf8"] == [f"{f}:2", f"{f}:9"]
    assert stats.examples["malformed_json"] == [f"{f}:3", f"{f}:8"]
    for line in (2, 3, 5, 6, 7, 8, 9):
        assert any(w.startswith(f"{f}:{line}: ") for w in warnings), line
    assert len(warnings) == 7
    assert "column 25" in warnings[0] and "0xe9" in warnings[0]


def test_bad_files_binary_empty_invalid_utf8(tmp_path, warnings):
    (tmp_path / "a_empty.txt").write_bytes(b"")
    (tmp_path / "b_blank.txt").write_text("  \n\n")
    (tmp_path / "c_image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "d_latin1.txt").write_bytes(b"line one\nna\xefve\n")
    (tmp_path / "e_empty.jsonl").write_bytes(b"\n\n")
    (tmp_path / "f_good.txt").write_text("survives")
    docs, stats = read(tmp_path)
    assert [d.text for d in docs] == ["survives"]
    assert stats.skipped == {"empty_file": 3, "binary_file": 1, "invalid_utf8": 1}
    assert stats.files == 6
    assert any(w.startswith(f"{tmp_path / 'd_latin1.txt'}:2: invalid UTF-8") for w in warnings)
    # per line, only the bad line is lost
    docs, stats = read(tmp_path / "d_latin1.txt", unit="line")
    assert [d.text for d in docs] == ["line one"] and stats.skipped == {"invalid_utf8": 1}
    docs, stats = read(tmp_path / "d_latin1.txt", unit="paragraph")
    assert docs == [] and stats.skipped == {"invalid_utf8": 1}


def test_gigantic_line_is_drained_and_line_numbers_stay_right(tmp_path):
    f = tmp_path / "g.txt"
    # line 2 is far past the 4-bytes-per-character read cap, so it is skipped in chunks
    f.write_bytes(b"before\n" + b"y" * 5000 + b"\nafter\n" + "é".encode() * 60 + b"\n")
    docs, stats = read(f, unit="line", max_line_chars=50)
    # line 4 is 120 bytes but 60 characters: too long by characters, not by bytes
    assert [(d.text, d.metadata["line"]) for d in docs] == [("before", 1), ("after", 3)]
    assert stats.skipped == {"line_too_long": 2}
    assert stats.examples["line_too_long"] == [f"{f}:2", f"{f}:4"]
    docs, stats = read(f, unit="file", max_line_chars=50)
    assert docs == [] and stats.skipped == {"line_too_long": 1}
    para = tmp_path / "p.txt"
    para.write_text("short\n\n" + "word " * 20 + "\n" + "more " * 20 + "\n\nend\n")
    docs, stats = read(para, unit="paragraph", max_line_chars=150)
    assert [d.text for d in docs] == ["short", "end"] and stats.skipped == {"line_too_long": 1}


def test_bad_csv_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    f = tmp_path / "b.csv"
    f.write_bytes(b'id,text\nk1,fine\nk2,caf\xe9\nk3,"' + b"z" * 300 + b'"\nk4\nk5,last\n')
    docs, stats = read(f, max_line_chars=100)
    assert [d.id for d in docs] == ["k1", "k5"]
    assert stats.skipped == {"invalid_utf8": 1, "line_too_long": 1, "missing_text_field": 1}
    assert stats.examples["missing_text_field"] == [f"{f}:5"]
    # a gigantic quoted field over many short lines: skipped, and parsing picks up after it
    m = tmp_path / "multi.csv"
    m.write_text('id,text\nm1,"' + "zzzzzzzzzz\n" * 30 + 'end ""quoted"""\nm2,"ok\nsplit"\n')
    docs, stats = read(m, max_line_chars=100)
    assert [(d.id, d.text, d.metadata["line"]) for d in docs] == [("m2", "ok\nsplit", 33)]
    assert stats.skipped == {"line_too_long": 1}
    assert stats.examples["line_too_long"] == [f"{m}:2"]
    g = tmp_path / "nocol.csv"
    g.write_text("id,body\n1,a\n2,b\n3,c\n")
    docs, stats = read(g)
    assert docs == [] and stats.skipped == {"missing_text_field": 3}
    p = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), p)
    docs, stats = read(p)
    assert docs == [] and stats.skipped == {"missing_text_field": 2}
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file at all")
    docs, stats = read(junk, tmp_path / "b.csv", max_line_chars=100)
    assert [d.id for d in docs] == ["k1", "k5"] and stats.skipped["unreadable"] == 1


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".xz"])
def test_truncated_compressed_file_keeps_what_was_read(tmp_path, warnings, suffix):
    lines = [json.dumps({"id": i, "text": f"doc {i} " * 20}) + "\n" for i in range(2000)]
    if suffix == ".gz":
        data = gzip.compress("".join(lines).encode())
    elif suffix == ".xz":
        import lzma

        data = lzma.compress("".join(lines).encode())
    else:
        zstandard = pytest.importorskip("zstandard")

        c = zstandard.ZstdCompressor()  # frames of 100 lines, as streaming writers make
        data = b"".join(
            c.compress("".join(lines[i : i + 100]).encode()) for i in range(0, 2000, 100)
        )
    f = tmp_path / f"cut.jsonl{suffix}"
    f.write_bytes(data[: len(data) // 2])
    docs, stats = read(f)
    assert 0 < len(docs) < 2000 and [d.id for d in docs] == [str(i) for i in range(len(docs))]
    assert stats.skipped == {"unreadable": 1}
    where = stats.examples["unreadable"][0]
    assert where.startswith(f"{f}:") and int(where.rsplit(":", 1)[1]) >= len(docs)
    assert any("cannot read" in w for w in warnings)


def test_warnings_are_rate_limited_per_file(tmp_path, warnings):
    f = tmp_path / "noisy.jsonl"
    f.write_text("not json\n" * 20 + json.dumps({"text": "kept"}) + "\n")
    docs, stats = read(f)
    assert [d.text for d in docs] == ["kept"]
    assert stats.skipped == {"malformed_json": 20}
    assert len(stats.examples["malformed_json"]) == 5
    assert len(warnings) == 6
    assert [w.split(":")[1] for w in warnings[:5]] == ["1", "2", "3", "4", "5"]
    assert warnings[5] == f"{f}: ... and 15 more malformed_json skipped"


def test_stats_merge_and_dict_round_trip():
    a = ReadStats(documents=2, chars=10, files=1, skipped={"malformed_json": 1})
    a.examples = {"malformed_json": ["a:1"]}
    b = ReadStats(documents=3, chars=5, files=2, skipped={"malformed_json": 6, "empty_file": 1})
    b.examples = {"malformed_json": [f"b:{i}" for i in range(6)], "empty_file": ["c"]}
    a.merge(b)
    d = a.to_dict()
    assert d["documents"] == 5 and d["chars"] == 15 and d["files"] == 3
    assert d["skipped"] == {"empty_file": 1, "malformed_json": 7} and d["skipped_total"] == 8
    assert d["examples"]["malformed_json"] == ["a:1", "b:0", "b:1", "b:2", "b:3"]
    assert ReadStats.from_dict(json.loads(json.dumps(d))).to_dict() == d


# ---------------------------------------------------------------- references and streaming


def test_same_documents_as_datatrove_readers(tmp_path):
    pytest.importorskip("datatrove")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from datatrove.pipeline.readers import CSVReader, JsonlReader, ParquetReader

    rows = [
        {"id": f"r{i}", "text": f"text number {i}\nwith two lines", "k": str(i)} for i in range(50)
    ]
    for sub in ("j", "p", "c"):
        (tmp_path / sub).mkdir()
    write_jsonl(tmp_path / "j/x.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p/x.parquet")
    with open(tmp_path / "c/x.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["id", "text", "k"])
        w.writeheader()
        w.writerows(rows)
    for sub, reader in (("j", JsonlReader), ("p", ParquetReader), ("c", CSVReader)):
        theirs = [(d.id, d.text, d.metadata["k"]) for d in reader(str(tmp_path / sub)).run()]
        ours = [(d.id, d.text, d.metadata["k"]) for d in read(tmp_path / sub)[0]]
        assert ours == theirs and len(ours) == 50, sub


def test_streaming_memory_does_not_grow_with_file_size(tmp_path):
    """~24 MB of JSONL is read with a peak of a few MB of Python allocations (the benchmark
    benchmarks/stream_memory.py checks RSS on much larger inputs)."""
    doc = {"id": 0, "text": "streaming " * 200, "metadata": {"n": 1}}
    line = (json.dumps(doc) + "\n").encode()
    f = tmp_path / "big.jsonl"
    with open(f, "wb") as fh:
        for _ in range(12):
            fh.write(line * 1000)
    size = f.stat().st_size
    stats = ReadStats()
    cfg = SourceConfig(paths=[str(f)])
    tracemalloc.start()
    try:
        n = sum(1 for _ in read_all(cfg, stats))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 12_000 and stats.chars == 12_000 * len(doc["text"])
    assert size > 20e6 and peak < 4e6, (size, peak)
