"""Parquet files, read in row batches with pyarrow."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lmlab.data.document import Document
from lmlab.data.sources.base import BATCH_ROWS, ReadStats, SourceConfig, Task
from lmlab.data.sources.common import rows


def read_parquet(
    task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    """Row batches via `iter_batches` (memory bounded by the batch, not the file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = task.source_path
    at[1] = "#"
    pf = pq.ParquetFile(path)
    try:
        schema = pf.schema_arrow
        if cfg.text_field not in schema.names:
            n_rows = pf.metadata.num_rows
            detail = f"no column {cfg.text_field!r} (columns: {', '.join(schema.names)})"
            stats.skip(
                "missing_text_field", path, path, f"{detail}; {n_rows} rows", n=max(n_rows, 1)
            )
            return
        keep = (cfg.text_field, cfg.id_field, "metadata")
        cols = [f.name for f in schema if f.name in keep or _arrow_scalar(pa, f.type)]
        start = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
            data = {n: batch.column(i).to_pylist() for i, n in enumerate(batch.schema.names)}
            yield from rows(data, start, path, "parquet", cfg, stats, at)
            start += batch.num_rows
    finally:
        pf.close()


def _arrow_scalar(pa: Any, t: Any) -> bool:
    """Columns worth keeping as metadata: numbers, strings, booleans, dates and times."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_temporal(t)
        or pa.types.is_decimal(t)
    )
