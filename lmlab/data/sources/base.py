"""What every reader shares: a source's config, a unit of reading work (`Task`), and
`ReadStats`, which counts and warns about every skipped file, line or row."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmlab.config import STRICT, PosInt
from lmlab.console import warn
from lmlab.errors import UsageError

Format = Literal["auto", "text", "jsonl", "parquet", "csv", "hf", "stdlib"]


COMPRESSED = {".gz", ".zst", ".zstd", ".bz2", ".xz"}
JSONL = {".jsonl", ".json", ".ndjson"}
BOM = b"\xef\xbb\xbf"
SNIFF = 8192  # bytes looked at for NUL bytes, as git and grep do to call a file binary
BATCH_ROWS = 1024  # Parquet / HF rows per batch: bounded memory, few Python-level calls
SCALARS = (str, int, float, bool, type(None))
# A JSON \uXXXX escape of a surrogate: only lines that have one can hold a lone surrogate,
# which is a valid Python str but cannot be written as UTF-8 later.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
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


def is_hf_saved(path: Path) -> bool:
    """A directory written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )
