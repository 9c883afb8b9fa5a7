"""Token shards: the file format between tokenization and training (DESIGN.md).

A split is `<split>.bin` (a flat array of token ids, uint16 when the vocabulary fits,
else uint32, each document followed by the end-of-text id), `<split>.idx.npy` (int64
offsets of document starts, plus the total as the last entry) and `manifest.json`.
Training reads the `.bin` through `numpy.memmap`, so a corpus is never loaded whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmlab.errors import UsageError
from lmlab.tokenizer import end_of_text_id
from lmlab.utils import read_json, write_json


def write_manifest(
    out_dir: str | Path, tok: Tokenizer, splits: dict[str, dict], curriculum: bool = False
) -> None:
    """`curriculum` tells training to follow the train split's `phases` in order."""
    vocab = tok.get_vocab_size()
    write_json(
        Path(out_dir) / "manifest.json",
        {
            "format": "lmlab-token-shards/1",
            "dtype": "uint16" if vocab <= 2**16 else "uint32",
            "vocab_size": vocab,
            "eos_id": end_of_text_id(tok),
            "curriculum": curriculum,
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
    if info["tokens"] == 0:
        raise UsageError(f"{d}: split {split!r} has no tokens (is its documents file empty?)")
    arr = np.memmap(d / info["file"], dtype=manifest["dtype"], mode="r")
    if len(arr) != info["tokens"]:
        raise UsageError(
            f"{d / info['file']}: {len(arr)} tokens on disk, manifest says {info['tokens']} "
            "(truncated or corrupted; rerun with --force tokenizer)"
        )
    return arr
