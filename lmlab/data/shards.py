"""Token shards: the file format between tokenization and training (DESIGN.md).

A split is `<split>.bin` (a flat array of token ids, uint16 when the vocabulary fits,
else uint32, each document followed by the end-of-text id), `<split>.idx.npy` (int64
offsets of document starts, plus the total as the last entry) and `manifest.json`.
Training reads the `.bin` through `numpy.memmap`, so a corpus is never loaded whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmlab.console import progress
from lmlab.errors import UsageError
from lmlab.tokenizer import EOS, special_id
from lmlab.utils import atomic_path, read_json, write_json


def _batches(jsonl: Path, size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                batch.append(json.loads(line)["text"])
                if len(batch) == size:
                    yield batch
                    batch = []
    if batch:
        yield batch


def write_split(tok: Tokenizer, jsonl: str | Path, out_dir: str | Path, split: str) -> dict:
    """Tokenize one JSONL split into `<split>.bin` + `<split>.idx.npy`; returns its summary."""
    out = Path(out_dir)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    eos = special_id(tok, EOS)
    offsets = [0]
    n_bytes = 0
    with (
        atomic_path(out / f"{split}.bin") as tmp,
        open(tmp, "wb") as f,
        progress(f"tokenize {split}", total=None, unit="docs") as bar,
    ):
        for batch in _batches(Path(jsonl), 256):
            for enc, text in zip(tok.encode_batch(batch), batch, strict=True):
                ids = np.asarray(enc.ids + [eos], dtype=dtype)
                f.write(ids.tobytes())
                offsets.append(offsets[-1] + len(ids))
                n_bytes += len(text.encode("utf-8"))
            bar.update(advance=len(batch), status=f"{offsets[-1]:,} tokens")
    with atomic_path(out / f"{split}.idx.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    return {
        "file": f"{split}.bin",
        "index": f"{split}.idx.npy",
        "tokens": offsets[-1],
        "documents": len(offsets) - 1,
        "bytes": n_bytes,
    }


def write_manifest(out_dir: str | Path, tok: Tokenizer, splits: dict[str, dict]) -> None:
    vocab = tok.get_vocab_size()
    write_json(
        Path(out_dir) / "manifest.json",
        {
            "format": "lmlab-token-shards/1",
            "dtype": "uint16" if vocab <= 2**16 else "uint32",
            "vocab_size": vocab,
            "eos_id": special_id(tok, EOS),
            "splits": splits,
        },
    )


def open_split(shard_dir: str | Path, split: str) -> np.ndarray:
    """Memory-map one split's token ids (read-only)."""
    d = Path(shard_dir)
    try:
        manifest = read_json(d / "manifest.json")
        info = manifest["splits"][split]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UsageError(f"{d}/manifest.json: missing or has no split {split!r} ({e})") from None
    arr = np.memmap(d / info["file"], dtype=manifest["dtype"], mode="r")
    if len(arr) != info["tokens"]:
        raise UsageError(
            f"{d / info['file']}: {len(arr)} tokens on disk, manifest says {info['tokens']} "
            "(truncated or corrupted; rerun with --force tokenizer)"
        )
    return arr
