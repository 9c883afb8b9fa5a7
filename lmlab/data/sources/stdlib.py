"""The embedded corpus: the running interpreter's standard library (its `.py` sources and
the pydoc topics), on every machine that runs lmlab, so the default recipe needs no download."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmlab.console import warn
from lmlab.data.document import Document
from lmlab.data.sources.base import ReadStats, SourceConfig, Task
from lmlab.data.sources.common import bad_utf8

# Directories of the stdlib that are not library prose/code a user would want to learn from.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "lib2to3"}
# The pydoc topics are read as topics; their generated module would duplicate them.
_SKIP_FILES = {"pydoc_data/topics.py"}
_TEST_DIRS = {"test", "tests"}
_STDLIB_MODULES = "<modules>"  # task part: the stdlib's top-level single-file modules
_STDLIB_TOPICS = "<topics>"  # task part: the pydoc topics


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


def stdlib_tasks(cfg: SourceConfig) -> list[Task]:
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
        bad_utf8(stats, label, 1, e, "file")
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


def read_stdlib_part(
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
