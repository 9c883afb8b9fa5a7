"""The data stage as one streaming pass: read → normalize → rules → exact dedup → split.

Output (DESIGN.md): `documents/train.jsonl` and `documents/val.jsonl` (`id`, `text`,
`metadata`), every removed document in `removed/removed.jsonl` with `metadata.reason`,
and `stats.json` with counts per step and rule.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from lmlab.config import STRICT, Fraction, PosInt
from lmlab.console import log, progress
from lmlab.data.document import Document
from lmlab.data.filters import QualityConfig, normalize, quality_reason
from lmlab.data.sources import read_path, read_stdlib
from lmlab.errors import UsageError
from lmlab.utils import atomic_path, write_json


@dataclass
class DataConfig:
    """Where documents come from and which rules they must pass."""

    __pydantic_config__ = STRICT

    source: Literal["stdlib", "paths"] = "stdlib"  # "paths" reads only `paths`
    paths: list[str] = field(default_factory=list)  # extra .jsonl/.txt files or directories
    text_field: str = "text"
    include_tests: bool = False
    include_topics: bool = True
    max_docs: PosInt | None = None
    val_fraction: Fraction = 0.05

    def __post_init__(self) -> None:
        if self.source == "paths" and not self.paths:
            raise UsageError("source is 'paths' but paths is empty")
        for p in self.paths:
            if not Path(p).exists():
                raise UsageError(f"paths: {p} does not exist")

    quality: QualityConfig = field(default_factory=QualityConfig)


def read_source(cfg: DataConfig) -> Iterator[Document]:
    if cfg.source == "stdlib":
        yield from read_stdlib(cfg.include_tests, cfg.include_topics)
    for p in cfg.paths:
        yield from read_path(p, cfg.text_field)


def split_of(doc_id: str, val_fraction: float) -> str:
    """Deterministic by document id, so a document never moves between splits across runs."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Run the pipeline and write its outputs under `out_dir`; returns the stats dict."""
    out = Path(out_dir)
    start = time.monotonic()
    stats: dict = {
        "read": {"documents": 0, "chars": 0},
        "normalize": {"empty": 0, "chars_removed": 0},
        "quality": Counter(),
        "dedup_exact": {"duplicates": 0},
        "kept": {"train": {"documents": 0, "chars": 0}, "val": {"documents": 0, "chars": 0}},
    }
    seen: set[bytes] = set()
    counts = {"train": 0, "val": 0, "removed": 0}
    docs_dir = out / "documents"
    with (
        atomic_path(docs_dir / "train.jsonl") as t_path,
        atomic_path(docs_dir / "val.jsonl") as v_path,
        atomic_path(out / "removed" / "removed.jsonl") as r_path,
        open(t_path, "w", encoding="utf-8") as f_train,
        open(v_path, "w", encoding="utf-8") as f_val,
        open(r_path, "w", encoding="utf-8") as f_removed,
        progress("data", total=None, unit="docs") as bar,
    ):
        sinks = {"train": f_train, "val": f_val, "removed": f_removed}

        def emit(kind: str, doc: Document) -> None:
            sinks[kind].write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
            counts[kind] += 1

        for doc in read_source(cfg):
            if cfg.max_docs is not None and stats["read"]["documents"] >= cfg.max_docs:
                break
            stats["read"]["documents"] += 1
            stats["read"]["chars"] += len(doc.text)
            bar.update(advance=1, status=f"kept {counts['train'] + counts['val']}")
            text = normalize(doc.text)
            stats["normalize"]["chars_removed"] += len(doc.text) - len(text)
            if not text:
                stats["normalize"]["empty"] += 1
                emit("removed", _removed(doc, "normalize:empty"))
                continue
            doc.text = text
            reason = quality_reason(text, cfg.quality)
            if reason:
                stats["quality"][reason] += 1
                emit("removed", _removed(doc, f"quality:{reason}"))
                continue
            digest = hashlib.sha1(text.encode()).digest()
            if digest in seen:
                stats["dedup_exact"]["duplicates"] += 1
                emit("removed", _removed(doc, "dedup:exact"))
                continue
            seen.add(digest)
            split = split_of(doc.id, cfg.val_fraction)
            stats["kept"][split]["documents"] += 1
            stats["kept"][split]["chars"] += len(text)
            emit(split, doc)
    stats["quality"] = dict(stats["quality"])
    stats["config"] = asdict(cfg)
    stats["seconds"] = round(time.monotonic() - start, 2)
    write_json(out / "stats.json", stats)
    kept = counts["train"] + counts["val"]
    log(
        f"data: read {stats['read']['documents']} documents, kept {kept} "
        f"({counts['train']} train / {counts['val']} val), removed {counts['removed']}"
    )
    return stats


def _removed(doc: Document, reason: str) -> Document:
    return Document(doc.id, doc.text, {**doc.metadata, "reason": reason})


def iter_documents(path: str | Path) -> Iterator[Document]:
    """Stream `Document`s back from a JSONL file written by `prepare`."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield Document.from_json(json.loads(line))
