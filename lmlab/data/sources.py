"""Readers that stream `Document`s from disk; none loads a corpus whole.

The embedded corpus is the standard library of the running interpreter: its `.py`
sources (docstrings are English prose) and the pydoc topic texts. It is on every
machine that runs lmlab, so the default recipe needs no download.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lmlab.console import warn
from lmlab.data.document import Document
from lmlab.errors import UsageError

# Directories of the stdlib that are not library prose/code a user would want to learn from.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "lib2to3"}
# The pydoc topics are read as topics; their generated module would duplicate them.
_SKIP_FILES = {"pydoc_data/topics.py"}
_TEST_DIRS = {"test", "tests"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(rel: Path) -> str:
    """`json/decoder.py` → `json.decoder`; `json/__init__.py` → `json`."""
    parts = list(rel.with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def read_stdlib(include_tests: bool = False, include_topics: bool = True) -> Iterator[Document]:
    """Stream the embedded corpus: stdlib modules, then pydoc topics, in a stable order."""
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        dirs = set(rel.parts[:-1])
        if dirs & _SKIP_DIRS or (not include_tests and (dirs & _TEST_DIRS)):
            continue
        if rel.as_posix() in _SKIP_FILES:
            continue
        if not include_tests and rel.name.startswith("test_"):
            continue
        text = _read_text(path)
        if text is None:
            continue
        yield Document(
            id=f"stdlib:{rel.as_posix()}",
            text=text,
            metadata={"source": "stdlib", "path": rel.as_posix(), "module": module_name(rel)},
        )
    if include_topics:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip pydoc_data
            warn("pydoc_data is not installed: the embedded corpus has no pydoc topics")
            return
        for name in sorted(topics):
            yield Document(
                id=f"pydoc:{name}", text=topics[name], metadata={"source": "pydoc", "topic": name}
            )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        warn(f"{path}: not valid UTF-8, skipped")
    except OSError as e:
        warn(f"{path}: cannot read ({e.strerror}), skipped")
    return None


def read_path(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    """A `.jsonl` file (one document per line), a text file, or a directory of them."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"data.paths: {p} does not exist")
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        if f.suffix == ".jsonl":
            yield from _read_jsonl(f, text_field)
        elif f.suffix in {".txt", ".md", ".py", ".rst", ".text", ""}:
            text = _read_text(f)
            if text is not None:
                yield Document(
                    id=f"file:{f}", text=text, metadata={"source": "file", "path": str(f)}
                )


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                warn(f"{path}:{lineno}: malformed JSON ({e.msg}), skipped")
                continue
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                warn(f"{path}:{lineno}: no string field {text_field!r}, skipped")
                continue
            meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
            yield Document(
                id=str(row.get("id", f"{path.name}:{lineno}")),
                text=text,
                metadata={"source": "jsonl", "path": str(path), **meta},
            )
