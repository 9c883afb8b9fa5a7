"""Text files: one document per file, per line or per paragraph."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from lmlab.data.document import Document
from lmlab.data.sources.base import BOM, ReadStats, SourceConfig, Task
from lmlab.data.sources.common import bad_utf8, is_binary, lines, open_file


def read_text(task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]) -> Iterator[Document]:
    path = task.source_path
    with open_file(path) as fh:
        if is_binary(fh, path, stats):
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
    if raw.startswith(BOM):
        raw = raw[3:]
    if len(raw) > limit and (len(raw) > 4 * limit or len(raw.decode("utf-8", "replace")) > limit):
        stats.skip("line_too_long", path, path, f"file longer than {limit:,} characters")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_utf8(stats, path, 1, e, "file")
        return
    if text.strip():
        yield Document(id=path, text=text, metadata={"source": "text", "path": path})


def _text_lines(
    fh: BinaryIO, path: str, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    for lineno, raw in lines(fh, path, cfg, stats, at):
        if raw is None:
            continue
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            bad_utf8(stats, path, lineno, e, "line")
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
    for lineno, raw in lines(fh, path, cfg, stats, at):
        line = None
        if raw is not None:
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                bad_utf8(stats, path, lineno, e, "paragraph")
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
