"""Token shards with a data mixture and a curriculum (Zhao et al. §4.1.3, Kaddour §2.1).

Documents are tokenized in batches (the `tokenizers` library encodes a batch on all
cores) into one temporary run per source, then each split is assembled from them:

- **weights**: a source with weight w appears floor(w) times in the train split, plus
  once more for a share (w - floor(w)) of its documents chosen by a hash of the id
  (weights below 1 were already applied when reading, so those sources appear once);
- **schedule**: the train split is laid out source by source in the schedule's order
  (sources not named follow in config order). The manifest records each phase's token
  range; `lmlab.train.pretrain` reads it and draws its windows from the phase that the
  number of tokens consumed so far falls in, so training sees the sources in that order.

Validation splits are never up-sampled: they measure the data as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmlab.console import log, progress
from lmlab.data.shards import write_manifest
from lmlab.errors import UsageError
from lmlab.tokenizer import end_of_text_id, load_tokenizer
from lmlab.utils import atomic_path

BATCH = 512


def _extra_share(doc_id: str, share: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(b"epoch:" + doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < share


def _docs(path: Path) -> Iterator[list[dict]]:
    batch: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                batch.append(json.loads(line))
                if len(batch) == BATCH:
                    yield batch
                    batch = []
    if batch:
        yield batch


def _tokenize_by_source(
    tok: Tokenizer, jsonl: Path, tmp_dir: Path, split: str, dtype: Any, shares: dict[str, float]
) -> dict[str, dict]:
    """One temporary token file per source; returns per-source lengths and extra-epoch flags."""
    eos = end_of_text_id(tok)
    files: dict[str, Any] = {}
    runs: dict[str, dict] = {}
    with ExitStack() as stack, progress(f"tokenize {split}", total=None, unit="docs") as bar:
        for batch in _docs(jsonl):
            encs = tok.encode_batch([d["text"] for d in batch])
            for d, enc in zip(batch, encs, strict=True):
                src = str(d.get("metadata", {}).get("source_name", "input"))
                if src not in files:
                    path = tmp_dir / f"{split}.{len(files)}.tmp"
                    files[src] = stack.enter_context(open(path, "wb"))
                    runs[src] = {
                        "file": str(path),
                        "lengths": [],
                        "extra": [],
                        "bytes": 0,
                        "extra_bytes": 0,
                    }
                ids = np.asarray(enc.ids + [eos], dtype=dtype)
                files[src].write(ids.tobytes())
                r = runs[src]
                r["lengths"].append(len(ids))
                n_bytes = len(d["text"].encode("utf-8"))
                r["bytes"] += n_bytes
                share = shares.get(src, 0.0)
                extra = share > 0 and _extra_share(str(d["id"]), share)
                r["extra"].append(extra)
                r["extra_bytes"] += n_bytes if extra else 0
            bar.update(advance=len(batch))
    return runs


def _assemble(
    out: Path,
    split: str,
    runs: dict[str, dict],
    order: list[str],
    epochs: dict[str, float],
    dtype: Any,
) -> dict:
    """Write `<split>.bin`/`.idx.npy` from the per-source runs; returns the split summary."""
    offsets = [0]
    phases = []
    sources = {}
    with atomic_path(out / f"{split}.bin") as tmp, open(tmp, "wb") as w:
        for src in order:
            if src not in runs:
                continue
            r = runs[src]
            lengths = np.asarray(r["lengths"], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(lengths)])
            start = offsets[-1]
            full = math.floor(epochs.get(src, 1.0)) if split == "train" else 1
            for _ in range(max(full, 1)):  # streamed: a source is never loaded whole
                with open(r["file"], "rb") as rf:
                    shutil.copyfileobj(rf, w, 1 << 22)
                offsets.extend((offsets[-1] + starts[1:]).tolist())
            extra = np.flatnonzero(np.asarray(r["extra"], dtype=bool)) if split == "train" else []
            if len(extra):
                data = np.memmap(r["file"], dtype=dtype, mode="r")
                for i in extra:  # the fractional epoch: whole documents, in corpus order
                    w.write(data[starts[i] : starts[i + 1]].tobytes())
                    offsets.append(offsets[-1] + int(lengths[i]))
                del data
            phases.append({"source": src, "start": start, "end": offsets[-1]})
            sources[src] = {
                "documents": len(lengths),
                "tokens": int(starts[-1]),
                "bytes": r["bytes"],
                "bytes_in_split": r["bytes"] * max(full, 1)
                + (r["extra_bytes"] if len(extra) else 0),
                "epochs": round((offsets[-1] - start) / max(int(starts[-1]), 1), 4),
                "tokens_in_split": offsets[-1] - start,
            }
            Path(r["file"]).unlink()
    with atomic_path(out / f"{split}.idx.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    return {
        "file": f"{split}.bin",
        "index": f"{split}.idx.npy",
        "tokens": offsets[-1],
        "documents": len(offsets) - 1,
        "bytes": sum(s["bytes_in_split"] for s in sources.values()),  # as the tokens count
        "phases": phases,
        "sources": sources,
    }


def write_token_shards(
    doc_dir: str | Path,
    tokenizer: str | Path | Tokenizer,
    out_dir: str | Path,
    cfg: Any,
    splits: tuple[str, ...] = ("train", "val"),
) -> dict:
    """Tokenize `doc_dir/<split>.jsonl` into `out_dir` following `cfg`'s weights and schedule.

    `cfg` is a `PipelineConfig` (its `sources` and `schedule` are read).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    names = [s.name for s in cfg.sources]
    order = list(cfg.schedule or []) + [n for n in names if n not in (cfg.schedule or [])]
    epochs = {s.name: max(s.weight, 1.0) for s in cfg.sources}
    shares = {n: e - math.floor(e) for n, e in epochs.items()}
    summary = {}
    for split in splits:
        jsonl = Path(doc_dir) / f"{split}.jsonl"
        if not jsonl.exists():
            raise UsageError(f"{jsonl}: no such file (run the data stage first)")
        runs = _tokenize_by_source(tok, jsonl, out, split, dtype, shares)
        extra = [s for s in runs if s not in order]  # documents from a source not in the config
        summary[split] = _assemble(out, split, runs, order + sorted(extra), epochs, dtype)
    write_manifest(out, tok, summary, curriculum=bool(cfg.schedule))
    tr = summary.get("train", {}).get("sources", {})
    if tr:
        log(
            "tokens: "
            + ", ".join(f"{k} {v['tokens_in_split']:,} ({v['epochs']}×)" for k, v in tr.items())
        )
    return summary


def phase_at(manifest: dict, tokens_seen: int) -> dict | None:
    """The curriculum phase training is in after `tokens_seen` tokens (cycling), or None.

    None when the shards have no curriculum: windows are then drawn from the whole split.
    """
    if not manifest.get("curriculum"):
        return None
    phases = [p for p in manifest["splits"]["train"].get("phases", []) if p["end"] > p["start"]]
    if not phases:
        return None
    total = phases[-1]["end"]
    pos = tokens_seen % total
    for p in phases:
        if pos < p["end"]:
            return p
    return phases[-1]
