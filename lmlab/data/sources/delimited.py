"""CSV and TSV files: a header row, then one document per record."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any, BinaryIO

from lmlab.data.document import Document
from lmlab.data.sources.base import COMPRESSED, ReadStats, SourceConfig, Task
from lmlab.data.sources.common import decoded, is_binary, open_file


def read_csv(task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]) -> Iterator[Document]:
    """A header row, then records; the text column by name, other columns as metadata."""
    path = task.source_path
    name = path.lower()
    for c in COMPRESSED:
        name = name.removesuffix(c)
    delimiter = cfg.csv_delimiter or ("\t" if name.endswith(".tsv") else ",")
    # A longer field is a gigantic record, skipped. The limit is process-wide: put it back.
    old_limit = csv.field_size_limit(cfg.max_line_chars)
    try:
        with open_file(path) as fh:
            if not is_binary(fh, path, stats):
                yield from _csv_docs(fh, path, delimiter, cfg, stats, at)
    finally:
        csv.field_size_limit(old_limit)


def _csv_docs(
    fh: BinaryIO, path: str, delimiter: str, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    tf, idf = cfg.text_field, cfg.id_field
    # The line the current record starts on, and its count of quote characters: after a
    # gigantic quoted field, lines are passed over until the quotes balance again.
    rec_at = {"start": 0, "new": True, "quotes": 0, "in_skipped_field": False}

    def record_lines() -> Iterator[str]:
        for lineno, line in decoded(fh, path, cfg, stats, at):
            if rec_at["in_skipped_field"]:  # part of a record already counted
                rec_at["in_skipped_field"] = line.count('"') % 2 == 0
                continue
            if rec_at["new"]:
                rec_at.update(start=lineno, new=False, quotes=0)
            rec_at["quotes"] += line.count('"')
            yield line

    records = csv.reader(record_lines(), delimiter=delimiter)
    header: list[str] | None = None
    index = -1
    while True:
        try:
            rec = next(records)
        except StopIteration:
            return
        except csv.Error as e:
            start, rec_at["new"] = rec_at["start"], True
            index += header is not None
            if "field larger" in str(e):
                rec_at["in_skipped_field"] = rec_at["quotes"] % 2 == 1
                detail = f"field longer than {cfg.max_line_chars:,} characters"
                stats.skip("line_too_long", path, f"{path}:{start}", detail)
            else:
                stats.skip("malformed_row", path, f"{path}:{start}", f"bad CSV record ({e})")
            continue
        start, rec_at["new"] = rec_at["start"], True
        if not rec:
            continue  # a blank line
        if header is None:
            header = rec
            if tf not in header:
                n = sum(1 for r in _safe_records(records) if r)
                detail = f"no column {tf!r} (columns: {', '.join(header)}); {n} records"
                stats.skip("missing_text_field", path, f"{path}:{start}", detail, n=max(n, 1))
                return
            ti = header.index(tf)
            ii = header.index(idf) if idf in header else -1
            others = [(i, h) for i, h in enumerate(header) if i not in (ti, ii)]
            continue
        index += 1
        if ti >= len(rec):
            detail = f"record has {len(rec)} fields, none for column {tf!r}"
            stats.skip("missing_text_field", path, f"{path}:{start}", detail)
            continue
        meta: dict[str, Any] = {"source": "csv", "path": path, "line": start}
        for i, h in others:
            if i < len(rec):
                meta[h] = rec[i]
        if len(rec) > len(header):
            meta["extra_fields"] = rec[len(header) :]
        rid = rec[ii] if 0 <= ii < len(rec) and rec[ii] else f"{path}#{index}"
        yield Document(id=rid, text=rec[ti], metadata=meta)


def _safe_records(records: Iterator[list[str]]) -> Iterator[list[str]]:
    while True:
        try:
            yield next(records)
        except StopIteration:
            return
        except csv.Error:
            continue
