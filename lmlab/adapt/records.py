"""The records of a training-data file, whatever it is stored in: JSONL read strictly,
line by line, and Parquet, CSV/TSV or a Hugging Face dataset (`hf:NAME`) through lmlab's
data sources.

JSONL is the full form: any field may hold chat messages (lists of objects). The column
formats keep scalar fields only (the data sources drop nested values), so from them
prompts and completions are strings. A bad JSONL line stops the command with the file
and line; a bad row in a column format is counted and reported by the sources and left
out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.utils import jsonl_objects

COLUMN_SUFFIXES = (".parquet", ".csv", ".tsv")


def iter_records(path: str | Path, first: str, what: str) -> Iterator[tuple[str, dict]]:
    """(where, record) of every record; `first` is a field every record has (the data
    sources read it as their text column)."""
    spec = str(path)
    if spec.startswith("hf:") or Path(spec).suffix.lower() in COLUMN_SUFFIXES:
        yield from _columns(spec, first)
        return
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"{path}: no such {what} file")
    yield from jsonl_objects(path)


def _columns(spec: str, first: str) -> Iterator[tuple[str, dict]]:
    from lmlab.data.sources import ReadStats, SourceConfig, read_all

    stats = ReadStats()
    for doc in read_all(SourceConfig(paths=[spec], text_field=first), stats):
        meta = dict(doc.metadata)
        where = f"{meta.pop('path', spec)}#{meta.pop('row', '?')}"
        meta.pop("source", None)
        yield where, {first: doc.text, **meta}
    skipped = sum(stats.skipped.values())
    if skipped:
        log(f"{spec}: {skipped} record(s) left out: {dict(stats.skipped)}")
