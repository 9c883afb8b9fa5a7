"""Hugging Face datasets: on the hub (the only online source) or saved to disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmlab.data.document import Document
from lmlab.data.sources.base import BATCH_ROWS, ReadStats, SourceConfig, Task, is_hf_saved
from lmlab.data.sources.common import rows
from lmlab.errors import UsageError

_HF_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}


def read_hf(task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]) -> Iterator[Document]:
    """A Hugging Face dataset, iterated in batches (memory-mapped or streamed, never loaded)."""
    at[1] = "#"
    path = task.source_path
    ds = _open_hf(task, cfg, stats)
    if ds is None:
        return
    start = 0
    for batch in ds.iter(batch_size=BATCH_ROWS):
        n_rows = len(next(iter(batch.values()))) if batch else 0
        if cfg.text_field not in batch:
            detail = f"no column {cfg.text_field!r} (columns: {', '.join(batch)}); {n_rows} rows"
            stats.skip("missing_text_field", path, f"{path}#{start}", detail, n=n_rows)
        else:
            yield from rows(dict(batch), start, path, "hf", cfg, stats, at)
        start += n_rows


def _open_hf(task: Task, cfg: SourceConfig, stats: ReadStats) -> Any:
    import datasets

    src = task.source_path
    if src.startswith("hf:"):
        name, _, config = src[3:].partition(":")
        try:
            return datasets.load_dataset(name, config or None, split=cfg.hf_split, streaming=True)
        except Exception as e:  # offline, unknown name/config/split, gated: the user must act
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{src}: cannot load from the Hugging Face hub: {msg}") from None
    p = Path(src)
    try:
        if (p / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(src)
            if cfg.hf_split not in dd:
                splits = ", ".join(dd)
                raise UsageError(
                    f"{src}: no split {cfg.hf_split!r} (splits: {splits}); set hf_split"
                )
            return dd[cfg.hf_split]
        if is_hf_saved(p):
            return datasets.load_from_disk(src)
        if p.is_dir():
            return datasets.load_dataset(src, split=cfg.hf_split, streaming=True)
        builder = _HF_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise UsageError(f"{src}: datasets cannot load a {p.suffix or 'suffix-less'} file")
        return datasets.load_dataset(builder, data_files=src, split="train", streaming=True)
    except UsageError:
        raise
    except Exception as e:  # a corrupt or foreign local dataset is bad input: skip it
        stats.skip("unreadable", src, src, f"datasets cannot load it ({type(e).__name__}: {e})")
        return None
