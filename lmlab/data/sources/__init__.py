"""Readers that stream `Document`s from disk; none loads a corpus whole.

Inputs are split into *tasks* (one per file, per Hugging Face dataset, per top-level
stdlib package) so an executor can run them in parallel and redo only unfinished ones.
`read_task` streams one task: text files (a document per file, line or paragraph),
JSONL (plain, .gz, .zst, .bz2, .xz), Parquet, CSV/TSV, Hugging Face `datasets`, and the
embedded corpus.

Bad input never stops a run and is never dropped silently: each skipped file, line or
row is counted by reason in `ReadStats`, kept as an example, and warned about with its
file and line (a few warnings per reason and file, then one "... and N more" line).

The embedded corpus is the standard library of the running interpreter: its `.py`
sources (docstrings are English prose) and the pydoc topic texts. It is on every
machine that runs lmlab, so the default recipe needs no download.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmlab.data.document import Document
from lmlab.data.sources.base import (
    COMPRESSED,
    JSONL,
    SKIP_REASONS,
    Format,
    ReadStats,
    SourceConfig,
    Task,
    is_hf_saved,
)
from lmlab.data.sources.common import read_errors
from lmlab.data.sources.delimited import read_csv
from lmlab.data.sources.hub import read_hf
from lmlab.data.sources.jsonl import read_jsonl
from lmlab.data.sources.parquet import read_parquet
from lmlab.data.sources.stdlib import module_name, read_stdlib, read_stdlib_part, stdlib_tasks
from lmlab.data.sources.text import read_text
from lmlab.errors import UsageError

__all__ = [
    "SKIP_REASONS",
    "Format",
    "ReadStats",
    "SourceConfig",
    "Task",
    "detect_format",
    "list_tasks",
    "module_name",
    "read_all",
    "read_path",
    "read_stdlib",
    "read_task",
]


# ---------------------------------------------------------------- tasks


def list_tasks(cfg: SourceConfig) -> list[Task]:
    """Expand `cfg.paths` into tasks in a stable order (directories walked sorted; hidden
    files and directories skipped). A missing path or an unusable option is a UsageError."""
    tasks: list[Task] = []
    for p in cfg.paths:
        if p == "stdlib":  # the keyword wins over a local file named so; write ./stdlib for that
            tasks += stdlib_tasks(cfg)
        elif p.startswith("hf:"):
            if cfg.format not in ("auto", "hf"):
                raise UsageError(f"paths: {p} is a hub dataset; format must be 'auto' or 'hf'")
            tasks.append(Task(p, "hf"))
        else:
            path = Path(p)
            if not path.exists():
                raise UsageError(f"paths: {p} does not exist")
            if cfg.format == "hf" or (cfg.format == "auto" and is_hf_saved(path)):
                tasks.append(Task(p, "hf"))
            elif path.is_dir():
                tasks += _dir_tasks(path, cfg.format)
            else:
                tasks.append(Task(p, _resolve(path, cfg.format)))
    tasks = list(dict.fromkeys(tasks))  # a path named twice is read once
    _check_packages(tasks)
    return tasks


def detect_format(path: str | Path) -> str:
    """Format of a file from its name: `.jsonl/.json/.ndjson` (optionally compressed) →
    jsonl, `.parquet`, `.csv/.tsv` → csv, anything else → text (binary files are caught
    when read)."""
    name = Path(path).name.lower()
    suffix = Path(name).suffix
    if suffix in COMPRESSED:
        suffix = Path(name[: -len(suffix)]).suffix
    if suffix in JSONL:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "text"


def _resolve(path: Path, fmt: str) -> str:
    return detect_format(path) if fmt == "auto" else fmt


def _dir_tasks(root: Path, fmt: str) -> list[Task]:
    out: list[Task] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if fmt == "auto" and d != root and is_hf_saved(d):
            out.append(Task(str(d), "hf"))
            dirnames.clear()
            continue
        dirnames[:] = [x for x in dirnames if not x.startswith(".")]
        out += [Task(str(d / f), _resolve(d / f, fmt)) for f in filenames if not f.startswith(".")]
    return sorted(out, key=lambda t: Path(t.source_path).parts)


def _check_packages(tasks: list[Task]) -> None:
    """Fail before any work starts when an optional reader package is missing."""
    from importlib.util import find_spec

    need = {}
    for t in tasks:
        if t.format == "parquet":
            need["pyarrow"] = "Parquet files"
        elif t.format == "hf":
            need["datasets"] = "Hugging Face datasets"
        if t.source_path.lower().endswith((".zst", ".zstd")):
            need["zstandard"] = ".zst files"
    for module, what in need.items():
        if find_spec(module) is None:
            raise UsageError(f"reading {what} needs the {module} package (pip install {module})")


# ---------------------------------------------------------------- reading


def read_task(task: Task, cfg: SourceConfig, stats: ReadStats) -> Iterator[Document]:
    """Stream the documents of one task. Bad input never raises: it is counted in `stats`
    (only a hub dataset that cannot be reached is a UsageError, the user's to fix)."""
    at: list[Any] = [None, ":"]  # where the reader is (line or row), for "unreadable"
    before = sum(stats.skipped.values())
    docs = 0
    try:
        if task.format != "stdlib":
            stats.files += 1
        for doc in _READERS[task.format](task, cfg, stats, at):
            docs += 1
            stats.chars += len(doc.text)
            stats.documents += 1
            yield doc
    except read_errors() as e:
        where = task.label if at[0] is None else f"{task.label}{at[1]}{at[0]}"
        stats.skip("unreadable", task.label, where, f"cannot read ({type(e).__name__}: {e})")
    else:
        if not docs and sum(stats.skipped.values()) == before and task.format != "stdlib":
            stats.skip("empty_file", task.label, task.label, "no records (empty file)")
    finally:
        stats.flush_warnings()


def read_all(cfg: SourceConfig, stats: ReadStats) -> Iterator[Document]:
    """Every task of `cfg` in order, in this process (executors call `read_task` per task)."""
    for task in list_tasks(cfg):
        yield from read_task(task, cfg, stats)


def read_path(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    """A file or directory with formats detected by suffix (kept for existing callers)."""
    yield from read_all(SourceConfig(paths=[str(path)], text_field=text_field), ReadStats())


_READERS = {
    "text": read_text,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "parquet": read_parquet,
    "hf": read_hf,
    "stdlib": read_stdlib_part,
}
