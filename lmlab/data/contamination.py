"""Benchmark contamination (Kaddour et al. §2.1; Zhao et al. §7): find training documents
that share a long word n-gram with an evaluation item, as GPT-3 did with 13-grams.

Text is normalised the same way on both sides: lower-cased, punctuation treated as a
word break, split into words. The index holds the sorted 64-bit hashes of every n-gram of
every evaluation item, with the item each came from. Words are hashed through the index's
own vocabulary (word → id), so a word that no item contains rules out every n-gram
around it before any hashing, and the hash is stable across processes and machines (no
salted `hash()`). An item shorter than n words is indexed whole, as one shorter n-gram,
so a one-line question can still be found; documents are then also searched for n-grams
of those shorter lengths.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmlab.config import STRICT, PosInt
from lmlab.console import warn
from lmlab.errors import UsageError
from lmlab.utils import atomic_path, read_json, write_json

FORMAT = "lmlab-contamination-index/1"
DEFAULT_FIELDS = [
    "question",
    "answer",
    "text",
    "prompt",
    "completion",
    "input",
    "output",
    "context",
    "choices",
]
_WORD = re.compile(r"[^\W_]+")
_MAX_WARNINGS = 10  # per evaluation file; the rest are counted in one last line
_SNIPPET_CHARS = 200


@dataclass
class ContaminationConfig:
    """n-gram length, what to do with an overlapping document, and the item fields read."""

    __pydantic_config__ = STRICT

    ngram: PosInt = 13
    action: Literal["flag", "drop"] = "flag"
    min_overlaps: PosInt = 1  # n-grams a document must share with one item to count
    fields: list[str] = field(default_factory=lambda: list(DEFAULT_FIELDS))


@dataclass
class ContaminationIndex:
    n: int
    hashes: np.ndarray  # uint64, sorted
    items: np.ndarray  # int32, the item each hash came from (a hash may repeat)
    item_ids: list[str]
    item_files: list[str]
    vocab: dict[str, int]  # word → id ≥ 1; 0 means "in no evaluation item"
    lengths: tuple[int, ...]  # n-gram lengths present: n, and those of short items


@dataclass
class Match:
    item_id: str
    eval_file: str
    ngram_count: int  # positions in the document whose n-gram belongs to the item
    first_offset: int  # character offset of the first shared n-gram
    snippet: str


# --- hashing --------------------------------------------------------------------------

_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_K = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-spread bijection of 64-bit integers."""
    x = x ^ (x >> np.uint64(30))
    x = x * _C1
    x = x ^ (x >> np.uint64(27))
    x = x * _C2
    return x ^ (x >> np.uint64(31))


def ngram_hashes(ids: np.ndarray, n: int) -> Iterator[np.ndarray]:
    """For k = 1..n, an array whose element i hashes the k-gram `ids[i:i+k]`.

    Each order extends the previous one by a word, so all orders cost n vector passes.
    """
    ids64 = np.asarray(ids, dtype=np.uint64)
    h = _mix(ids64 + _K)
    yield h
    for k in range(2, n + 1):
        h = _mix(h[:-1] * _K + ids64[k - 1 :]) if len(h) > 1 else h[:0]
        yield h


def words(text: str) -> list[str]:
    """The normalised words that n-grams are made of."""
    return _WORD.findall(text.lower())


# --- evaluation files -----------------------------------------------------------------


def _flatten(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _flatten(v)
    elif value is not None:
        yield str(value)


def read_eval_items(path: str | Path, fields: Sequence[str]) -> Iterator[tuple[int, str, str]]:
    """(line number, item id, item text) for each usable line of an evaluation JSONL file.

    Malformed lines and lines with none of `fields` are skipped with a warning naming
    `file:line`; the id is the item's `id` field, else `file:line`.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"decontaminate: evaluation file {p} does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    skipped = 0

    def skip(lineno: int, why: str) -> None:
        nonlocal skipped
        skipped += 1
        if skipped <= _MAX_WARNINGS:
            warn(f"{p}:{lineno}: {why}, skipped")

    with opener(p, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skip(lineno, f"malformed JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                skip(lineno, "not a JSON object")
                continue
            parts = [s for k in fields if k in row for s in _flatten(row[k])]
            if not parts:
                skip(lineno, f"none of the fields {', '.join(fields)}")
                continue
            item_id = str(row["id"]) if row.get("id") is not None else f"{p.name}:{lineno}"
            yield lineno, item_id, "\n".join(parts)
    if skipped > _MAX_WARNINGS:
        warn(f"{p}: {skipped} lines skipped in all")


def build_index(eval_paths: Iterable[str | Path], cfg: ContaminationConfig) -> ContaminationIndex:
    """Hash every n-gram of every evaluation item (short items whole) into one index."""
    n = cfg.ngram
    vocab: dict[str, int] = {}
    item_ids: list[str] = []
    item_files: list[str] = []
    seen_ids: set[str] = set()
    chunks: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    lengths = {n}
    for path in eval_paths:
        for lineno, item_id, text in read_eval_items(path, cfg.fields):
            ws = words(text)
            if not ws:
                warn(f"{path}: item {item_id} has no words, skipped")
                continue
            if item_id in seen_ids:  # an id must name one item in the report
                item_id = f"{path}:{lineno}"
            seen_ids.add(item_id)
            ids = np.fromiter((vocab.setdefault(w, len(vocab) + 1) for w in ws), np.int64, len(ws))
            k = min(n, len(ws))
            lengths.add(k)
            *_, h = ngram_hashes(ids, k)
            chunks.append(h)
            owners.append(np.full(len(h), len(item_ids), dtype=np.int32))
            item_ids.append(item_id)
            item_files.append(str(path))
    if not item_ids:
        raise UsageError("decontaminate: the evaluation files hold no usable items")
    hashes = np.concatenate(chunks)
    items = np.concatenate(owners)
    order = np.lexsort((items, hashes))
    hashes, items = hashes[order], items[order]
    keep = np.ones(len(hashes), dtype=bool)  # one entry per (hash, item)
    keep[1:] = (hashes[1:] != hashes[:-1]) | (items[1:] != items[:-1])
    return ContaminationIndex(
        n=n,
        hashes=hashes[keep],
        items=items[keep],
        item_ids=item_ids,
        item_files=item_files,
        vocab=vocab,
        lengths=tuple(sorted(lengths)),
    )


def save_index(index: ContaminationIndex, path: str | Path) -> None:
    """A directory with `ngrams.npz` (hashes, owners) and `items.json` (ids, vocabulary)."""
    out = Path(path)
    with atomic_path(out / "ngrams.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, hashes=index.hashes, items=index.items)
    vocab = [""] * len(index.vocab)
    for w, i in index.vocab.items():
        vocab[i - 1] = w
    write_json(
        out / "items.json",
        {
            "format": FORMAT,
            "n": index.n,
            "lengths": list(index.lengths),
            "item_ids": index.item_ids,
            "item_files": index.item_files,
            "vocab": vocab,
        },
    )


def load_index(path: str | Path) -> ContaminationIndex:
    p = Path(path)
    try:
        meta = read_json(p / "items.json")
        with np.load(p / "ngrams.npz", allow_pickle=False) as z:
            hashes, items = z["hashes"], z["items"]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{p}: not a contamination index ({e})") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"{p}/items.json: format {meta.get('format')!r}, expected {FORMAT}")
    return ContaminationIndex(
        n=meta["n"],
        hashes=hashes,
        items=items,
        item_ids=meta["item_ids"],
        item_files=meta["item_files"],
        vocab={w: i for i, w in enumerate(meta["vocab"], 1)},
        lengths=tuple(meta["lengths"]),
    )


# --- search ---------------------------------------------------------------------------


def find(text: str, index: ContaminationIndex) -> list[Match]:
    """Evaluation items sharing an n-gram with `text`, in order of first occurrence.

    Every match is returned; a caller applies `min_overlaps` to `ngram_count`.
    """
    lowered = text.lower()
    ws = _WORD.findall(lowered)
    if len(ws) < index.lengths[0]:
        return []
    ids = np.fromiter(map(index.vocab.get, ws, repeat(0)), np.int64, len(ws))
    known = np.concatenate(([0], np.cumsum(ids != 0)))
    hits: list[tuple[int, int, int]] = []  # (first word, length, position in index)
    for k, h in enumerate(ngram_hashes(ids, index.lengths[-1]), 1):
        if k not in index.lengths or not len(h):
            continue
        starts = np.flatnonzero(known[k:] - known[:-k] == k)  # windows of known words only
        if not len(starts):
            continue
        q = h[starts]
        lo = np.searchsorted(index.hashes, q, "left")
        found = np.flatnonzero(lo < len(index.hashes))
        found = found[index.hashes[lo[found]] == q[found]]
        for j in found:
            pos = int(lo[j])
            while pos < len(index.hashes) and index.hashes[pos] == q[j]:
                hits.append((int(starts[j]), k, pos))
                pos += 1
    if not hits:
        return []
    per_item: dict[int, list[tuple[int, int]]] = {}
    for start, k, pos in hits:
        per_item.setdefault(int(index.items[pos]), []).append((start, k))
    firsts = {item: min(where) for item, where in per_item.items()}
    # word offsets, up to the last word quoted; str.lower() keeps offsets except for a
    # few letters (İ → i̇), and then the lowered text is quoted
    src = text if len(lowered) == len(text) else lowered
    last = max(start + k for start, k in firsts.values())
    spans = [m.span() for m in islice(_WORD.finditer(lowered), last)]
    matches = []
    for item, where in per_item.items():
        start, k = firsts[item]
        a, b = spans[start][0], spans[start + k - 1][1]
        snippet = " ".join(src[a:b].split())
        if len(snippet) > _SNIPPET_CHARS:
            snippet = snippet[: _SNIPPET_CHARS - 1] + "…"
        matches.append(Match(index.item_ids[item], index.item_files[item], len(where), a, snippet))
    matches.sort(key=lambda m: (m.first_offset, m.item_id))
    return matches


def summarize(matches_by_doc: Mapping[str, Sequence[Match]]) -> dict[str, Any]:
    """Per evaluation item found: its file, the training documents holding it, n-grams."""
    out: dict[str, dict[str, Any]] = {}
    for doc_id, matches in matches_by_doc.items():
        for m in matches:
            entry = out.setdefault(
                m.item_id, {"eval_file": m.eval_file, "documents": [], "ngram_count": 0}
            )
            entry["documents"].append(doc_id)
            entry["ngram_count"] += m.ngram_count
    for entry in out.values():
        entry["documents"] = sorted(set(entry["documents"]))
    return dict(sorted(out.items(), key=lambda kv: (-len(kv[1]["documents"]), kv[0])))
