"""Helpers the format readers share: opening plain or compressed files, decoding lines
safely, and turning rows of columns (Parquet, Hugging Face) into documents."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmlab.data.document import Document
from lmlab.data.sources.base import BOM, SCALARS, SNIFF, ReadStats, SourceConfig


def read_errors() -> tuple[type[BaseException], ...]:
    """I/O and decompression errors; looked up only in modules already imported."""
    import sys

    errs: list[type[BaseException]] = [OSError, EOFError]
    for module, name in (("zstandard", "ZstdError"), ("lzma", "LZMAError")):
        if module in sys.modules:
            errs.append(getattr(sys.modules[module], name))
    if "pyarrow" in sys.modules:
        errs.append(sys.modules["pyarrow"].ArrowException)  # a corrupt Parquet file
    return tuple(errs)


def open_file(path: str) -> BinaryIO:
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


def is_binary(fh: BinaryIO, path: str, stats: ReadStats) -> bool:
    if b"\x00" in fh.peek(SNIFF)[:SNIFF]:  # type: ignore[attr-defined]
        stats.skip("binary_file", path, path, "NUL bytes in the first 8 KiB: a binary file")
        return True
    return False


def lines(
    fh: BinaryIO, path: str, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw line) with memory bounded by the line limit: a longer line is
    counted, drained in chunks and yielded as None."""
    limit = cfg.max_line_chars
    cap = 4 * limit + 2  # the most UTF-8 bytes `limit` characters take, plus "\r\n"
    readline = fh.readline
    lineno = 0
    raw = readline(cap)
    if raw.startswith(BOM):
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


def decoded(
    fh: BinaryIO, path: str, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[tuple[int, str]]:
    """`(line number, text)` of each line that is not too long and is valid UTF-8."""
    for lineno, raw in lines(fh, path, cfg, stats, at):
        if raw is None:
            continue
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_utf8(stats, path, lineno, e, "line")


def _too_long(raw: bytes, fh: BinaryIO, cap: int, limit: int) -> bool:
    if len(raw) == cap and not raw.endswith(b"\n"):
        while raw and not raw.endswith(b"\n"):  # drain the rest of the line
            raw = fh.readline(1 << 20)
        return True
    return len(raw.rstrip(b"\r\n").decode("utf-8", "replace")) > limit


def bad_utf8(stats: ReadStats, path: str, line: int, e: UnicodeDecodeError, what: str) -> None:
    """Count invalid UTF-8 at its line and column (`line`: the first line of `e.object`)."""
    line += e.object.count(b"\n", 0, e.start)
    column = e.start - e.object.rfind(b"\n", 0, e.start)
    detail = f"invalid UTF-8 (byte {e.object[e.start]:#04x} at column {column}) in the {what}"
    stats.skip("invalid_utf8", path, f"{path}:{line}", detail)


MISSING = object()


def utf8_clean(row: dict) -> bool:
    """False when a value holds a lone surrogate, which no UTF-8 writer could write later."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def rows(
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
            if isinstance(v, SCALARS):
                meta[name] = v
            elif isinstance(v, as_str):
                meta[name] = str(v)
        m = metas[j] if metas is not None else None
        if type(m) is dict:
            meta.update(m)
        elif isinstance(m, SCALARS) and m is not None:
            meta["metadata"] = m
        rid = ids[j] if ids is not None else None
        doc_id = f"{path}#{n}" if rid is None or rid == "" else str(rid)
        yield Document(id=doc_id, text=text, metadata=meta)
