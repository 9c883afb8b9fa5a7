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

import csv
import io
import json
import os
import re
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from lmlab.config import STRICT, PosInt
from lmlab.console import warn
from lmlab.data.document import Document
from lmlab.errors import UsageError

Format = Literal["auto", "text", "jsonl", "parquet", "csv", "hf", "stdlib"]

# Directories of the stdlib that are not library prose/code a user would want to learn from.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "lib2to3"}
# The pydoc topics are read as topics; their generated module would duplicate them.
_SKIP_FILES = {"pydoc_data/topics.py"}
_TEST_DIRS = {"test", "tests"}
_STDLIB_MODULES = "<modules>"  # task part: the stdlib's top-level single-file modules
_STDLIB_TOPICS = "<topics>"  # task part: the pydoc topics

_COMPRESSED = {".gz", ".zst", ".zstd", ".bz2", ".xz"}
_JSONL = {".jsonl", ".json", ".ndjson"}
_BOM = b"\xef\xbb\xbf"
_SNIFF = 8192  # bytes looked at for NUL bytes, as git and grep do to call a file binary
_BATCH_ROWS = 1024  # Parquet / HF rows per batch: bounded memory, few Python-level calls
_SCALARS = (str, int, float, bool, type(None))
# A JSON \uXXXX escape of a surrogate: only lines that have one can hold a lone surrogate,
# which is a valid Python str but cannot be written as UTF-8 later.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_WARN_PER_FILE = 5  # warnings per reason and file before "... and N more"
_WARN_PER_PROCESS = 100  # warnings per reason in one process, over all files

SKIP_REASONS = (
    "invalid_utf8",
    "empty_file",
    "binary_file",
    "line_too_long",
    "malformed_json",
    "malformed_row",
    "missing_text_field",
    "non_string_text",
    "unreadable",
)

_warned_in_process: Counter[str] = Counter()


@dataclass
class SourceConfig:
    """Where documents come from. `paths` holds files, directories, `stdlib` (the embedded
    corpus) or `hf:NAME[:CONFIG]` (a Hugging Face hub dataset; the only online source)."""

    __pydantic_config__ = STRICT

    paths: list[str] = field(default_factory=lambda: ["stdlib"])
    format: Format = "auto"  # auto: by file suffix; anything else applies to every path
    text_field: str = "text"
    id_field: str = "id"
    unit: Literal["file", "line", "paragraph"] = "file"  # documents of a text file
    max_line_chars: PosInt = 10_000_000  # longer lines / records / files are skipped
    csv_delimiter: str | None = None  # None: "\t" for .tsv, "," otherwise
    hf_split: str = "train"
    include_tests: bool = False  # stdlib: also the test suites
    include_topics: bool = True  # stdlib: also the pydoc topics

    def __post_init__(self) -> None:
        if not self.paths:
            raise UsageError("paths is empty: name files, directories, 'stdlib' or 'hf:NAME'")
        if self.csv_delimiter is not None and len(self.csv_delimiter) != 1:
            raise UsageError(f"csv_delimiter must be one character, got {self.csv_delimiter!r}")
        if self.format == "stdlib" and any(p != "stdlib" for p in self.paths):
            raise UsageError("format 'stdlib' reads the embedded corpus: paths must be ['stdlib']")


@dataclass(frozen=True)
class Task:
    """One unit of reading work: a file, a Hugging Face dataset, or a part of the stdlib."""

    source_path: str
    format: str  # resolved: text, jsonl, parquet, csv, hf or stdlib
    part: str = ""  # stdlib: a top-level package, "<modules>" or "<topics>"

    @property
    def label(self) -> str:
        return f"{self.source_path}:{self.part}" if self.part else self.source_path


@dataclass
class ReadStats:
    """What the readers saw: documents and characters read, and every skip by reason."""

    documents: int = 0
    chars: int = 0
    files: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> ["file:line"]
    max_examples: int = 5
    _warned: Counter = field(default_factory=Counter, init=False, repr=False, compare=False)
    _suppressed: Counter = field(default_factory=Counter, init=False, repr=False, compare=False)

    def skip(self, reason: str, file: str, where: str, detail: str, n: int = 1) -> None:
        """Count `n` skipped inputs at `where` ("file:line") and warn, rate-limited."""
        self.skipped[reason] = self.skipped.get(reason, 0) + n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(where)
        key = (file, reason)
        if _warned_in_process[reason] >= _WARN_PER_PROCESS:
            return  # the stats carry the counts; the terminal has seen enough of this reason
        if self._warned[key] >= _WARN_PER_FILE:
            self._suppressed[key] += n
            return
        self._warned[key] += 1
        _warned_in_process[reason] += 1
        warn(f"{where}: {detail}, skipped [{reason}]")
        if _warned_in_process[reason] == _WARN_PER_PROCESS:
            warn(f"further {reason} warnings are not shown; the counts are in the stats")

    def flush_warnings(self) -> None:
        """One "... and N more" line per file and reason whose warnings were held back."""
        for (file, reason), n in sorted(self._suppressed.items()):
            if _warned_in_process[reason] < _WARN_PER_PROCESS:
                warn(f"{file}: ... and {n} more {reason} skipped")
        self._suppressed.clear()
        self._warned.clear()

    def merge(self, other: ReadStats) -> None:
        self.documents += other.documents
        self.chars += other.chars
        self.files += other.files
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: max(0, self.max_examples - len(mine))])

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "chars": self.chars,
            "files": self.files,
            "skipped_total": sum(self.skipped.values()),
            "skipped": dict(sorted(self.skipped.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadStats:
        return cls(
            documents=d["documents"],
            chars=d["chars"],
            files=d.get("files", 0),
            skipped=dict(d.get("skipped", {})),
            examples={k: list(v) for k, v in d.get("examples", {}).items()},
        )


# ---------------------------------------------------------------- tasks


def list_tasks(cfg: SourceConfig) -> list[Task]:
    """Expand `cfg.paths` into tasks in a stable order (directories walked sorted; hidden
    files and directories skipped). A missing path or an unusable option is a UsageError."""
    tasks: list[Task] = []
    for p in cfg.paths:
        if p == "stdlib":  # the keyword wins over a local file named so; write ./stdlib for that
            tasks += _stdlib_tasks(cfg)
        elif p.startswith("hf:"):
            if cfg.format not in ("auto", "hf"):
                raise UsageError(f"paths: {p} is a hub dataset; format must be 'auto' or 'hf'")
            tasks.append(Task(p, "hf"))
        else:
            path = Path(p)
            if not path.exists():
                raise UsageError(f"paths: {p} does not exist")
            if cfg.format == "hf" or (cfg.format == "auto" and _is_hf_saved(path)):
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
    if suffix in _COMPRESSED:
        suffix = Path(name[: -len(suffix)]).suffix
    if suffix in _JSONL:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "text"


def _resolve(path: Path, fmt: str) -> str:
    return detect_format(path) if fmt == "auto" else fmt


def _is_hf_saved(path: Path) -> bool:
    """A directory written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _dir_tasks(root: Path, fmt: str) -> list[Task]:
    out: list[Task] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if fmt == "auto" and d != root and _is_hf_saved(d):
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
    except _read_errors() as e:
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


def _read_errors() -> tuple[type[BaseException], ...]:
    """I/O and decompression errors; looked up only in modules already imported."""
    import sys

    errs: list[type[BaseException]] = [OSError, EOFError]
    for module, name in (("zstandard", "ZstdError"), ("lzma", "LZMAError")):
        if module in sys.modules:
            errs.append(getattr(sys.modules[module], name))
    if "pyarrow" in sys.modules:
        errs.append(sys.modules["pyarrow"].ArrowException)  # a corrupt Parquet file
    return tuple(errs)


def _open(path: str) -> BinaryIO:
    """A buffered binary stream with `readline(limit)` and `peek`, decompressing by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.open(path, "rb")  # type: ignore[return-value]
    if suffix in (".zst", ".zstd"):
        return io.BufferedReader(_ZstdFile(path), buffer_size=1 << 20)  # type: ignore[return-value]
    if suffix == ".bz2":
        import bz2

        return bz2.open(path, "rb")  # type: ignore[return-value]
    if suffix == ".xz":
        import lzma

        return lzma.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=1 << 20)


class _ZstdFile(io.RawIOBase):
    """A .zst file decompressed frame after frame. A file cut inside a frame raises
    EOFError, as gzip does; zstandard's own stream_reader just ends there, silently."""

    def __init__(self, path: str) -> None:
        import zstandard

        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._out = memoryview(b"")
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._out:
            data = self._file.read(1 << 16)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            out = []
            while data:
                out.append(self._obj.decompress(data))
                self._in_frame = not self._obj.eof
                data = b""
                if self._obj.eof:  # the next frame starts in what was left over
                    data = self._obj.unused_data
                    self._obj = self._dctx.decompressobj()
            self._out = memoryview(b"".join(out))
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _is_binary(fh: BinaryIO, path: str, stats: ReadStats) -> bool:
    if b"\x00" in fh.peek(_SNIFF)[:_SNIFF]:  # type: ignore[attr-defined]
        stats.skip("binary_file", path, path, "NUL bytes in the first 8 KiB: a binary file")
        return True
    return False


def _lines(
    fh: BinaryIO, path: str, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw line) with memory bounded by the line limit: a longer line is
    counted, drained in chunks and yielded as None."""
    limit = cfg.max_line_chars
    cap = 4 * limit + 2  # the most UTF-8 bytes `limit` characters take, plus "\r\n"
    readline = fh.readline
    lineno = 0
    raw = readline(cap)
    if raw.startswith(_BOM):
        raw = raw[3:]
    while raw:
        lineno += 1
        at[0] = lineno
        if len(raw) > limit and _too_long(raw, fh, cap, limit):
            where = f"{path}:{lineno}"
            stats.skip("line_too_long", path, where, f"line longer than {limit:,} characters")
            yield lineno, None
        else:
            yield lineno, raw
        raw = readline(cap)


def _decoded(
    fh: BinaryIO, path: str, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[tuple[int, str]]:
    """`(line number, text)` of each line that is not too long and is valid UTF-8."""
    for lineno, raw in _lines(fh, path, cfg, stats, at):
        if raw is None:
            continue
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _bad_utf8(stats, path, lineno, e, "line")


def _too_long(raw: bytes, fh: BinaryIO, cap: int, limit: int) -> bool:
    if len(raw) == cap and not raw.endswith(b"\n"):
        while raw and not raw.endswith(b"\n"):  # drain the rest of the line
            raw = fh.readline(1 << 20)
        return True
    return len(raw.rstrip(b"\r\n").decode("utf-8", "replace")) > limit


def _bad_utf8(stats: ReadStats, path: str, line: int, e: UnicodeDecodeError, what: str) -> None:
    """Count invalid UTF-8 at its line and column (`line`: the first line of `e.object`)."""
    line += e.object.count(b"\n", 0, e.start)
    column = e.start - e.object.rfind(b"\n", 0, e.start)
    detail = f"invalid UTF-8 (byte {e.object[e.start]:#04x} at column {column}) in the {what}"
    stats.skip("invalid_utf8", path, f"{path}:{line}", detail)


def _read_text(
    task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    path = task.source_path
    with _open(path) as fh:
        if _is_binary(fh, path, stats):
            return
        if cfg.unit == "file":
            yield from _text_file(fh, path, cfg, stats)
        elif cfg.unit == "line":
            yield from _text_lines(fh, path, cfg, stats, at)
        else:
            yield from _text_paragraphs(fh, path, cfg, stats, at)


def _text_file(fh: BinaryIO, path: str, cfg: SourceConfig, stats: ReadStats) -> Iterator[Document]:
    limit = cfg.max_line_chars
    raw = fh.read(4 * limit + 1)  # never more than the limit can need
    if raw.startswith(_BOM):
        raw = raw[3:]
    if len(raw) > limit and (len(raw) > 4 * limit or len(raw.decode("utf-8", "replace")) > limit):
        stats.skip("line_too_long", path, path, f"file longer than {limit:,} characters")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _bad_utf8(stats, path, 1, e, "file")
        return
    if text.strip():
        yield Document(id=path, text=text, metadata={"source": "text", "path": path})


def _text_lines(
    fh: BinaryIO, path: str, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    for lineno, raw in _lines(fh, path, cfg, stats, at):
        if raw is None:
            continue
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            _bad_utf8(stats, path, lineno, e, "line")
            continue
        if line.strip():
            meta = {"source": "text", "path": path, "line": lineno}
            yield Document(id=f"{path}:{lineno}", text=line, metadata=meta)


def _text_paragraphs(
    fh: BinaryIO, path: str, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    """Blank-line-separated paragraphs; a paragraph with a bad line is skipped whole."""
    buf: list[str] = []
    size = start = 0
    index = -1
    bad = in_para = False
    for lineno, raw in _lines(fh, path, cfg, stats, at):
        line = None
        if raw is not None:
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                _bad_utf8(stats, path, lineno, e, "paragraph")
        if line is not None and not line.strip():  # a blank line ends the paragraph
            if in_para and not bad:
                meta = {"source": "text", "path": path, "line": start}
                yield Document(id=f"{path}#{index}", text="\n".join(buf), metadata=meta)
            buf, size, bad, in_para = [], 0, False, False
            continue
        if not in_para:
            in_para, start, index = True, lineno, index + 1
        if line is None:
            bad, buf = True, []
        elif not bad:
            buf.append(line)
            size += len(line) + 1
            if size > cfg.max_line_chars:
                where = f"{path}:{start}"
                detail = f"paragraph longer than {cfg.max_line_chars:,} characters"
                stats.skip("line_too_long", path, where, detail)
                bad, buf = True, []
    if in_para and not bad:
        meta = {"source": "text", "path": path, "line": start}
        yield Document(id=f"{path}#{index}", text="\n".join(buf), metadata=meta)


_MISSING = object()


def _read_jsonl(
    task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    """One document per line; the row's `metadata` object and its other fields become
    metadata (the row's own values win over `source`/`path`/`line`, keeping provenance)."""
    path = task.source_path
    tf, idf = cfg.text_field, cfg.id_field
    loads = json.loads
    with _open(path) as fh:
        if _is_binary(fh, path, stats):
            return
        for lineno, line in _decoded(fh, path, cfg, stats, at):
            try:
                row = loads(line)
            except (ValueError, RecursionError) as e:
                if line.strip():  # a blank line is no record
                    msg = getattr(e, "msg", type(e).__name__)
                    stats.skip(
                        "malformed_json", path, f"{path}:{lineno}", f"malformed JSON ({msg})"
                    )
                continue
            where = f"{path}:{lineno}"
            if type(row) is not dict:
                detail = f"a JSON {type(row).__name__} where an object was expected"
                stats.skip("malformed_json", path, where, detail)
                continue
            if "\\u" in line and _SURROGATE_ESCAPE.search(line) and not _utf8_clean(row):
                stats.skip("invalid_utf8", path, where, "a lone surrogate escape (\\ud8xx)")
                continue
            text = row.pop(tf, _MISSING)
            if type(text) is not str:
                if text is _MISSING:
                    detail = f"no field {tf!r} (fields: {', '.join(map(str, row))})"
                    stats.skip("missing_text_field", path, where, detail)
                else:
                    detail = f"field {tf!r} is a {type(text).__name__}, not a string"
                    stats.skip("non_string_text", path, where, detail)
                continue
            rid = row.pop(idf, None)
            rmeta = row.pop("metadata", None)
            meta: dict[str, Any] = {"source": "jsonl", "path": path, "line": lineno}
            if row:
                meta.update(row)
            if type(rmeta) is dict:
                meta.update(rmeta)
            elif rmeta is not None:
                meta["metadata"] = rmeta
            doc_id = where if rid is None or rid == "" else str(rid)
            yield Document(id=doc_id, text=text, metadata=meta)


def _utf8_clean(row: dict) -> bool:
    """False when a value holds a lone surrogate, which no UTF-8 writer could write later."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_csv(task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]) -> Iterator[Document]:
    """A header row, then records; the text column by name, other columns as metadata."""
    path = task.source_path
    name = path.lower()
    for c in _COMPRESSED:
        name = name.removesuffix(c)
    delimiter = cfg.csv_delimiter or ("\t" if name.endswith(".tsv") else ",")
    # A longer field is a gigantic record, skipped. The limit is process-wide: put it back.
    old_limit = csv.field_size_limit(cfg.max_line_chars)
    try:
        with _open(path) as fh:
            if not _is_binary(fh, path, stats):
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

    def decoded() -> Iterator[str]:
        for lineno, line in _decoded(fh, path, cfg, stats, at):
            if rec_at["in_skipped_field"]:  # part of a record already counted
                rec_at["in_skipped_field"] = line.count('"') % 2 == 0
                continue
            if rec_at["new"]:
                rec_at.update(start=lineno, new=False, quotes=0)
            rec_at["quotes"] += line.count('"')
            yield line

    records = csv.reader(decoded(), delimiter=delimiter)
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


def _read_parquet(
    task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    """Row batches via `iter_batches` (memory bounded by the batch, not the file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = task.source_path
    at[1] = "#"
    pf = pq.ParquetFile(path)
    try:
        schema = pf.schema_arrow
        if cfg.text_field not in schema.names:
            rows = pf.metadata.num_rows
            detail = f"no column {cfg.text_field!r} (columns: {', '.join(schema.names)})"
            stats.skip("missing_text_field", path, path, f"{detail}; {rows} rows", n=max(rows, 1))
            return
        keep = (cfg.text_field, cfg.id_field, "metadata")
        cols = [f.name for f in schema if f.name in keep or _arrow_scalar(pa, f.type)]
        start = 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=cols):
            data = {n: batch.column(i).to_pylist() for i, n in enumerate(batch.schema.names)}
            yield from _rows(data, start, path, "parquet", cfg, stats, at)
            start += batch.num_rows
    finally:
        pf.close()


def _arrow_scalar(pa: Any, t: Any) -> bool:
    """Columns worth keeping as metadata: numbers, strings, booleans, dates and times."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_temporal(t)
        or pa.types.is_decimal(t)
    )


def _rows(
    data: dict[str, list],
    start: int,
    path: str,
    fmt: str,
    cfg: SourceConfig,
    stats: ReadStats,
    at: list[Any],
) -> Iterator[Document]:
    """Documents from a column batch: scalar columns become metadata (dates and decimals as
    strings), a `metadata` column of objects is merged in; other values are left out."""
    import datetime
    import decimal

    as_str = (datetime.date, datetime.time, datetime.timedelta, decimal.Decimal)
    texts = data.pop(cfg.text_field)
    ids = data.pop(cfg.id_field, None)
    metas = data.pop("metadata", None)
    names = list(data)
    cols = [data[n] for n in names]
    tf = cfg.text_field
    for j, text in enumerate(texts):
        n = start + j
        at[0] = n
        if type(text) is not str:
            detail = f"column {tf!r} is {'null' if text is None else type(text).__name__}"
            stats.skip("non_string_text", path, f"{path}#{n}", f"{detail}, not a string")
            continue
        meta: dict[str, Any] = {"source": fmt, "path": path, "row": n}
        for name, col in zip(names, cols, strict=True):
            v = col[j]
            if isinstance(v, _SCALARS):
                meta[name] = v
            elif isinstance(v, as_str):
                meta[name] = str(v)
        m = metas[j] if metas is not None else None
        if type(m) is dict:
            meta.update(m)
        elif isinstance(m, _SCALARS) and m is not None:
            meta["metadata"] = m
        rid = ids[j] if ids is not None else None
        doc_id = f"{path}#{n}" if rid is None or rid == "" else str(rid)
        yield Document(id=doc_id, text=text, metadata=meta)


_HF_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}


def _read_hf(task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]) -> Iterator[Document]:
    """A Hugging Face dataset, iterated in batches (memory-mapped or streamed, never loaded)."""
    at[1] = "#"
    path = task.source_path
    ds = _open_hf(task, cfg, stats)
    if ds is None:
        return
    start = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        rows = len(next(iter(batch.values()))) if batch else 0
        if cfg.text_field not in batch:
            detail = f"no column {cfg.text_field!r} (columns: {', '.join(batch)}); {rows} rows"
            stats.skip("missing_text_field", path, f"{path}#{start}", detail, n=rows)
        else:
            yield from _rows(dict(batch), start, path, "hf", cfg, stats, at)
        start += rows


def _open_hf(task: Task, cfg: SourceConfig, stats: ReadStats) -> Any:
    import datasets

    src = task.source_path
    if src.startswith("hf:"):
        name, _, config = src[3:].partition(":")
        try:
            return datasets.load_dataset(name, config or None, split=cfg.hf_split, streaming=True)
        except Exception as e:  # offline, unknown name/config/split, gated: the user must act
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{src}: cannot load from the Hugging Face hub: {msg}") from None
    p = Path(src)
    try:
        if (p / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(src)
            if cfg.hf_split not in dd:
                splits = ", ".join(dd)
                raise UsageError(
                    f"{src}: no split {cfg.hf_split!r} (splits: {splits}); set hf_split"
                )
            return dd[cfg.hf_split]
        if _is_hf_saved(p):
            return datasets.load_from_disk(src)
        if p.is_dir():
            return datasets.load_dataset(src, split=cfg.hf_split, streaming=True)
        builder = _HF_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise UsageError(f"{src}: datasets cannot load a {p.suffix or 'suffix-less'} file")
        return datasets.load_dataset(builder, data_files=src, split="train", streaming=True)
    except UsageError:
        raise
    except Exception as e:  # a corrupt or foreign local dataset is bad input: skip it
        stats.skip("unreadable", src, src, f"datasets cannot load it ({type(e).__name__}: {e})")
        return None


# ---------------------------------------------------------------- the embedded corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(rel: Path) -> str:
    """`json/decoder.py` → `json.decoder`; `json/__init__.py` → `json`."""
    parts = list(rel.with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _stdlib_files(include_tests: bool, part: str | None = None) -> list[Path]:
    """The stdlib's `.py` files (relative paths, sorted): all, or those of one task part.

    Walked with pruning, so site-packages (often far larger than the stdlib) is never listed.
    """
    root = stdlib_root()
    skip_dirs = _SKIP_DIRS if include_tests else _SKIP_DIRS | _TEST_DIRS
    out = []
    top = root if part in (None, _STDLIB_MODULES) else root / part
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        dirnames[:] = [] if part == _STDLIB_MODULES else sorted(set(dirnames) - skip_dirs)
        for f in filenames:
            if not f.endswith(".py") or (not include_tests and f.startswith("test_")):
                continue
            rel = (d / f).relative_to(root)
            if rel.as_posix() not in _SKIP_FILES:
                out.append(rel)
    return sorted(out, key=lambda r: r.parts)


def _stdlib_tasks(cfg: SourceConfig) -> list[Task]:
    """One task per top-level package, one for the single-file modules, one for topics."""
    files = _stdlib_files(cfg.include_tests)
    parts = sorted({r.parts[0] if len(r.parts) > 1 else _STDLIB_MODULES for r in files})
    tasks = [Task("stdlib", "stdlib", p) for p in parts]
    if cfg.include_topics:
        tasks.append(Task("stdlib", "stdlib", _STDLIB_TOPICS))
    return tasks


def _stdlib_doc(root: Path, rel: Path, stats: ReadStats) -> Document | None:
    # Empty modules (many __init__.py) are passed on as they always were; the pipeline's
    # normalize step counts them, so they are not warned about here.
    label = f"stdlib:{rel.as_posix()}"
    stats.files += 1
    try:
        raw = (root / rel).read_bytes()
    except OSError as e:
        stats.skip("unreadable", label, label, f"cannot read ({e.strerror})")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _bad_utf8(stats, label, 1, e, "file")
        return None
    meta = {"source": "stdlib", "path": rel.as_posix(), "module": module_name(rel)}
    return Document(id=label, text=text, metadata=meta)


def _pydoc_topics() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        warn("pydoc_data is not installed: the embedded corpus has no pydoc topics")
        return
    for name in sorted(topics):
        yield Document(
            id=f"pydoc:{name}", text=topics[name], metadata={"source": "pydoc", "topic": name}
        )


def _read_stdlib_part(
    task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    if task.part == _STDLIB_TOPICS:
        yield from _pydoc_topics()
        return
    root = stdlib_root()
    for rel in _stdlib_files(cfg.include_tests, task.part or None):
        doc = _stdlib_doc(root, rel, stats)
        if doc is not None:
            yield doc


def read_stdlib(include_tests: bool = False, include_topics: bool = True) -> Iterator[Document]:
    """Stream the embedded corpus: stdlib modules, then pydoc topics, in a stable order."""
    stats = ReadStats()
    root = stdlib_root()
    for rel in _stdlib_files(include_tests):
        doc = _stdlib_doc(root, rel, stats)
        if doc is not None:
            yield doc
    stats.flush_warnings()
    if include_topics:
        yield from _pydoc_topics()


_READERS = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "hf": _read_hf,
    "stdlib": _read_stdlib_part,
}
